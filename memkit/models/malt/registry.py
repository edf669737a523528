"""Memories by name: ``build_memory("sparse_kv", heads=4, head_dim=16, tokens_per_frame=16, dim=64)``.

A config file names a memory and its keyword arguments; the registry turns that into a
:class:`memkit.Memory` built for one attention layer. A factory receives the layer's
geometry as keywords (``heads``, ``head_dim``, ``tokens_per_frame``, ``dim``) plus the
config's kwargs. Built-in memories are looked up lazily in :mod:`memkit.memories`, so a
memory added there later is found by its registered name without touching this file;
``"package.module:ClassName"`` builds any other class whose constructor takes those keywords.
"""

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from memkit.errors import MemkitError
from memkit.protocol import Memory

__all__ = ["register_memory", "build_memory", "memory_names", "UnknownMemoryError"]

MemoryFactory = Callable[..., Memory[Any]]

_GEOMETRY = ("heads", "head_dim", "tokens_per_frame", "dim", "prompt_dim")

# name -> class name in memkit.memories (resolved when first built: those modules may not exist yet)
_BUILTIN: dict[str, str] = {
    "none": "NoMemory",
    "sink_window": "SinkWindowMemory",
    "fifo": "FIFOMemory",
    "recurrent": "RecurrentMemory",
    "sparse_kv": "SparseKVMemory",
    "prompt_bank": "PromptBankMemory",
}

_REGISTRY: dict[str, MemoryFactory] = {}


class UnknownMemoryError(MemkitError, ValueError):
    """A memory name that no factory answers to (or whose class cannot be imported)."""


def register_memory(name: str, factory: MemoryFactory) -> None:
    """Register ``factory(*, heads, head_dim, tokens_per_frame, dim, **kwargs) -> Memory`` as ``name``.

    Example:
        >>> import memkit
        >>> def fifo8(*, heads, head_dim, tokens_per_frame, dim):
        ...     return memkit.FIFOMemory(heads, head_dim, tokens_per_frame, frames=8)
        >>> register_memory("fifo8", fifo8)
        >>> build_memory("fifo8", heads=2, head_dim=8, tokens_per_frame=4, dim=16).window_frames
        8
    """
    _REGISTRY[name] = factory


def _class_factory(cls: type) -> MemoryFactory:
    """A factory that passes ``cls`` the geometry keywords its constructor accepts."""
    params: Any
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def factory(**kwargs: Any) -> Memory[Any]:
        geometry = {k: kwargs.pop(k) for k in _GEOMETRY if k in kwargs}
        accepted = {k: v for k, v in geometry.items() if takes_any or k in params}
        memory: Memory[Any] = cls(**accepted, **kwargs)
        return memory

    return factory


def _resolve(name: str) -> MemoryFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        memories = importlib.import_module("memkit.memories")
        cls = getattr(memories, _BUILTIN[name], None)
        if cls is None:
            raise UnknownMemoryError(
                f"memory {name!r} ({_BUILTIN[name]}) is not available in this memkit installation; "
                f"available: {', '.join(memory_names())}"
            )
        return _class_factory(cls)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownMemoryError(f"cannot import memory class {name!r}: {err}") from err
        return _class_factory(cls)
    raise UnknownMemoryError(f"unknown memory {name!r}; expected one of {', '.join(memory_names())} or 'module:Class'")


def memory_names() -> list[str]:
    """Names that :func:`build_memory` can build in this installation.

    Example:
        >>> {"none", "sink_window", "fifo"} <= set(memory_names())
        True
    """
    memories = importlib.import_module("memkit.memories")
    names = [n for n, cls in _BUILTIN.items() if hasattr(memories, cls)]
    return names + [n for n in _REGISTRY if n not in names]


def build_memory(
    name: str, *, heads: int, head_dim: int, tokens_per_frame: int, dim: int, **kwargs: Any
) -> Memory[Any]:
    """Build the memory called ``name`` for one attention layer.

    Args:
        name: a registered name (see :func:`memory_names`) or ``"module:Class"``.
        heads, head_dim, tokens_per_frame, dim: the layer's geometry (passed on to the
            constructor where it takes them).
        **kwargs: the memory's own options, e.g. ``window_frames=4``.

    Raises:
        UnknownMemoryError: no such memory; ``TypeError`` from the constructor for bad kwargs.

    Example:
        >>> build_memory("sink_window", heads=2, head_dim=8, tokens_per_frame=4, dim=16, window_frames=3)
        SinkWindowMemory(heads=2, head_dim=8, tokens_per_frame=4, sink_frames=1, window_frames=3)
    """
    factory = _resolve(name)
    return factory(heads=heads, head_dim=head_dim, tokens_per_frame=tokens_per_frame, dim=dim, **kwargs)
