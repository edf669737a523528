"""MALT: the reference segment-autoregressive video diffusion transformer with memory.

After Yu et al., "MALT Diffusion: Memory-Augmented Latent Transformers for Any-Length
Video Generation" (arXiv 2502.12632). See docs/backbone.md.
"""

from memkit.errors import ConfigError, UnknownMemoryError, UntrustedCodeError
from memkit.memories.registry import build_memory, memory_names, register_memory
from memkit.models.malt.codec import IdentityCodec, LatentCodec
from memkit.models.malt.config import MODEL_PRESETS, MALTConfig, MemorySpec
from memkit.models.malt.diffusion import FlowMatching
from memkit.models.malt.network import CheckpointError, MALTBlock, MALTNetwork, patchify, unpatchify
from memkit.models.malt.sampler import EulerSampler, Generation, Segment, generate, stream

__all__ = [
    "MALTConfig",
    "MemorySpec",
    "MODEL_PRESETS",
    "ConfigError",
    "MALTNetwork",
    "MALTBlock",
    "CheckpointError",
    "patchify",
    "unpatchify",
    "FlowMatching",
    "EulerSampler",
    "Segment",
    "Generation",
    "stream",
    "generate",
    "IdentityCodec",
    "LatentCodec",
    "build_memory",
    "register_memory",
    "memory_names",
    "UnknownMemoryError",
    "UntrustedCodeError",
]
