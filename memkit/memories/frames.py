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
from memkit.protocol import Chunk, Context, Query, ReadLayout
from memkit.typing import checking


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
    """Refuse a query whose batch, heads, head_dim or device does not match the memory/state."""
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
    """Refuse a state made by another kind of memory."""
    if not checking():  # switched off, or inside memkit where it was checked already
        return
    if not isinstance(state, expected):
        raise StateError(f"{owner}: expected a {expected.__name__}, got {type(state).__name__}")


def gather_per_head(x: Tensor, index: Tensor) -> Tensor:
    """Select frames of ``x (b h F ...)`` with a per-(batch, head) ``index (b h K)`` -> ``(b h K ...)``.

    Example:
        >>> gather_per_head(torch.arange(6.).reshape(1, 2, 3), torch.tensor([[[2], [0]]])).tolist()
        [[[2.0], [3.0]]]
    """
    shape = (*index.shape, *([1] * (x.ndim - 3)))
    expanded = index.reshape(shape).expand(*index.shape, *x.shape[3:])
    return x.gather(2, expanded)


def rank_frames(scores: Tensor, valid: Tensor, priority: Tensor) -> Tensor:
    """Indices of every entry of the last dimension, best first (a total, deterministic order).

    Entries are ordered by: valid before invalid, then higher ``scores``, then higher
    ``priority`` (the tie-break, e.g. recency), then lower index. ``scores`` (float),
    ``valid`` (bool) and ``priority`` (int) share one shape ``(... L)``; NaN scores rank
    as ``-inf``. Three stable sorts (least significant key first) give a lexicographic
    order without mixing float and integer keys, and without data-dependent branches.

    Example:
        >>> rank_frames(torch.tensor([1.0, 3.0, 3.0, 9.0]), torch.tensor([True, True, True, False]),
        ...             torch.tensor([0, 1, 2, 3])).tolist()
        [2, 1, 0, 3]
    """
    order = priority.argsort(dim=-1, descending=True, stable=True)
    s = scores.float().gather(-1, order)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    order = order.gather(-1, s.argsort(dim=-1, descending=True, stable=True))
    ok = valid.gather(-1, order).to(torch.uint8)
    return order.gather(-1, ok.argsort(dim=-1, descending=True, stable=True))


def top_k_frames(scores: Tensor, valid: Tensor, priority: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best entries by :func:`rank_frames`: indices ``(... k)`` and their validity ``(... k)``.

    Invalid entries are returned (marked invalid) only when fewer than ``k`` are valid.

    Example:
        >>> idx, ok = top_k_frames(torch.tensor([[0.5, 2.0, 1.0]]), torch.tensor([[True, False, True]]),
        ...                        torch.zeros(1, 3, dtype=torch.long), 2)
        >>> idx.tolist(), ok.tolist()
        ([[2, 0]], [[True, True]])
    """
    length = scores.shape[-1]
    if not 0 < k <= length:
        raise ValueError(f"top_k_frames: k must be in 1..{length} (the number of candidates), got {k}")
    index = rank_frames(scores, valid, priority)[..., :k]
    return index, valid.gather(-1, index)


def sink_sources(frames_seen: Tensor, sink_frames: int, num_frames: int) -> tuple[Tensor, Tensor]:
    """Which new frame fills each sink slot: source index ``(b S)`` and whether it does ``(b S)``.

    The sink holds the first ``sink_frames`` frames ever written; slot ``j`` takes new
    frame ``j - frames_seen`` when that frame exists in a chunk of ``num_frames`` frames.

    Example:
        >>> src, take = sink_sources(torch.tensor([1]), 3, 4)
        >>> src.tolist(), take.tolist()
        ([[0, 0, 1]], [[False, True, True]])
    """
    src = torch.arange(sink_frames, device=frames_seen.device) - frames_seen[:, None]
    take = (src >= 0) & (src < num_frames)
    return src.clamp(0, max(num_frames - 1, 0)), take


def place_frames(
    buffers: tuple[Tensor, Tensor, Tensor, Tensor],
    frames: tuple[Tensor, Tensor, Tensor],
    src: Tensor,
    take: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Copy new frames into buffer slots: slot ``j`` takes new frame ``src[:, j]`` where ``take[:, j]``.

    ``buffers`` are ``(k, v, positions, valid)`` with ``k, v (b h S t d)`` and
    ``positions, valid (b S)``; ``frames`` are the new ``(k, v, positions)`` with
    ``k, v (b h f t d)`` and ``positions (b f)``; ``src, take (b S)`` come from
    :func:`sink_sources` or :func:`ring_sources`. Slots not taken keep what they held.
    """
    old_k, old_v, old_pos, old_valid = buffers
    k, v, pos = frames
    take5 = take[:, None, :, None, None]
    return (
        torch.where(take5, gather_frames(k, src, 2), old_k),
        torch.where(take5, gather_frames(v, src, 2), old_v),
        torch.where(take, pos.gather(1, src), old_pos),
        old_valid | take,
    )


def ring_sources(start: Tensor, first: Tensor, num_frames: int, capacity: int) -> tuple[Tensor, Tensor]:
    """Which new frame lands in each slot of a ring buffer: source ``(b C)`` and whether any does ``(b C)``.

    New frames ``first .. num_frames-1`` of a chunk (``first (b,)``) get ring indices
    ``start, start+1, ...`` (``start (b,)`` frames written to the ring so far) and go to slot
    ``index % capacity``. When a chunk has more frames than the ring, only the last
    ``capacity`` survive, so each slot takes at most one frame: written as a gather, not a
    scatter with colliding indices.

    Example:
        >>> src, take = ring_sources(torch.tensor([2]), torch.tensor([0]), 2, 3)
        >>> src.tolist(), take.tolist()
        ([[1, 0, 0]], [[True, False, True]])
    """
    count = num_frames - first  # (b,) frames going to the ring
    last_index = start + count - 1  # ring index of the newest new frame
    slots = torch.arange(capacity, device=start.device)
    last = last_index[:, None] - torch.remainder(last_index[:, None] - slots, capacity)  # (b C)
    take = last >= start[:, None]
    src = first[:, None] + last - start[:, None]
    return src.clamp(0, max(num_frames - 1, 0)), take
