"""``SparseKVMemory``: a ring buffer of recent frames read through top-k routing (MoC-style; not MemFlow's pool)."""

from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.memories.frames import (
    FrameBuffer,
    gather_per_head_all,
    place_slots,
    rank_key_base,
    ring_sources,
    top_k_frames,
)
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked

__all__ = ["SparseKVMemory", "SparseKVState"]


@memory_state
class SparseKVState(MemoryState):
    """State of :class:`SparseKVMemory`.

    Attributes:
        ring: a :class:`memkit.memories.frames.FrameBuffer` of ``C`` slots: past frames' keys (before
            rotary), values, frame positions and which slots hold a frame.
        desc: ``(b h C d)`` each ring frame's routing descriptor: its keys mean-pooled over its tokens.
        sink: a ``FrameBuffer`` of ``A`` slots: the first ``A`` frames ever written (always returned).
        frames_seen: ``(b,)`` frames written so far (the ring's write counter is
            ``max(frames_seen - A, 0)``).

    Files saved before the buffers (format version 1) named these ``k, v, pos, valid`` and
    ``sink_k ... sink_valid``; :func:`memkit.load_states` maps the old names.

    Example:
        >>> import memkit
        >>> s = memkit.SparseKVMemory(heads=2, head_dim=8, tokens_per_frame=4, capacity=5).init_state(3)
        >>> s.ring.k.shape, s.desc.shape, s.ring.valid.shape
        (torch.Size([3, 2, 5, 4, 8]), torch.Size([3, 2, 5, 8]), torch.Size([3, 5]))
    """

    #: each field's layout (a buffer's: the letter of its slots): how a state of another configuration is reported
    layouts: ClassVar[dict[str, str]] = {"ring": "C", "desc": "b h C d", "sink": "A", "frames_seen": "b"}

    ring: FrameBuffer
    desc: Tensor
    sink: FrameBuffer
    frames_seen: Tensor


class SparseKVMemory:
    """Past frames in a fixed ring buffer; each read returns only the top-k most relevant.

    The routing of Mixture of Contexts and of MemFlow's Sparse Memory Activation, over a
    different pool than MemFlow's (which routes over its sink + bank and keeps its recent
    window dense: that is :class:`MemFlowMemory`). The current segment's queries are
    mean-pooled to one vector per (batch, head); every stored frame has one descriptor per head
    (its keys mean-pooled); the score is their dot product,
    and each head attends only to its ``top_k`` best frames (heads choose independently, so
    ``Context.positions`` differ per head). The first ``always_frames`` frames ever written
    live in a separate sink and are always returned (MoC's mandatory anchors, LongLive's frame
    sink); every frame sits in exactly one of the sink and the ring.

    Ties are broken deterministically: equal scores prefer the more recently written frame.
    Invalid (empty) slots are never selected; with fewer than ``top_k`` valid frames the extra
    returned slots are masked invalid. With ``top_k >= capacity`` a read returns every stored
    frame, so attention over it equals dense attention over the whole buffer.

    Read returns ``(A + K) * t`` slots per head, ``K = min(top_k, capacity)``, sink first.

    Cost: ``read`` O(b h (n d + C d + C log K + K t d)) (pool queries, score, top-k, gather);
    ``write`` O(b h (C + A) t d) (a pure write copies the buffers).
    State bytes: ``b h (2 (C + A) t d + C d) * itemsize + 9 b (C + A) + 8 b``.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``, tokens in one frame.
        capacity: ``C``, frames in the ring buffer (the newest ``C`` non-sink frames).
        top_k: ``K``, frames each head reads from the ring.
        always_frames: ``A``, first frames kept in the sink and always returned.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.SparseKVMemory(heads=2, head_dim=8, tokens_per_frame=4, capacity=6, top_k=2)
        >>> state = mem.init_state(1)
        >>> k = torch.randn(1, 2, 16, 8)  # 4 frames of 4 tokens
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 16, 32), torch.tensor([[0, 1, 2, 3]]), 4))
        >>> q = memkit.Query(torch.randn(1, 2, 8, 8), torch.tensor([[4, 5]]), tokens_per_frame=4)
        >>> ctx = mem.read(state, q)
        >>> ctx.k.shape, bool(ctx.mask.all())   # 2 frames x 4 tokens per head, all valid
        (torch.Size([1, 2, 8, 8]), True)
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        capacity: int = 16,
        top_k: int = 3,
        always_frames: int = 0,
    ) -> None:
        if min(heads, head_dim, tokens_per_frame) < 1:
            raise ValueError(
                f"SparseKVMemory: heads, head_dim and tokens_per_frame must be positive, "
                f"got {heads}, {head_dim}, {tokens_per_frame}"
            )
        if capacity < 1 or top_k < 1 or always_frames < 0:
            raise ValueError(
                f"SparseKVMemory: capacity and top_k must be positive and always_frames non-negative, "
                f"got capacity={capacity}, top_k={top_k}, always_frames={always_frames}"
            )
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.capacity, self.top_k, self.always_frames = capacity, top_k, always_frames

    @property
    def _name(self) -> str:
        return type(self).__name__

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseKVState:
        """The empty state: every slot invalid, shapes fixed from here on."""
        batch_size = check_init_args(f"{self._name}.init_state", batch_size, device, dtype)
        dtype = dtype or torch.get_default_dtype()
        b, h, t, d = batch_size, self.heads, self.tokens_per_frame, self.head_dim
        c, a = self.capacity, self.always_frames

        return SparseKVState(
            ring=FrameBuffer.empty(b, h, c, t, d, device=device, dtype=dtype),
            desc=torch.zeros((b, h, c, d), device=device, dtype=dtype),
            sink=FrameBuffer.empty(b, h, a, t, d, device=device, dtype=dtype),
            frames_seen=torch.zeros((b,), device=device, dtype=torch.long),
        )

    def _recency(self, state: SparseKVState) -> Tensor:
        """``(b C)``: larger for more recently written ring slots (the tie-break)."""
        ring_count = (state.frames_seen - self.always_frames).clamp(min=0)
        slots = torch.arange(self.capacity, device=ring_count.device)
        # slot ring_count % C is the oldest (next to be overwritten): recency 0; the newest C-1
        return torch.remainder(slots - ring_count[:, None], self.capacity)

    @typechecked
    def read(self, state: SparseKVState, query: Query) -> Context:
        """The sink, then each head's top-k ring frames: ``(b h (A + K)*t d)``."""
        check_state(f"{self._name}.read", state, SparseKVState)
        check_state_matches(f"{self._name}.read", state, self)
        check_query(self._name, query, state.batch_size, self.heads, self.head_dim, state.ring.k.device)
        selected = self._select(state, self._candidates(state), query.q)
        if self.always_frames == 0:
            return selected
        return Context.concat([state.sink.to_context(), selected])

    @typechecked
    def plan(self, state: SparseKVState, layout: ReadLayout) -> ReadPlan:
        """The sink prepared once per segment; the top-k choice waits for each step's queries."""
        check_state(f"{self._name}.plan", state, SparseKVState)
        check_state_matches(f"{self._name}.plan", state, self)
        check_layout(self._name, layout, state.batch_size, state.ring.k.device)
        extra = self._candidates(state)
        if self.always_frames == 0:
            return ReadPlan(parts=(None,), state=state, extra=extra)
        return ReadPlan(parts=(state.sink.to_context(), None), state=state, extra=extra)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return (self._select(plan.state, plan.extra, query.q),)

    def _candidates(self, state: SparseKVState) -> tuple[Tensor, ...]:
        """What routing needs that no query changes (a plan's, once per segment): descriptors, validity,
        recency, their packed rank key and positions, ``(b h C ...)``."""
        b, h, c, _, _ = state.ring.k.shape
        valid = state.ring.valid[:, None, :].expand(b, h, c)
        priority = self._recency(state)[:, None, :].expand(b, h, c)
        base = rank_key_base(valid, priority, c)
        return state.desc.float(), valid, priority, base, state.ring.pos[:, None, :].expand(b, h, c)

    def _select(self, state: SparseKVState, candidates: tuple[Tensor, ...], q: Tensor) -> Context:
        """Each head's top-k ring frames for queries ``q``: ``(b h K*t d)``."""
        desc, valid, priority, base, positions = candidates
        t, c = state.ring.k.shape[3], state.ring.k.shape[2]
        routed = q.float().mean(dim=2)  # (b h d)
        scores = torch.einsum("bhcd,bhd->bhc", desc, routed)
        # recency is a permutation of the slots, in [0, C): one packed key, one top-k (the order of three sorts)
        index, ok = top_k_frames(
            scores, valid, priority, min(self.top_k, c), priority_bound=c, distinct_priority=True, key_base=base
        )  # (b h K)
        k, v = gather_per_head_all(index, state.ring.k, state.ring.v)
        return Context(
            k=rearrange(k, "b h f t d -> b h (f t) d"),
            v=rearrange(v, "b h f t d -> b h (f t) d"),
            mask=ok.repeat_interleave(t, dim=2),
            positions=positions.gather(2, index).repeat_interleave(t, dim=2),
        )

    @typechecked
    def write(self, state: SparseKVState, chunk: Chunk) -> SparseKVState:
        """Fill the sink with the first frames ever seen; write the rest into the ring."""
        check_state(f"{self._name}.write", state, SparseKVState)
        check_state_matches(f"{self._name}.write", state, self)
        check_chunk(
            self._name, chunk, state.batch_size, self.heads, self.head_dim, state.ring.k.device, self.tokens_per_frame
        )
        new = FrameBuffer.from_chunk(chunk, self.tokens_per_frame, state.ring.k.dtype)
        desc = new.k.float().mean(dim=3).to(new.k.dtype)  # (b h f d)
        f, seen = new.frames, state.frames_seen
        sink, _ = state.sink.write_sink(new, seen)

        first = (self.always_frames - seen).clamp(0, f)  # the chunk's first frames went to the sink
        start = (seen - self.always_frames).clamp(min=0)
        src, take = ring_sources(start, first, f, self.capacity)
        return SparseKVState(
            ring=state.ring.place(new, src, take),
            desc=place_slots(state.desc, desc, src, take),
            sink=sink,
            frames_seen=seen + f,
        )

    def __repr__(self) -> str:
        return (
            f"{self._name}(heads={self.heads}, head_dim={self.head_dim}, tokens_per_frame={self.tokens_per_frame}, "
            f"capacity={self.capacity}, top_k={self.top_k}, always_frames={self.always_frames})"
        )


register_memory("sparse_kv", SparseKVMemory)
