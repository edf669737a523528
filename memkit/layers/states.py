"""A model's memory states, one life cycle: init (and reset), save, load.

The states of every :class:`MemoryAttention` of a model live in one
:class:`memkit.state.LayerStates` (a tuple in module order, keyed by layer name). The
reference backbone (:meth:`memkit.models.malt.MALTNetwork.init_states`) and the tiny host
make theirs here; states are values, so a reset is a fresh :func:`init_memory_states`.
"""

import os
from typing import Any

import torch
from torch import nn

from memkit.layers.memory_attention import MemoryAttention, memory_layers
from memkit.state import LayerStates

__all__ = ["init_memory_states", "save_memory_states", "load_memory_states"]


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
    from memkit.io import save_states

    save_states(path, states, [layer.memory for layer in memory_layers(model)])


def load_memory_states(
    path: str | os.PathLike[str], model: nn.Module, *, device: torch.device | str | None = None
) -> LayerStates:
    """Load states saved for ``model`` (by :func:`save_memory_states` or :func:`memkit.save_states`).

    No template needed: the file's tensors say the batch size and dtype; the states land on
    ``device`` (default: each layer's). Refused with :class:`memkit.CheckpointError`, saying
    what differs, for another model's memories or a damaged file. Files saved from a plain
    tuple of states load too (the tensors are named the same).
    """
    from memkit.io import load_states, read_header

    tensors = read_header(path)["tensors"]
    first = next(iter(tensors.values()), None)
    batch = int(first["shape"][0]) if first and first["shape"] else 1
    floats = [getattr(torch, t["dtype"].removeprefix("torch."), None) for t in tensors.values()]
    dtype = next((d for d in floats if isinstance(d, torch.dtype) and d.is_floating_point), None)
    template = init_memory_states(model, batch, device=device, dtype=dtype)
    loaded: LayerStates = load_states(path, template, [layer.memory for layer in memory_layers(model)])
    return loaded
