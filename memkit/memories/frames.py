"""Frame buffers: the sub-state every frame-storing memory is made of, and the pure functions under it.

A :class:`FrameBuffer` holds a fixed number of frame slots: keys/values ``(b h F t d)``
(``F`` slots of ``t`` tokens, keys before rotary), per-slot ``pos (b F)`` and
``valid (b F)``. Its operations (:meth:`FrameBuffer.empty`, :meth:`~FrameBuffer.place`,
:meth:`~FrameBuffer.gather`, :meth:`~FrameBuffer.newest`, :meth:`~FrameBuffer.to_context`,
and the sink rule :meth:`~FrameBuffer.write_sink`) are written once here, on top of the
functions below. Every function keeps shapes fixed: choosing what to keep is a gather with
computed indices, never a Python branch on data, so the same code runs eagerly and under
``torch.compile(fullgraph=True)``.

The door checks (``check_query``, ``check_chunk``, ``check_layout``, ``check_state``) serve
memories that store no frames too; they live in :mod:`memkit.checks` and are re-exported
here for code that imported them from this module.
"""

import math
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.protocol import Chunk, Context
from memkit.state import MemoryState, memory_state

__all__ = [
    "FrameBuffer",
    "split_frames",
    "gather_frames",
    "gather_per_head",
    "gather_per_head_all",
    "keep_last_valid",
    "frames_to_context",
    "rank_frames",
    "rank_key_base",
    "top_k_frames",
    "sink_sources",
    "ring_sources",
    "place_frames",
    "place_slots",
    # the door checks, re-exported from memkit.checks (their home since issue 13)
    "check_query",
    "check_chunk",
    "check_layout",
    "check_state",
]


def split_frames(x: Tensor, tokens_per_frame: int) -> Tensor:
    """``(b h n d) -> (b h f t d)``, tokens laid out frame-major."""
    return rearrange(x, "b h (f t) d -> b h f t d", t=tokens_per_frame)


def gather_frames(x: Tensor, index: Tensor, axis: int) -> Tensor:
    """Select frames of ``x`` along ``axis`` with a per-batch ``index (b F')``."""
    if 0 < axis < x.ndim - 1 and x.is_contiguous() and x.shape[axis] and index.shape[0] == x.shape[0]:
        # a frame is a contiguous row of everything after ``axis``: copying rows (index_select) is
        # several times faster than an element-wise gather with the index expanded over every element
        b, frames = x.shape[0], x.shape[axis]
        lead = x.shape[1:axis]
        outer = math.prod(lead)
        base = (torch.arange(b * outer, device=index.device) * frames).view(b, outer, 1)
        rows = x.reshape(b * outer * frames, -1).index_select(0, (base + index[:, None, :]).reshape(-1))
        return rows.view(b, *lead, index.shape[1], *x.shape[axis + 1 :])
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


def gather_per_head(x: Tensor, index: Tensor) -> Tensor:
    """Select frames of ``x (b h F ...)`` with a per-(batch, head) ``index (b h K)`` -> ``(b h K ...)``.

    Example:
        >>> gather_per_head(torch.arange(6.).reshape(1, 2, 3), torch.tensor([[[2], [0]]])).tolist()
        [[[2.0], [3.0]]]
    """
    return gather_per_head_all(index, x)[0]


def gather_per_head_all(index: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """:func:`gather_per_head` of each of ``xs`` (one shape ``(b h F ...)``, e.g. keys and values) by one ``index``.

    The rows to copy are worked out once for all of them.

    Example:
        >>> k, v = torch.arange(6.).reshape(1, 2, 3), -torch.arange(6.).reshape(1, 2, 3)
        >>> [t.tolist() for t in gather_per_head_all(torch.tensor([[[2], [0]]]), k, v)]
        [[[[2.0], [3.0]]], [[[-2.0], [-3.0]]]]
    """
    b, h, frames = xs[0].shape[:3]
    if frames and index.shape[:2] == (b, h) and all(x.is_contiguous() and x.shape == xs[0].shape for x in xs):
        # whole frames are contiguous rows: copying rows (index_select) is several times faster than
        # an element-wise gather with the index expanded over every token and channel (same values)
        rows = (index + _row_offsets(b, h, frames, index.device)).reshape(-1)
        return tuple(x.reshape(b * h * frames, -1).index_select(0, rows).view(*index.shape, *x.shape[3:]) for x in xs)
    return tuple(_gather_per_head_elementwise(x, index) for x in xs)


# (b, h, frames, device) -> the first row of each (batch, head) in a (b*h*frames, ...) view: the
# same small tensor at every step of every layer (never handed out: callers only add to it)
_OFFSETS: dict[tuple[int, int, int, torch.device], Tensor] = {}


def _row_offsets(b: int, h: int, frames: int, device: torch.device) -> Tensor:
    """``(b h 1)``: ``(i * h + j) * frames`` (kept per shape and device, except while compiling)."""
    if torch.compiler.is_compiling():
        return (torch.arange(b * h, device=device) * frames).view(b, h, 1)
    key = (b, h, frames, device)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        if len(_OFFSETS) >= 64:
            _OFFSETS.clear()
        offsets = _OFFSETS[key] = (torch.arange(b * h, device=device) * frames).view(b, h, 1)
    return offsets


def _gather_per_head_elementwise(x: Tensor, index: Tensor) -> Tensor:
    shape = (*index.shape, *([1] * (x.ndim - 3)))
    expanded = index.reshape(shape).expand(*index.shape, *x.shape[3:])
    return x.gather(2, expanded)


def rank_frames(scores: Tensor, valid: Tensor, priority: Tensor, priority_bound: int | None = None) -> Tensor:
    """Indices of every entry of the last dimension, best first (a total, deterministic order).

    Entries are ordered by: valid before invalid, then higher ``scores``, then higher
    ``priority`` (the tie-break, e.g. recency), then lower index. ``scores`` (float),
    ``valid`` (bool) and ``priority`` (int) share one shape ``(... L)``; NaN scores rank
    as ``-inf`` (and ``-0.0`` as ``0.0``). Three stable sorts (least significant key first)
    give a lexicographic order without mixing float and integer keys, and without
    data-dependent branches. With ``priority_bound`` (the caller promises
    ``0 <= priority < priority_bound <= 2**29``) the three keys are packed into one integer
    and a single stable sort gives the same order (the per-step routing of SparseKV and
    MemFlow's SMA); :func:`_rank_three_sorts` is the reference it is tested against.

    Example:
        >>> rank_frames(torch.tensor([1.0, 3.0, 3.0, 9.0]), torch.tensor([True, True, True, False]),
        ...             torch.tensor([0, 1, 2, 3])).tolist()
        [2, 1, 0, 3]
        >>> rank_frames(torch.tensor([1.0, 3.0, 3.0, 9.0]), torch.tensor([True, True, True, False]),
        ...             torch.tensor([0, 1, 2, 3]), priority_bound=4).tolist()
        [2, 1, 0, 3]
    """
    if priority_bound is None:
        return _rank_three_sorts(scores, valid, priority)
    return _packed_key(scores, valid, priority, priority_bound).argsort(dim=-1, descending=True, stable=True)


def _packed_key(scores: Tensor, valid: Tensor, priority: Tensor, priority_bound: int) -> Tensor:
    """:func:`rank_frames`' order as one int64 per entry (larger ranks first): valid, then score, then priority."""
    return _add_scores(rank_key_base(valid, priority, priority_bound), scores)


def rank_key_base(valid: Tensor, priority: Tensor, priority_bound: int) -> Tensor:
    """The part of the packed rank key no score changes (int64, ``valid``'s shape): validity and priority.

    Work it out once where validity and priority are fixed for many rankings (SparseKV's read
    plan, for every denoising step of a segment) and pass it to :func:`top_k_frames` as
    ``key_base``. Requires ``0 <= priority < priority_bound <= 2**29``.

    Example:
        >>> base = rank_key_base(torch.tensor([True, False]), torch.tensor([1, 0]), 2)
        >>> top_k_frames(torch.tensor([0.5, 9.0]), torch.tensor([True, False]), torch.tensor([1, 0]), 1,
        ...              priority_bound=2, distinct_priority=True, key_base=base)[0].tolist()
        [0]
    """
    if not 0 < priority_bound <= 1 << 29:
        raise ValueError(f"rank_frames: priority_bound must be in 1..2**29, got {priority_bound}")
    return (valid.long() << 62) + priority.long() + (1 << 60)


def _add_scores(base: Tensor, scores: Tensor) -> Tensor:
    """``base`` with the scores' order packed above the priority's bits."""
    s = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    bits = (s + 0.0).view(torch.int32)  # + 0.0 makes -0.0 equal 0.0
    # an int32 with the floats' order (negative floats' magnitude bits flipped); rank_key_base's
    # + 2**60 shifts it, times 2**29, to [0, 2**61): above the priority's bits, below the valid bit
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return torch.add(base, ordered, alpha=1 << 29)


def _rank_three_sorts(scores: Tensor, valid: Tensor, priority: Tensor) -> Tensor:
    """:func:`rank_frames` by three stable sorts (the reference; any integer priority)."""
    order = priority.argsort(dim=-1, descending=True, stable=True)
    s = scores.float().gather(-1, order)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    order = order.gather(-1, s.argsort(dim=-1, descending=True, stable=True))
    ok = valid.gather(-1, order).to(torch.uint8)
    return order.gather(-1, ok.argsort(dim=-1, descending=True, stable=True))


def top_k_frames(
    scores: Tensor,
    valid: Tensor,
    priority: Tensor,
    k: int,
    priority_bound: int | None = None,
    *,
    distinct_priority: bool = False,
    key_base: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` best entries by :func:`rank_frames`: indices ``(... k)`` and their validity ``(... k)``.

    Invalid entries are returned (marked invalid) only when fewer than ``k`` are valid. With
    ``distinct_priority`` (and ``priority_bound``) the caller promises that no two entries of
    a row share a priority (SparseKV's recency is a permutation of its slots): the packed keys
    are then distinct, so ``torch.topk`` picks the same ``k`` in the same order as the full
    sort, at a fraction of its cost. ``key_base``: :func:`rank_key_base` of these ``valid`` and
    ``priority``, worked out earlier (used on the ``distinct_priority`` path).

    Example:
        >>> idx, ok = top_k_frames(torch.tensor([[0.5, 2.0, 1.0]]), torch.tensor([[True, False, True]]),
        ...                        torch.zeros(1, 3, dtype=torch.long), 2)
        >>> idx.tolist(), ok.tolist()
        ([[2, 0]], [[True, True]])
    """
    length = scores.shape[-1]
    if not 0 < k <= length:
        raise ValueError(f"top_k_frames: k must be in 1..{length} (the number of candidates), got {k}")
    if distinct_priority and priority_bound is not None:
        base = rank_key_base(valid, priority, priority_bound) if key_base is None else key_base
        key, index = _add_scores(base, scores).topk(k, dim=-1)
        return index, key >= 1 << 62  # the valid bit
    index = rank_frames(scores, valid, priority, priority_bound)[..., :k]
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
    if old_k.shape[2] == 0:
        return old_k, old_v, old_pos, old_valid
    landing = _landing(src, take, k.shape[2], old_k.shape[1])  # keys and values land in the same slots
    return (
        _copy_rows(old_k, k, src, take, landing),
        _copy_rows(old_v, v, src, take, landing),
        torch.where(take, pos.gather(1, src), old_pos),
        old_valid | take,
    )


def place_slots(old: Tensor, new: Tensor, src: Tensor, take: Tensor) -> Tensor:
    """``old (b h S ...)`` with slot ``j`` replaced by ``new (b h f ...)``'s frame ``src[:, j]`` where ``take[:, j]``.

    ``src, take (b S)`` map each slot to at most one new frame and each new frame to at most
    one slot (what :func:`sink_sources` and :func:`ring_sources` give). Equal to
    ``torch.where(take, gather_frames(new, src, 2), old)``, written as a copy of ``old`` and
    ``f`` row copies: a write costs one pass over the buffer, not a gather and a select over
    every slot.

    Example:
        >>> old, new = torch.zeros(1, 1, 4, 2), torch.ones(1, 1, 2, 2)
        >>> place_slots(old, new, torch.tensor([[0, 0, 1, 0]]), torch.tensor([[False, False, True, True]]))[0, 0, :, 0]
        tensor([0., 0., 1., 1.])
    """
    if old.shape[2] == 0:
        return old
    return _copy_rows(old, new, src, take, _landing(src, take, new.shape[2], old.shape[1]))


def _landing(src: Tensor, take: Tensor, frames: int, heads: int) -> tuple[Tensor, Tensor]:
    """Where each new frame lands: whether it does ``(b f)`` and its row in a ``(b*h*S, ...)`` view ``(b*h*f,)``."""
    b, slots = take.shape
    hit = take[:, :, None] & (src[:, :, None] == torch.arange(frames, device=src.device))  # (b S f)
    lands = hit.any(dim=1)
    dest = hit.to(torch.uint8).argmax(dim=1)  # the first (only) hit; 0 for a frame that lands nowhere
    index = (torch.arange(b * heads, device=src.device) * slots).view(b, heads, 1) + dest[:, None, :]
    return lands, index.reshape(-1)


def _copy_rows(old: Tensor, new: Tensor, src: Tensor, take: Tensor, landing: tuple[Tensor, Tensor]) -> Tensor:
    """:func:`place_slots` given the frames' landing (see :func:`_landing`)."""
    lands, index = landing
    # a frame that lands nowhere is copied to slot 0 with slot 0's final value: every copy into a
    # slot then carries the same bits, so the order of duplicate copies cannot change the result
    first = torch.where(_slot_mask(take[:, :1], old), gather_frames(new, src[:, :1], 2), old[:, :, :1])
    rows = torch.where(_slot_mask(lands, old), new, first).to(old.dtype)  # (b h f ...)
    b, h, slots = old.shape[:3]
    flat = old.reshape(b * h * slots, -1).index_copy(0, index, rows.reshape(index.shape[0], -1))
    return flat.view(old.shape)


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


def _slot_mask(mask: Tensor, x: Tensor) -> Tensor:
    """A ``(b F)`` (or ``(b 1)``) slot mask shaped to broadcast against ``x``: ``(b F)`` or ``(b h F ...)``."""
    return mask if x.ndim == 2 else mask.view(*mask.shape[:1], 1, mask.shape[1], *([1] * (x.ndim - 3)))


@memory_state
class FrameBuffer(MemoryState):
    """A fixed number of frame slots: keys, values, frame positions and which slots hold a frame.

    The sub-state frame memories are made of (a sink, a sliding window, a ring, a bank...);
    its operations are written once here. A memory's state holds one per buffer, so its
    tensors are named ``state.sink.k``, ``state.window.pos`` (in files: ``.sink.k``). Like any
    state it is a frozen pytree: every method returns a new buffer, shapes never change, and
    no method branches on tensor values (``torch.compile(fullgraph=True)`` traces it).

    Attributes:
        k, v: ``(b h F t d)`` keys (before rotary) and values of ``F`` slots of ``t`` tokens.
        pos: ``(b F)`` integer frame position of each slot (where its keys are rotated).
        valid: ``(b F)`` which slots hold a frame (an empty slot is never attended to).

    Example:
        >>> import torch, memkit
        >>> from memkit.memories.frames import FrameBuffer
        >>> buf = FrameBuffer.empty(1, heads=2, frames=3, tokens_per_frame=4, head_dim=8)
        >>> k = torch.randn(1, 2, 8, 8)   # a chunk of 2 frames of 4 tokens
        >>> new = FrameBuffer.from_chunk(memkit.Chunk(k, k, torch.zeros(1, 8, 16), torch.tensor([[5, 6]]), 4))
        >>> buf = buf.cat(new).newest(3)      # the newest 3 valid frames, oldest first
        >>> buf.pos.tolist(), buf.valid.tolist(), buf.to_context().k.shape
        ([[0, 5, 6]], [[False, True, True]], torch.Size([1, 2, 12, 8]))
    """

    #: each field's layout: how a buffer of another size is reported (the holding state may rename ``F``)
    layouts: ClassVar[dict[str, str]] = {"k": "b h F t d", "v": "b h F t d", "pos": "b F", "valid": "b F"}

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor

    @classmethod
    def empty(
        cls,
        batch_size: int,
        heads: int,
        frames: int,
        tokens_per_frame: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "FrameBuffer":
        """``frames`` empty slots: zero keys and values (``dtype``), positions 0, nothing valid."""
        dtype = dtype or torch.get_default_dtype()
        shape = (batch_size, heads, frames, tokens_per_frame, head_dim)
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            pos=torch.zeros((batch_size, frames), device=device, dtype=torch.long),
            valid=torch.zeros((batch_size, frames), device=device, dtype=torch.bool),
        )

    @classmethod
    def from_chunk(
        cls, chunk: Chunk, tokens_per_frame: int | None = None, dtype: torch.dtype | None = None
    ) -> "FrameBuffer":
        """A finished segment's ``f`` frames as a buffer, every slot valid; keys and values cast to ``dtype``.

        ``tokens_per_frame`` defaults to the chunk's own.
        """
        t = chunk.tokens_per_frame if tokens_per_frame is None else tokens_per_frame
        pos = chunk.frame_positions.long()
        return cls(
            k=split_frames(chunk.k.to(dtype) if dtype is not None else chunk.k, t),
            v=split_frames(chunk.v.to(dtype) if dtype is not None else chunk.v, t),
            pos=pos,
            valid=torch.ones_like(pos, dtype=torch.bool),
        )

    @property
    def frames(self) -> int:
        """``F``, the number of slots."""
        return int(self.k.shape[2])

    def to_context(self) -> Context:
        """The buffer as a read's context: ``(b h F*t d)`` keys and values, per-slot mask and positions."""
        return frames_to_context(self.k, self.v, self.pos, self.valid)

    def cat(self, *others: "FrameBuffer") -> "FrameBuffer":
        """This buffer's slots followed by ``others``' (same batch, heads, tokens per frame and head_dim)."""
        parts = (self, *others)
        return FrameBuffer(
            k=torch.cat([p.k for p in parts], dim=2),
            v=torch.cat([p.v for p in parts], dim=2),
            pos=torch.cat([p.pos for p in parts], dim=1),
            valid=torch.cat([p.valid for p in parts], dim=1),
        )

    def gather(self, index: Tensor) -> "FrameBuffer":
        """The slots ``index (b F')`` of each batch item, in that order."""
        return FrameBuffer(
            k=gather_frames(self.k, index, 2),
            v=gather_frames(self.v, index, 2),
            pos=self.pos.gather(1, index),
            valid=self.valid.gather(1, index),
        )

    def slots(self, start: int, stop: int | None = None) -> "FrameBuffer":
        """Slots ``start .. stop-1`` (a fixed range, the same for every batch item)."""
        return FrameBuffer(
            k=self.k[:, :, start:stop],
            v=self.v[:, :, start:stop],
            pos=self.pos[:, start:stop],
            valid=self.valid[:, start:stop],
        )

    def newest(self, capacity: int) -> "FrameBuffer":
        """The newest ``capacity`` valid slots (by slot order), oldest first; empty slots first when fewer."""
        return self.gather(keep_last_valid(self.valid, capacity))

    def where(self, mask: Tensor, other: "FrameBuffer") -> "FrameBuffer":
        """Per slot, this buffer's frame where ``mask (b F)`` (or ``(b 1)``, per batch item), else ``other``'s."""
        return FrameBuffer(
            *(
                torch.where(_slot_mask(mask, a), a, b)
                for a, b in ((self.k, other.k), (self.v, other.v), (self.pos, other.pos), (self.valid, other.valid))
            )
        )

    def place(self, new: "FrameBuffer", src: Tensor, take: Tensor) -> "FrameBuffer":
        """Slot ``j`` takes ``new``'s frame ``src[:, j]`` where ``take[:, j]`` (and becomes valid); others stay.

        ``src, take (b F)`` come from :func:`sink_sources` or :func:`ring_sources`.
        """
        return FrameBuffer(*place_frames((self.k, self.v, self.pos, self.valid), (new.k, new.v, new.pos), src, take))

    def write_sink(self, new: "FrameBuffer", frames_seen: Tensor) -> tuple["FrameBuffer", Tensor]:
        """This buffer as a sink: the first ``F`` frames ever seen go here, and stay.

        ``frames_seen (b,)`` counts the frames written before ``new``. Returns the sink after
        ``new``'s frames and ``past (b f)``: which of them did not go to the sink (they go on to
        the memory's other buffers).

        Example:
            >>> sink = FrameBuffer.empty(1, 1, 2, 1, 1)
            >>> new = FrameBuffer(torch.ones(1, 1, 3, 1, 1), torch.ones(1, 1, 3, 1, 1), torch.tensor([[4, 5, 6]]),
            ...                   torch.ones(1, 3, dtype=torch.bool))
            >>> sink, past = sink.write_sink(new, torch.tensor([0]))   # the first frames ever written
            >>> sink.pos.tolist(), sink.valid.tolist(), past.tolist()
            ([[4, 5]], [[True, True]], [[False, False, True]])
            >>> sink.write_sink(new, torch.tensor([3]))[0].pos.tolist()   # later frames never enter it
            [[4, 5]]
        """
        f = new.pos.shape[1]
        src, take = sink_sources(frames_seen, self.frames, f)
        to_sink = (frames_seen[:, None] + torch.arange(f, device=new.pos.device)) < self.frames  # (b f)
        return self.place(new, src, take), ~to_sink
