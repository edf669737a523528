"""Which layers get memory, which memory and which adapter each gets."""

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from memkit.errors import AttachError
from memkit.integrations.hub import MEMORIES_ATTR
from memkit.integrations.layer_attend import AttentionAdapter
from memkit.protocol import Memory

__all__ = ["LayerSelector", "LayerMemories", "select_layers", "resolve_memory", "resolve_adapter"]


#: Which modules get memory: a glob over module names (``"blocks.*.attn"``), a list of
#: exact names, an ``nn.Module`` subclass (or tuple of them), or ``predicate(name, module)``.
LayerSelector = str | Sequence[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool]

#: The memory of each layer: one :class:`memkit.Memory` for all (its states are still per
#: layer), a ``{name: memory}`` dict, or a factory ``memory(name, module) -> Memory``.
LayerMemories = Memory[Any] | Mapping[str, Memory[Any]] | Callable[[str, nn.Module], Memory[Any]]


def select_layers(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module]]:
    # memories registered by an earlier attach are never layers
    named = [(n, m) for n, m in model.named_modules() if n.split(".")[0] != MEMORIES_ATTR]
    if isinstance(layers, str):
        chosen = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, layers)]
    elif isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(c, type) for c in layers)):
        chosen = [(n, m) for n, m in named if isinstance(m, layers)]
    elif callable(layers):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    elif isinstance(layers, Sequence):
        by_name = dict(named)
        missing = [n for n in layers if n not in by_name]
        if missing:
            raise AttachError(f"attach: {type(model).__name__} has no module named {missing[0]!r}")
        chosen = [(n, by_name[n]) for n in layers]
    else:
        raise AttachError(f"attach: layers must be a glob, names, a module type or a predicate, got {layers!r}")
    if not chosen:
        raise AttachError(f"attach: no module of {type(model).__name__} matched layers={layers!r}")
    return chosen


def resolve_memory(spec: LayerMemories, name: str, module: nn.Module) -> Memory[Any]:
    if isinstance(spec, Memory):
        return spec
    if isinstance(spec, Mapping):
        if name not in spec:
            raise AttachError(f"attach: the memory dict has no entry for layer {name!r}")
        memory = spec[name]
    elif callable(spec):
        memory = spec(name, module)
    else:
        raise AttachError(f"attach: memory must be a Memory, a dict or a factory, got {type(spec).__name__}")
    if not isinstance(memory, Memory):
        raise AttachError(f"attach: the memory for layer {name!r} is not a memkit.Memory: {memory!r}")
    return memory


def resolve_adapter(
    spec: AttentionAdapter | Mapping[type, AttentionAdapter], name: str, module: nn.Module
) -> AttentionAdapter:
    if isinstance(spec, Mapping):
        for cls in type(module).__mro__:
            if cls in spec:
                return spec[cls]
        raise AttachError(f"attach: no adapter for layer {name!r} of type {type(module).__name__}")
    if not callable(spec):
        raise AttachError(f"attach: adapter must be callable, got {type(spec).__name__}")
    return spec
