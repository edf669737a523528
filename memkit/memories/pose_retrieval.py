"""``PoseRetrievalMemory``: frames stored with their pose, read back by pose similarity (WorldMem)."""

from typing import ClassVar, Literal

import torch
from torch import Tensor

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.errors import ShapeError
from memkit.memories.frames import FrameBuffer, gather_frames, keep_last_valid, top_k_frames
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked

__all__ = ["PoseRetrievalMemory", "PoseRetrievalState"]

Metric = Literal["l2", "cosine"]


@memory_state
class PoseRetrievalState(MemoryState):
    """State of :class:`PoseRetrievalMemory`.

    Attributes:
        frames: a :class:`memkit.memories.frames.FrameBuffer` of ``C`` slots: the newest ``C`` frames,
            oldest first (keys before rotary, values, frame positions, filled slots).
        meta: ``(b C c)`` each frame's metadata (its pose), as the host gave it.

    Files saved before the buffer (format version 1) named the frames' tensors ``k, v, pos, valid``;
    :func:`memkit.load_states` maps the old names.
    """

    layouts: ClassVar[dict[str, str]] = {"frames": "C", "meta": "b C c"}

    frames: FrameBuffer
    meta: Tensor


class PoseRetrievalMemory:
    """Frames stored with per-frame metadata (a camera pose) and retrieved by its similarity to the segment's.

    WorldMem (Xiao et al., *WorldMem: Long-term Consistent World Simulation with Memory*,
    arXiv:2504.12369) stores every generated frame with its camera pose and time and, before
    each new frame, retrieves the stored frames whose field of view overlaps the current one;
    Context-as-Memory (arXiv:2506.03141) retrieves by field-of-view overlap too. Here each
    frame is stored with the host's :attr:`memkit.Chunk.frame_meta` vector, and ``read``
    returns the ``top_k`` stored frames nearest to the segment's mean
    :attr:`memkit.Query.frame_meta` (``metric="l2"``: smallest distance; ``"cosine"``: largest
    cosine similarity; ties go to the newer frame). Which frames are read depends on where
    the camera is, not on what the queries look like or how old a frame is.

    A host that passes no metadata gets a clear error; what the vector holds is the host's
    choice (the revisit world passes the camera's horizontal position; a 3-D world would pass
    a position and a view direction, and an overlap-aware metric could replace the distance).

    Cost: ``read`` O(b C c) to score + a top-k over ``C`` + a gather of ``K`` frames
    (``O(b h K t d)``); ``write`` O(b h C t d) (the ring slides).
    State bytes: ``2 b h C t d * itemsize + b C c * itemsize + 9 b C``.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``.
        meta_dim: ``c``, the length of each frame's metadata vector.
        capacity: ``C``, frames kept (the newest).
        top_k: ``K`` frames read per segment.
        metric: ``"l2"`` or ``"cosine"``.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PoseRetrievalMemory(2, 8, 4, meta_dim=1, capacity=8, top_k=2)
        >>> state = mem.init_state(1)
        >>> k = torch.randn(1, 2, 5 * 4, 8)
        >>> pose = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0]]])  # 5 frames taken at x = 0, 10, ... 40
        >>> chunk = memkit.Chunk(k, k, torch.randn(1, 20, 16), torch.arange(5)[None], 4, frame_meta=pose)
        >>> state = mem.write(state, chunk)
        >>> q = memkit.Query(torch.randn(1, 2, 4, 8), torch.tensor([[5]]), 4, frame_meta=torch.tensor([[[12.0]]]))
        >>> mem.read(state, q).positions[0, 0, ::4].tolist()  # the frames taken nearest x = 12
        [1, 2]
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        meta_dim: int,
        capacity: int = 64,
        top_k: int = 4,
        metric: Metric = "l2",
    ) -> None:
        if min(heads, head_dim, tokens_per_frame, meta_dim, capacity, top_k) < 1:
            raise ValueError(
                "PoseRetrievalMemory: heads, head_dim, tokens_per_frame, meta_dim, capacity and top_k must be "
                f"positive, got {heads}, {head_dim}, {tokens_per_frame}, {meta_dim}, {capacity}, {top_k}"
            )
        if top_k > capacity:
            raise ValueError(f"PoseRetrievalMemory: top_k ({top_k}) cannot exceed capacity ({capacity})")
        if metric not in ("l2", "cosine"):
            raise ValueError(f"PoseRetrievalMemory: metric must be 'l2' or 'cosine', got {metric!r}")
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.meta_dim, self.capacity, self.top_k, self.metric = meta_dim, capacity, top_k, metric

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PoseRetrievalState:
        batch_size = check_init_args("PoseRetrievalMemory.init_state", batch_size, device, dtype)
        dtype = dtype or torch.get_default_dtype()
        b, h, c, t, d = batch_size, self.heads, self.capacity, self.tokens_per_frame, self.head_dim
        return PoseRetrievalState(
            frames=FrameBuffer.empty(b, h, c, t, d, device=device, dtype=dtype),
            meta=torch.zeros((b, c, self.meta_dim), device=device, dtype=dtype),
        )

    def _meta(self, where: str, meta: Tensor | None) -> Tensor:
        if meta is None:
            what = "query" if where == "read" else "chunk"
            raise ShapeError(
                f"PoseRetrievalMemory.{where}: {what}.frame_meta is None; this memory retrieves frames by "
                f"per-frame metadata (a camera pose), so the host must pass frame_meta (b f c) with c = "
                f"{self.meta_dim} on every Query and Chunk (MALTNetwork does with positions='pose')"
            )
        if meta.shape[-1] != self.meta_dim:
            raise ShapeError(
                f"PoseRetrievalMemory.{where}: dimension c (metadata channels) of frame_meta should be "
                f"{self.meta_dim}, got {meta.shape[-1]}"
            )
        return meta

    def scores(self, state: PoseRetrievalState, query_meta: Tensor) -> Tensor:
        """Similarity ``(b C)`` of every stored frame to ``query_meta (b c)`` (higher is nearer)."""
        meta, want = state.meta.float(), query_meta.float()[:, None, :]
        if self.metric == "l2":
            return -(meta - want).square().sum(dim=-1)
        return torch.nn.functional.cosine_similarity(meta, want, dim=-1)

    @typechecked
    def read(self, state: PoseRetrievalState, query: Query) -> Context:
        """The ``top_k`` stored frames nearest the segment's mean metadata: ``(b h K*t d)``."""
        check_state("PoseRetrievalMemory.read", state, PoseRetrievalState)
        check_state_matches("PoseRetrievalMemory.read", state, self)
        check_query("PoseRetrievalMemory", query, state.batch_size, self.heads, self.head_dim, state.frames.k.device)
        return self._context(state, self._meta("read", query.frame_meta))

    @typechecked
    def plan(self, state: PoseRetrievalState, layout: ReadLayout) -> ReadPlan:
        """The whole read, prepared once per segment: the choice depends on the segment's poses, not its queries."""
        check_state("PoseRetrievalMemory.plan", state, PoseRetrievalState)
        check_state_matches("PoseRetrievalMemory.plan", state, self)
        check_layout("PoseRetrievalMemory", layout, state.batch_size, state.frames.k.device)
        return ReadPlan(parts=(self._context(state, self._meta("read", layout.frame_meta)),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _context(self, state: PoseRetrievalState, meta: Tensor) -> Context:
        want = meta.mean(dim=1)  # (b c)
        recency = torch.arange(self.capacity, device=state.frames.k.device).expand_as(state.frames.pos)
        index, _ = top_k_frames(self.scores(state, want), state.frames.valid, recency, self.top_k)  # (b K)
        return state.frames.gather(index).to_context()

    @typechecked
    def write(self, state: PoseRetrievalState, chunk: Chunk) -> PoseRetrievalState:
        """Append the segment's frames with their metadata; keep the newest ``C``."""
        check_state("PoseRetrievalMemory.write", state, PoseRetrievalState)
        check_state_matches("PoseRetrievalMemory.write", state, self)
        check_chunk(
            "PoseRetrievalMemory",
            chunk,
            state.batch_size,
            self.heads,
            self.head_dim,
            state.frames.k.device,
            self.tokens_per_frame,
        )
        new = FrameBuffer.from_chunk(chunk, self.tokens_per_frame, state.frames.k.dtype)
        meta = self._meta("write", chunk.frame_meta).to(new.k.dtype)
        cand = state.frames.cat(new)
        keep = keep_last_valid(cand.valid, self.capacity)
        return PoseRetrievalState(
            frames=cand.gather(keep), meta=gather_frames(torch.cat([state.meta, meta], dim=1), keep, 1)
        )

    def __repr__(self) -> str:
        return (
            f"PoseRetrievalMemory(heads={self.heads}, head_dim={self.head_dim}, "
            f"tokens_per_frame={self.tokens_per_frame}, meta_dim={self.meta_dim}, capacity={self.capacity}, "
            f"top_k={self.top_k}, metric={self.metric!r})"
        )


register_memory("pose_retrieval", PoseRetrievalMemory)
