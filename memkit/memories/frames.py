"""Pure functions on frame buffers: the building blocks of frame-storing memories.

Frame buffers keep keys/values as ``(b h F t d)`` (``F`` frame slots of ``t`` tokens)
with per-frame ``positions (b F)`` and ``valid (b F)``. Every function keeps shapes fixed:
choosing what to keep is a gather with computed indices, never a Python branch on data,
so the same code runs eagerly and under ``torch.compile(fullgraph=True)``.
"""

import torch
from einops import rearrange
from torch import Tensor

from memkit.errors import ShapeError, StateError
from memkit.protocol import Chunk, Context, Query


def split_frames(x: Tensor, tokens_per_frame: int) -> Tensor:
    """``(b h n d) -> (b h f t d)``, tokens laid out frame-major."""
    return rearrange(x, "b h (f t) d -> b h f t d", t=tokens_per_frame)


def gather_frames(x: Tensor, index: Tensor, axis: int) -> Tensor:
    """Select frames of ``x`` along ``axis`` with a per-batch ``index (b F')``."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = index.shape
    expanded = index.reshape(shape).expand(*x.shape[:axis], index.shape[1], *x.shape[axis + 1 :])
    return x.gather(axis, expanded)


def keep_last_valid(valid: Tensor, capacity: int) -> Tensor:
    """Indices ``(b capacity)`` of the newest ``capacity`` valid entries of ``valid (b L)``.

    Entries are in chronological (index) order; when fewer than ``capacity`` are valid the
    result starts with invalid entries. Deterministic: no two entries share a sort key.
    """
    length = valid.shape[1]
    if capacity > length:
        raise ValueError(f"capacity {capacity} exceeds the {length} candidate entries")
    order = torch.arange(length, device=valid.device)
    key = valid.long() * length + order  # valid after invalid, each group in order
    return key.argsort(dim=1)[:, length - capacity :]


def frames_to_context(k: Tensor, v: Tensor, positions: Tensor, valid: Tensor) -> Context:
    """A context from frame buffers ``k, v (b h F t d)``, ``positions, valid (b F)``."""
    b, h, _, t, _ = k.shape
    per_token_valid = valid.repeat_interleave(t, dim=1)[:, None, :].expand(b, h, -1)
    per_token_pos = positions.repeat_interleave(t, dim=1)[:, None, :].expand(b, h, -1)
    return Context(
        k=rearrange(k, "b h f t d -> b h (f t) d"),
        v=rearrange(v, "b h f t d -> b h (f t) d"),
        mask=per_token_valid,
        positions=per_token_pos,
    )


def check_query(owner: str, query: Query, batch_size: int, heads: int, head_dim: int, device: torch.device) -> None:
    """Refuse a query whose batch, heads, head_dim or device does not match the memory/state."""
    if not isinstance(query, Query):
        raise ShapeError(f"{owner}.read: expected a memkit.Query, got {type(query).__name__}")
    b, h, _, d = query.q.shape
    if b != batch_size:
        raise ShapeError(
            f"{owner}.read: dimension b (batch) of query.q should be {batch_size} (the state's batch size), got {b}"
        )
    if h != heads:
        raise ShapeError(f"{owner}.read: dimension h (heads) of query.q should be {heads}, got {h}")
    if d != head_dim:
        raise ShapeError(f"{owner}.read: dimension d (head_dim) of query.q should be {head_dim}, got {d}")
    if query.q.device != device:
        raise ShapeError(f"{owner}.read: query is on {query.q.device} but the state is on {device}")


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
    if not isinstance(chunk, Chunk):
        raise ShapeError(f"{owner}.write: expected a memkit.Chunk, got {type(chunk).__name__}")
    b, h, _, d = chunk.k.shape
    if b != batch_size:
        raise ShapeError(
            f"{owner}.write: dimension b (batch) of chunk.k should be {batch_size} (the state's batch size), got {b}"
        )
    if h != heads:
        raise ShapeError(f"{owner}.write: dimension h (heads) of chunk.k should be {heads}, got {h}")
    if d != head_dim:
        raise ShapeError(f"{owner}.write: dimension d (head_dim) of chunk.k should be {head_dim}, got {d}")
    if chunk.k.device != device:
        raise ShapeError(f"{owner}.write: chunk is on {chunk.k.device} but the state is on {device}")
    if tokens_per_frame is not None and chunk.tokens_per_frame != tokens_per_frame:
        raise ShapeError(
            f"{owner}.write: chunk.tokens_per_frame should be {tokens_per_frame} (the memory's frame size), "
            f"got {chunk.tokens_per_frame}"
        )


def check_state(owner: str, state: object, expected: type) -> None:
    """Refuse a state made by another kind of memory."""
    if not isinstance(state, expected):
        raise StateError(f"{owner}: expected a {expected.__name__}, got {type(state).__name__}")
