"""Per-layer memory states, one life cycle: init (and reset), save, load.

The states of a model's memory layers live in one :class:`memkit.state.LayerStates` (a
tuple in layer order, keyed by layer name). The reference backbone
(:meth:`memkit.models.malt.MALTNetwork.init_states`) and the tiny host make theirs here;
states are values, so a reset is a fresh :func:`init_memory_states`. Every container is
saved by :func:`save_layer_states` and loaded by :func:`load_layer_states`, so a file's
tensors are named alike whoever wrote it (``[0].window.k``): :func:`save_memory_states` /
:func:`load_memory_states` for a model's :class:`MemoryAttention` layers, and
:class:`memkit.integrations.MemorySession` for the layers :func:`memkit.attach` gave memory.
"""

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from memkit.errors import CheckpointError
from memkit.layers.memory_attention import MemoryAttention, memory_layers
from memkit.state import LayerStates

__all__ = [
    "init_memory_states",
    "save_memory_states",
    "load_memory_states",
    "save_layer_states",
    "load_layer_states",
]


def init_memory_states(
    model: nn.Module,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LayerStates:
    """One empty state per :class:`MemoryAttention` of ``model``, under the layer's name.

    Returns a :class:`memkit.state.LayerStates`: a tuple in module order (a pytree) that
    also answers by name (``states["blocks.0.attn"]``). Calling it again is the reset.

    Example:
        >>> import torch, memkit
        >>> layers = torch.nn.ModuleList(memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1)) for _ in range(2))
        >>> states = memkit.init_memory_states(layers, batch_size=1)
        >>> states.names, len(states)
        (('0', '1'), 2)
    """
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, MemoryAttention)]
    states = (layer.init_state(batch_size, device=device, dtype=dtype) for _, layer in named)
    return LayerStates(states, (name for name, _ in named))


def save_memory_states(path: str | os.PathLike[str], model: nn.Module, states: Any) -> None:
    """Save a model's states (:func:`memkit.save_states` format), its layers' memories recorded.

    Example:
        >>> import os, tempfile, torch, memkit
        >>> from memkit.layers import load_memory_states, save_memory_states
        >>> layers = torch.nn.ModuleList(memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1)) for _ in range(2))
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.safetensors")
        >>> save_memory_states(path, layers, memkit.init_memory_states(layers, batch_size=3))
        >>> load_memory_states(path, layers)[1].window.k.shape[0]     # the batch size comes from the file
        3
    """
    save_layer_states(path, states, [layer.memory for layer in memory_layers(model)])


def load_memory_states(
    path: str | os.PathLike[str], model: nn.Module, *, device: torch.device | str | None = None
) -> LayerStates:
    """Load states saved for ``model`` (by :func:`save_memory_states` or :func:`memkit.save_states`).

    No template needed: the file's tensors say the batch size and dtype; the states land on
    ``device`` (default: each layer's). Refused with :class:`memkit.CheckpointError`, saying
    what differs, for another model's memories or a damaged file. Files saved from a plain
    tuple of states load too (the tensors are named the same).
    """
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, MemoryAttention)]

    def template(i: int, batch: int, dtype: torch.dtype | None) -> Any:
        return named[i][1].init_state(batch, device=device, dtype=dtype)

    return load_layer_states(path, [name for name, _ in named], [m.memory for _, m in named], template)


def save_layer_states(path: str | os.PathLike[str], states: Any, memories: Sequence[Any]) -> None:
    """Save per-layer states, one memory per layer recorded: the writer behind every container.

    :func:`save_memory_states` and ``MemorySession.save_states`` both save through it, so a
    file's tensors are named by the layer's place (``[0].window.k``), as a plain tuple's
    (:func:`memkit.save_states` format, written atomically). A ``None`` state (a
    :class:`~memkit.integrations.MemorySession`'s layer that has not run yet) writes nothing.

    Args:
        path: the file to write.
        states: a :class:`memkit.state.LayerStates` (or a tuple of states), one per layer.
        memories: the memory of each layer, in the same order; their classes and settings
            are recorded and checked by :func:`load_layer_states`.

    Example:
        >>> import os, tempfile, memkit
        >>> from memkit.io import read_header
        >>> from memkit.layers import save_layer_states
        >>> from memkit.state import LayerStates
        >>> mems = [memkit.FIFOMemory(2, 4, 1, frames=2), memkit.FIFOMemory(2, 4, 1, frames=3)]
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.safetensors")
        >>> save_layer_states(path, LayerStates([mems[0].init_state(1), None], ["a", "b"]), mems)
        >>> list(read_header(path)["tensors"])[4]
        '[0].window.k'
    """
    from memkit.io import save_states

    if isinstance(states, (tuple, list)) and len(states) != len(memories):
        raise CheckpointError(f"save_layer_states: {len(states)} states for {len(memories)} memories (one per layer)")
    save_states(path, states, list(memories))


def load_layer_states(
    path: str | os.PathLike[str],
    names: Sequence[str],
    memories: Sequence[Any],
    template: Callable[[int, int, torch.dtype | None], Any],
    *,
    absent_as_none: bool = False,
) -> LayerStates:
    """Load per-layer states saved by :func:`save_layer_states`, no template needed: the reader behind every container.

    The file's tensors say each layer's batch size and floating dtype; ``template(i, batch,
    dtype)`` makes layer ``i``'s empty state of that kind (on the device the state should
    land on), and the file's tensors replace its tensors. A layer the file holds no tensor
    of gets ``None`` with ``absent_as_none`` (a :class:`~memkit.integrations.MemorySession`'s
    layer that had not run yet), else ``template`` at the file's first batch size and dtype.
    Files that name layers by name (``['blocks.0'].window.k``, as ``MemorySession.save_states``
    wrote before sessions kept a :class:`memkit.state.LayerStates`) load too, as do format
    version 1 files. Refused with :class:`memkit.CheckpointError`, saying what differs, for
    other memories or configurations, tensors of layers not listed in ``names``, or a
    damaged file.

    Args:
        path: a file saved by :func:`save_layer_states` (or :func:`memkit.save_states` of a
            tuple of per-layer states).
        names: the layers' names, in order (:attr:`memkit.state.LayerStates.names`).
        memories: each layer's memory, in the same order.
        template: ``(layer index, batch size, dtype or None) -> empty state``.
        absent_as_none: ``None`` for the layers the file holds nothing of.

    Example:
        >>> import os, tempfile, memkit
        >>> from memkit.layers import load_layer_states, save_layer_states
        >>> from memkit.state import LayerStates
        >>> mems = [memkit.FIFOMemory(2, 4, 1, frames=2), memkit.FIFOMemory(2, 4, 1, frames=3)]
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.safetensors")
        >>> save_layer_states(path, LayerStates([mems[0].init_state(3), None], ["a", "b"]), mems)
        >>> back = load_layer_states(path, ["a", "b"], mems, lambda i, b, dt: mems[i].init_state(b, dtype=dt),
        ...                          absent_as_none=True)
        >>> back.names, back["a"].window.k.shape[0], back["b"]
        (('a', 'b'), 3, None)
    """
    from memkit.io import load_states, read_header

    names = [str(n) for n in names]
    if len(names) != len(memories):
        raise CheckpointError(f"load_layer_states: {len(names)} layer names for {len(memories)} memories")
    header = read_header(path)
    saved_memories = header.get("memories", [])
    if len(saved_memories) != len(memories):  # said before the names, which then differ too
        raise CheckpointError(f"{path}: saved with {len(saved_memories)} memories, expected {len(memories)}")
    tensors: dict[str, Any] = header["tensors"]
    # a tensor's first path element is its layer: its place ([0]), or its name (['blocks.0'])
    by_name = any(re.match(r"\[\d+\]", key) is None for key in tensors)
    prefixes = [f"[{name!r}]" if by_name else f"[{i}]" for i, name in enumerate(names)]
    held: list[list[dict[str, Any]]] = [[] for _ in names]
    stray: list[str] = []
    for key, desc in tensors.items():
        layer = next((i for i, p in enumerate(prefixes) if key == p or key.startswith((f"{p}.", f"{p}["))), None)
        if layer is None:
            stray.append(key)
        else:
            held[layer].append(desc)
    if stray:
        raise CheckpointError(
            f"{path}: the file holds tensors of layers other than {', '.join(map(repr, names))}: "
            f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} (saved for other layers, or not per layer?)"
        )
    everything = [desc for descs in held for desc in descs]
    states: list[Any] = []
    for i, descs in enumerate(held):
        if not descs and absent_as_none:
            states.append(None)
        else:
            states.append(template(i, *_batch_and_dtype(descs or everything)))
    if by_name:
        present = {name: s for name, s in zip(names, states, strict=True) if s is not None}
        loaded = load_states(path, present, list(memories))
        return LayerStates((loaded.get(name) for name in names), names)
    result: LayerStates = load_states(path, LayerStates(states, names), list(memories))
    return result


def _batch_and_dtype(descs: list[dict[str, Any]]) -> tuple[int, torch.dtype | None]:
    """The batch size (the first tensor's dimension 0, else 1) and first floating dtype of saved tensors."""
    batch = int(descs[0]["shape"][0]) if descs and descs[0]["shape"] else 1
    floats = [getattr(torch, d["dtype"].removeprefix("torch."), None) for d in descs]
    return batch, next((d for d in floats if isinstance(d, torch.dtype) and d.is_floating_point), None)
