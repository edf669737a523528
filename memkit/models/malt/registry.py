"""Memories by name: ``build_memory("sparse_kv", heads=4, head_dim=16, tokens_per_frame=16, dim=64)``.

A config file names a memory and its keyword arguments; the registry turns that into a
:class:`memkit.Memory` built for one attention layer. A factory receives the layer's
geometry as keywords (``heads``, ``head_dim``, ``tokens_per_frame``, ``dim``) plus the
config's kwargs. Built-in memories are looked up lazily in :mod:`memkit.memories`, so a
memory added there later is found by its registered name without touching this file.

A config may come from someone else (a downloaded checkpoint), so a name never runs code
by itself: only registered names build anything. ``"package.module:ClassName"`` imports a
module and builds a class from it, so it is refused unless the caller passes
``trust_remote_code=True``, and even then only a class that implements
:class:`memkit.Memory` is built. The safe way to use your own class from a config is
:func:`register_memory`.
"""

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from memkit.errors import MemkitError
from memkit.protocol import Memory

__all__ = ["register_memory", "build_memory", "memory_names", "UnknownMemoryError", "UntrustedCodeError"]

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


class UntrustedCodeError(UnknownMemoryError):
    """A config names code to import (``"module:Class"``) and the caller did not trust it.

    Raised before anything is imported: a checkpoint's ``config.json`` must not be able to
    run code. Pass ``trust_remote_code=True`` (CLI: ``--trust-remote-code``) only for files
    whose origin you trust, or register the class with :func:`register_memory`.
    """


def register_memory(name: str, factory: MemoryFactory | type) -> None:
    """Register ``factory(*, heads, head_dim, tokens_per_frame, dim, **kwargs) -> Memory`` as ``name``.

    ``factory`` may also be a memory class: it is passed the geometry keywords its
    constructor accepts. Registering is how a config (and so a checkpoint) may name your
    own memory without ``trust_remote_code``.

    Example:
        >>> import memkit
        >>> def fifo8(*, heads, head_dim, tokens_per_frame, dim):
        ...     return memkit.FIFOMemory(heads, head_dim, tokens_per_frame, frames=8)
        >>> register_memory("fifo8", fifo8)
        >>> build_memory("fifo8", heads=2, head_dim=8, tokens_per_frame=4, dim=16).window_frames
        8
        >>> register_memory("fifo_class", memkit.FIFOMemory)   # a class: given the keywords it takes
        >>> build_memory("fifo_class", heads=2, head_dim=8, tokens_per_frame=4, dim=16, frames=3).window_frames
        3
    """
    _REGISTRY[name] = _class_factory(factory) if isinstance(factory, type) else factory


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


def _implements_memory(cls: object) -> bool:
    """Whether ``cls`` is a class with the protocol's methods (checked before it is ever called)."""
    return isinstance(cls, type) and all(callable(getattr(cls, m, None)) for m in ("init_state", "read", "write"))


def _resolve(name: str, trust_remote_code: bool) -> MemoryFactory:
    if not isinstance(name, str):
        raise UnknownMemoryError(f"memory name must be a string, got {type(name).__name__}")
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
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"memory {name!r} names code to import ('module:Class'), which a config or checkpoint may not do "
                f"unless you trust its origin: pass trust_remote_code=True (command line: --trust-remote-code), "
                f"or register the class with memkit.models.malt.register_memory; "
                f"registered memories: {', '.join(memory_names())}"
            )
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise UnknownMemoryError(f"cannot import memory class {name!r}: {err}") from err
        if not _implements_memory(cls):
            raise UntrustedCodeError(
                f"memory {name!r} is a {type(cls).__name__}, not a class implementing memkit.Memory "
                "(init_state, read, write); refusing to call it"
            )
        return _class_factory(cls)
    raise UnknownMemoryError(
        f"unknown memory {name!r}; expected one of {', '.join(memory_names())} "
        "(or 'module:Class' with trust_remote_code=True)"
    )


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
    name: str,
    *,
    heads: int,
    head_dim: int,
    tokens_per_frame: int,
    dim: int,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> Memory[Any]:
    """Build the memory called ``name`` for one attention layer.

    Args:
        name: a registered name (see :func:`memory_names`), or ``"module:Class"`` when
            ``trust_remote_code`` is true.
        heads, head_dim, tokens_per_frame, dim: the layer's geometry (passed on to the
            constructor where it takes them).
        trust_remote_code: allow ``"module:Class"``, which imports ``module`` (running its
            code) and builds ``Class``, a class implementing :class:`memkit.Memory`. Leave it
            false for configs from anyone you do not trust.
        **kwargs: the memory's own options, e.g. ``window_frames=4``.

    Raises:
        UntrustedCodeError: ``"module:Class"`` without ``trust_remote_code=True``, or it
            names something that is not a memory class.
        UnknownMemoryError: no such memory; ``TypeError`` from the constructor for bad kwargs.

    Example:
        >>> build_memory("sink_window", heads=2, head_dim=8, tokens_per_frame=4, dim=16, window_frames=3)
        SinkWindowMemory(heads=2, head_dim=8, tokens_per_frame=4, sink_frames=1, window_frames=3)
        >>> build_memory("os:system", heads=2, head_dim=8, tokens_per_frame=4, dim=16)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        memkit.models.malt.registry.UntrustedCodeError: memory 'os:system' names code to import ...
    """
    factory = _resolve(name, trust_remote_code)
    return factory(heads=heads, head_dim=head_dim, tokens_per_frame=tokens_per_frame, dim=dim, **kwargs)
