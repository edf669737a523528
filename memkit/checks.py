"""The checks at a memory's doors: is this query, chunk, layout or state one this memory can take?

Every memory (frame memories and those that store no frames, such as
:class:`memkit.RecurrentMemory`) checks what a caller hands it with these, at ``read``,
``plan`` and ``write``; the errors are :mod:`memkit.errors` types whose message names the
dimension that differs. All of them are skipped when checks are switched off
(:func:`memkit.typing.set_checks`), inside ``torch.compile``, and inside memkit where the
data was checked already (:func:`memkit.typing.checking`).

The state checks that need a memory's ``init_state`` (:func:`check_init_args`,
:func:`check_state_matches`) live with the states in :mod:`memkit.state` and are
re-exported here, so a memory imports its door checks from one module.
"""

import torch
from torch import Tensor

from memkit.errors import ShapeError, StateError
from memkit.protocol import Chunk, Query, ReadLayout
from memkit.state import check_init_args, check_state_matches
from memkit.typing import checking

__all__ = [
    "check_query",
    "check_chunk",
    "check_layout",
    "check_state",
    "check_init_args",
    "check_state_matches",
]


def _check_heads(
    where: str, name: str, x: Tensor, batch_size: int, heads: int, head_dim: int, device: torch.device
) -> None:
    b, h, _, d = x.shape
    if b != batch_size:
        raise ShapeError(
            f"{where}: dimension b (batch) of {name} should be {batch_size} (the state's batch size), got {b}"
        )
    if h != heads:
        raise ShapeError(f"{where}: dimension h (heads) of {name} should be {heads}, got {h}")
    if d != head_dim:
        raise ShapeError(f"{where}: dimension d (head_dim) of {name} should be {head_dim}, got {d}")
    if x.device != device:
        raise ShapeError(f"{where}: {name.split('.')[0]} is on {x.device} but the state is on {device}")


def check_query(owner: str, query: Query, batch_size: int, heads: int, head_dim: int, device: torch.device) -> None:
    """Refuse a query whose batch, heads, head_dim or device does not match the memory/state.

    Example:
        >>> import torch, memkit
        >>> q = memkit.Query(torch.zeros(1, 2, 4, 8), torch.tensor([[0]]), 4)
        >>> check_query("MyMemory", q, 1, 2, 8, torch.device("cpu"))     # fits: nothing happens
        >>> check_query("MyMemory", q, 1, 3, 8, torch.device("cpu"))
        Traceback (most recent call last):
        ...
        memkit.errors.ShapeError: MyMemory.read: dimension h (heads) of query.q should be 3, got 2
    """
    if not checking():  # switched off, or inside memkit where it was checked already
        return
    if not isinstance(query, Query):
        raise ShapeError(f"{owner}.read: expected a memkit.Query, got {type(query).__name__}")
    _check_heads(f"{owner}.read", "query.q", query.q, batch_size, heads, head_dim, device)


def check_layout(owner: str, layout: ReadLayout, batch_size: int, device: torch.device) -> None:
    """Refuse a segment layout whose batch or device does not match the state (at ``plan``)."""
    if not checking():
        return
    if not isinstance(layout, ReadLayout):
        raise ShapeError(f"{owner}.plan: expected a memkit.ReadLayout, got {type(layout).__name__}")
    if layout.batch_size != batch_size:
        raise ShapeError(
            f"{owner}.plan: dimension b (batch) of layout.frame_positions should be {batch_size} (the state's), "
            f"got {layout.batch_size}"
        )
    if layout.frame_positions.device != device:
        raise ShapeError(f"{owner}.plan: layout is on {layout.frame_positions.device} but the state is on {device}")


def check_chunk(
    owner: str,
    chunk: Chunk,
    batch_size: int,
    heads: int,
    head_dim: int,
    device: torch.device,
    tokens_per_frame: int | None = None,
) -> None:
    """Refuse a chunk that does not fit the memory/state (and, if given, its frame size)."""
    if not checking():  # switched off, or inside memkit where it was checked already
        return
    if not isinstance(chunk, Chunk):
        raise ShapeError(f"{owner}.write: expected a memkit.Chunk, got {type(chunk).__name__}")
    _check_heads(f"{owner}.write", "chunk.k", chunk.k, batch_size, heads, head_dim, device)
    if tokens_per_frame is not None and chunk.tokens_per_frame != tokens_per_frame:
        raise ShapeError(
            f"{owner}.write: chunk.tokens_per_frame should be {tokens_per_frame} (the memory's frame size), "
            f"got {chunk.tokens_per_frame}"
        )


def check_state(owner: str, state: object, expected: type) -> None:
    """Refuse a state made by another kind of memory.

    Example:
        >>> import memkit
        >>> check_state("MyMemory.read", memkit.FIFOMemory(1, 2, 1).init_state(1), memkit.memories.RecurrentState)
        Traceback (most recent call last):
        ...
        memkit.errors.StateError: MyMemory.read: expected a RecurrentState, got SinkWindowState
    """
    if not checking():  # switched off, or inside memkit where it was checked already
        return
    if not isinstance(state, expected):
        raise StateError(f"{owner}: expected a {expected.__name__}, got {type(state).__name__}")
