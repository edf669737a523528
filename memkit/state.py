"""Memory state: immutable dataclasses of tensors that are torch pytrees.

A memory module holds parameters only; everything that changes from segment to segment
lives in a state object that flows in and out of ``read`` and ``write``. Declaring a
state is one decorator::

    @memory_state
    class MyState(MemoryState):
        keys: Tensor      # (b h m d)
        count: Tensor     # (b,)

Every field is a tensor (or ``None``) whose first dimension is the batch, so batch
selection, ``.to(device)``, ``detach()`` and pytree maps work on any state. Shapes are
fixed by ``init_state``: nothing grows with the length of the video.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from memkit.errors import StateError

__all__ = ["MemoryState", "memory_state", "state_nbytes", "map_tensors"]

S = TypeVar("S")
T = TypeVar("T", bound="MemoryState")


def map_tensors(fn: Callable[[Tensor], Tensor], tree: S) -> S:
    """Apply ``fn`` to every tensor leaf of a pytree (states, tuples of states...)."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, Tensor) else x, tree)


def state_nbytes(tree: Any) -> int:
    """Bytes held by every tensor in a pytree of states."""
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(tree) if isinstance(x, Tensor))


class MemoryState:
    """Base class of memory states (use with :func:`memory_state`).

    Methods return new states; a state is never changed in place.
    """

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant over a stream)."""
        return state_nbytes(self)

    @property
    def batch_size(self) -> int:
        """The batch size the state was made for (the first dimension of its tensors)."""
        for leaf in pytree.tree_leaves(self):
            if isinstance(leaf, Tensor):
                return int(leaf.shape[0])
        raise StateError(f"{type(self).__name__} has no tensors, so no batch size")

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields replaced (the dataclasses.replace of this state)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to(self: T, *args: Any, **kwargs: Any) -> T:
        """Move or cast every tensor, as ``Tensor.to``; integer and boolean tensors keep their dtype."""

        def move(x: Tensor) -> Tensor:
            if x.is_floating_point():
                return x.to(*args, **kwargs)
            device = kwargs.get("device")
            for a in args:
                if isinstance(a, (torch.device, str)):
                    device = a
            return x.to(device=device) if device is not None else x

        return map_tensors(move, self)

    def detach(self: T) -> T:
        """Cut the autograd history of every tensor (truncated backprop between segments)."""
        return map_tensors(Tensor.detach, self)

    def index_batch(self: T, index: int | slice | Tensor | list[int]) -> T:
        """Select batch items; an integer keeps the batch dimension (size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return map_tensors(lambda x: x[index], self)


@dataclass_transform(frozen_default=True, eq_default=False)
def memory_state(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass registered as a torch pytree.

    Its fields become the pytree's children, in declaration order, so
    ``torch.utils._pytree.tree_map``, ``torch.compile`` and ``torch.save`` see through it.
    """
    dc = dataclasses.dataclass(frozen=True, eq=False)(cls)
    pytree.register_dataclass(dc)
    return dc
