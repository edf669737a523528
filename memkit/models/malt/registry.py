"""Where the memory registry used to live: it is :mod:`memkit.memories.registry` now.

Kept so that ``from memkit.models.malt.registry import build_memory`` (and the error types)
still work.
"""

from memkit.errors import UnknownMemoryError, UntrustedCodeError
from memkit.memories.registry import _REGISTRY, build_from_spec, build_memory, memory_names, register_memory

__all__ = [
    "register_memory",
    "build_memory",
    "build_from_spec",
    "memory_names",
    "UnknownMemoryError",
    "UntrustedCodeError",
    "_REGISTRY",
]
