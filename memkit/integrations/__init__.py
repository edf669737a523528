"""Memory for models memkit did not write: a generic attach API and a diffusers Wan processor.

``import memkit.integrations`` never imports diffusers; :func:`attach_wan` does, when called.

Where things live (each module one idea, imported only downward):

* :mod:`~memkit.integrations.layout`: :class:`SegmentLayout`, the frames a call processes;
* :mod:`~memkit.integrations.layer_attend`: :class:`LayerAttend`, the per-layer attention core
  an adapter calls, and the :data:`AttentionAdapter` contract;
* :mod:`~memkit.integrations.hub`: the sessions attached to one model and call dispatch;
* :mod:`~memkit.integrations.installers`: how calls are routed (forward chain, hooks);
* :mod:`~memkit.integrations.selection`: which layers, memories and adapters;
* :mod:`~memkit.integrations.session`: :class:`MemorySession` and ``attach_layers``;
* :mod:`~memkit.integrations.attach`: :func:`attach`, the public entry point;
* :mod:`~memkit.integrations.adapters`: adapters for modules memkit knows;
* :mod:`~memkit.integrations.rotary`: rotary from the host's own table (3-D, memory keys placed in time);
* :mod:`~memkit.integrations.diffusers_wan`: diffusers' Wan and SkyReels-V2 transformers, by processors;
* :mod:`~memkit.integrations.diffusers_joint`: CogVideoX, HunyuanVideo, Mochi (joint text-video attention).
"""

import warnings
from typing import Any

from memkit.integrations.adapters import multihead_attention_adapter
from memkit.integrations.attach import attach
from memkit.integrations.diffusers_joint import (
    CogVideoXAttentionAdapter,
    HunyuanVideoAttentionAdapter,
    MochiAttentionAdapter,
    attach_cogvideox,
    attach_hunyuan_video,
    attach_mochi,
)
from memkit.integrations.diffusers_wan import (
    WanMemoryProcessor,
    WanSelfAttentionAdapter,
    attach_wan,
    wan_rotary_freqs,
)
from memkit.integrations.layer_attend import AttentionAdapter, ExtraTokens, LayerAttend
from memkit.integrations.layout import SegmentLayout, block_causal_mask
from memkit.integrations.selection import LayerMemories, LayerSelector
from memkit.integrations.session import MemorySession

__all__ = [
    "attach",
    "MemorySession",
    "SegmentLayout",
    "block_causal_mask",
    "LayerAttend",
    "ExtraTokens",
    "AttentionAdapter",
    "LayerSelector",
    "LayerMemories",
    "multihead_attention_adapter",
    "attach_wan",
    "WanMemoryProcessor",
    "WanSelfAttentionAdapter",
    "wan_rotary_freqs",
    "attach_cogvideox",
    "attach_hunyuan_video",
    "attach_mochi",
    "CogVideoXAttentionAdapter",
    "HunyuanVideoAttentionAdapter",
    "MochiAttentionAdapter",
]


def __getattr__(name: str) -> Any:
    # `Segment` was documented API; the sampler's `memkit.models.malt.Segment` is another thing
    if name == "Segment":
        warnings.warn(
            "memkit.integrations.Segment is deprecated: it is memkit.integrations.SegmentLayout "
            "(memkit.models.malt.Segment is the sampler's generated segment)",
            DeprecationWarning,
            stacklevel=2,
        )
        return SegmentLayout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
