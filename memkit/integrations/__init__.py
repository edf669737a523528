"""Memory for models memkit did not write: a generic attach API and a diffusers Wan processor.

``import memkit.integrations`` never imports diffusers; :func:`attach_wan` does, when called.
"""

from memkit.integrations.attach import (
    AttentionAdapter,
    LayerAttend,
    LayerSelector,
    MemorySession,
    MemorySpec,
    Segment,
    attach,
    multihead_attention_adapter,
)
from memkit.integrations.diffusers_wan import (
    WanMemoryProcessor,
    WanSelfAttentionAdapter,
    attach_wan,
    wan_rotary_freqs,
)

__all__ = [
    "attach",
    "MemorySession",
    "Segment",
    "LayerAttend",
    "AttentionAdapter",
    "LayerSelector",
    "MemorySpec",
    "multihead_attention_adapter",
    "attach_wan",
    "WanMemoryProcessor",
    "WanSelfAttentionAdapter",
    "wan_rotary_freqs",
]
