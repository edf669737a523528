"""Memories by name: ``build_memory("sparse_kv", heads=4, head_dim=16, tokens_per_frame=16, dim=64)``.

A config file names a memory and its keyword arguments; the registry turns that into a
:class:`memkit.Memory` built for one attention layer. Every built-in memory registers its
name in its own file (``register_memory("fifo", FIFOMemory)`` under the class), so a memory
added to :mod:`memkit.memories` is found by name without touching this file. A factory
receives the layer's geometry as keywords (``heads``, ``head_dim``, ``tokens_per_frame``,
``dim``) plus the config's kwargs; a class is passed the geometry keywords its constructor
accepts.

A config may come from someone else (a downloaded checkpoint), so a name never runs code
by itself: only registered names build anything. ``"package.module:ClassName"`` imports a
module and builds a class from it, so it is refused unless the caller passes
``trust_remote_code=True``, and even then only a class that implements
:class:`memkit.Memory` is built. The safe way to use your own class from a config is
:func:`register_memory`.
"""

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from memkit.errors import UnknownMemoryError, UntrustedCodeError
from memkit.protocol import Memory

__all__ = ["register_memory", "build_memory", "build_from_spec", "memory_names"]

MemoryFactory = Callable[..., Memory[Any]]

_GEOMETRY = ("heads", "head_dim", "tokens_per_frame", "dim", "prompt_dim")

# name -> factory, in registration order (the built-ins register as their modules are imported)
_REGISTRY: dict[str, MemoryFactory] = {}


def register_memory(name: str, factory: MemoryFactory | type) -> None:
    """Register ``factory(*, heads, head_dim, tokens_per_frame, dim, **kwargs) -> Memory`` as ``name``.

    ``factory`` may also be a memory class: it is passed the geometry keywords its
    constructor accepts. Registering is how a config (and so a checkpoint) may name your
    own memory without ``trust_remote_code``. A name registered again is replaced.

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
    if ":" in name:
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"memory {name!r} names code to import ('module:Class'), which a config or checkpoint may not do "
                f"unless you trust its origin: pass trust_remote_code=True (command line: --trust-remote-code), "
                f"or register the class with memkit.memories.register_memory; "
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
    """Names that :func:`build_memory` can build in this installation, in registration order.

    Example:
        >>> {"none", "sink_window", "fifo"} <= set(memory_names())
        True
    """
    return list(_REGISTRY)


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
        memkit.errors.UntrustedCodeError: memory 'os:system' names code to import ...
    """
    factory = _resolve(name, trust_remote_code)
    return factory(heads=heads, head_dim=head_dim, tokens_per_frame=tokens_per_frame, dim=dim, **kwargs)


def build_from_spec(
    name: str,
    kwargs: Mapping[str, Any],
    geometry: Mapping[str, int],
    *,
    trust_remote_code: bool = False,
) -> Memory[Any]:
    """Build the memory a config names (``name`` with its ``kwargs``) for a layer of ``geometry``.

    The one place a configured memory is built (the reference backbone per block, the
    command line to refuse a bad config before any work). Unlike :func:`build_memory`'s
    keywords, ``kwargs`` come from a file, so they may not grant trust themselves.

    Args:
        name: a registered name, or ``"module:Class"`` with ``trust_remote_code``.
        kwargs: the memory's options, as the config holds them.
        geometry: ``heads``, ``head_dim``, ``tokens_per_frame`` and ``dim`` of the layer.
        trust_remote_code: the caller's (never the config's) permission to import code.

    Raises:
        UntrustedCodeError: ``kwargs`` holds ``trust_remote_code``, or see :func:`build_memory`.

    Example:
        >>> geometry = {"heads": 2, "head_dim": 8, "tokens_per_frame": 4, "dim": 16}
        >>> build_from_spec("fifo", {"frames": 2}, geometry)
        FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=2)
        >>> build_from_spec("fifo", {"trust_remote_code": True}, geometry)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        memkit.errors.UntrustedCodeError: memory.kwargs may not hold trust_remote_code: ...
    """
    if "trust_remote_code" in kwargs:
        raise UntrustedCodeError(
            "memory.kwargs may not hold trust_remote_code: trust is the caller's to give "
            "(MALTNetwork(..., trust_remote_code=True), --trust-remote-code), never a config's"
        )
    return build_memory(name, **geometry, trust_remote_code=trust_remote_code, **kwargs)
