"""``CompressedWindowMemory``: a sink + window whose evicted frames fold into running averages (MemRoPE)."""

from typing import ClassVar, Literal

import torch
from torch import Tensor

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.memories.frames import FrameBuffer, keep_last_valid
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked

Pool = Literal["frame_mean", "token"]


@memory_state
class CompressedWindowState(MemoryState):
    """State of :class:`CompressedWindowMemory`.

    Attributes:
        sink: a :class:`memkit.memories.frames.FrameBuffer` of ``S`` slots: the first ``S`` frames ever written.
        window: a ``FrameBuffer`` of ``W`` slots: the newest ``W`` frames after the sink, oldest first.
        long_k, long_v: ``(b h t d)`` the slow running average of every evicted frame.
        short_k, short_v: ``(b h t d)`` the fast running average.
        mem_pos: ``(b,)`` position of the newest evicted frame (the averages are read there).
        mem_valid: ``(b,)`` whether any frame was evicted yet.
        frames_seen: ``(b,)`` frames written so far.

    Files saved before the buffers (format version 1) named them ``sink_k ... win_valid``;
    :func:`memkit.load_states` maps the old names.
    """

    layouts: ClassVar[dict[str, str]] = {
        "sink": "S",
        "window": "W",
        **dict.fromkeys(("long_k", "long_v", "short_k", "short_v"), "b h t d"),
        **dict.fromkeys(("mem_pos", "mem_valid", "frames_seen"), "b"),
    }

    sink: FrameBuffer
    window: FrameBuffer
    long_k: Tensor
    long_v: Tensor
    short_k: Tensor
    short_v: Tensor
    mem_pos: Tensor
    mem_valid: Tensor
    frames_seen: Tensor


class CompressedWindowMemory:
    """A frame sink and a sliding window; frames leaving the window are averaged, not dropped (MemRoPE).

    A :class:`SinkWindowMemory` forgets a frame the moment it slides out of the window.
    Here every write folds the frames it evicts into two running averages, a slow one
    (``alpha_long``: the whole history) and a fast one (``alpha_short``: the recent past),
    each one frame of ``t`` tokens: ``m <- (1 - alpha) m + alpha * mean(evicted)``, the
    first eviction initialising both. Old content fades gradually instead of vanishing, and
    the state stays ``S + 2 + W`` frames however long the video. Averaging keys is only
    meaningful because memkit stores them before rotary (MemRoPE's "online RoPE indexing");
    the two averages are rotated at the newest evicted frame's position (the slow one a
    frame before it), so they sit between the sink and the window as in MemRoPE's layout.
    Training-free: swap it in for a sink + window at inference.

    ``pool`` is how the evicted frames of one write are summarised before the update:
    ``"frame_mean"`` (MemRoPE's release default) averages over every evicted token, so
    each memory token of a frame is the same vector; ``"token"`` (the release's
    ``ema_adaptive`` mode without its motion-scaled rate) averages position by position
    over the evicted frames, keeping the frame's spatial layout.

    Cost: ``read`` O(1) (returns the buffers), ``write`` O((S + W + 2) t h d).
    State bytes: ``2 b h (S + W + 2) t d * itemsize + 9 b (S + W) + 17 b``.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``.
        sink_frames: ``S`` (MemRoPE: 3).
        window_frames: ``W`` recent frames kept whole (MemRoPE: 4).
        alpha_long, alpha_short: update rates of the two averages (MemRoPE: 0.01, 0.1).
        pool: ``"frame_mean"`` or ``"token"`` (above).

    Example:
        >>> import torch, memkit
        >>> mem = memkit.CompressedWindowMemory(heads=2, head_dim=8, tokens_per_frame=4, sink_frames=1, window_frames=2)
        >>> state = mem.init_state(1)
        >>> k = torch.randn(1, 2, 20, 8)  # 5 frames of 4 tokens: 1 to the sink, 2 evicted, 2 kept
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 20, 16), torch.arange(5)[None], 4))
        >>> state.window.pos.tolist(), state.mem_pos.tolist(), state.mem_valid.tolist()
        ([[3, 4]], [2], [True])
        >>> q = torch.randn(1, 2, 4, 8)
        >>> mem.read(state, memkit.Query(q, torch.tensor([[5]]), 4)).num_slots  # (1 + 2 + 2) frames x 4 tokens
        20
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        sink_frames: int = 3,
        window_frames: int = 4,
        alpha_long: float = 0.01,
        alpha_short: float = 0.1,
        pool: Pool = "frame_mean",
    ) -> None:
        if min(heads, head_dim, tokens_per_frame) < 1 or sink_frames < 0 or window_frames < 1:
            raise ValueError(
                "CompressedWindowMemory: heads, head_dim, tokens_per_frame and window_frames must be positive and "
                f"sink_frames non-negative, got {heads}, {head_dim}, {tokens_per_frame}, {window_frames}, "
                f"{sink_frames}"
            )
        for name, alpha in (("alpha_long", alpha_long), ("alpha_short", alpha_short)):
            if not 0.0 < alpha <= 1.0:
                raise ValueError(f"CompressedWindowMemory: {name} must be in (0, 1], got {alpha}")
        if pool not in ("frame_mean", "token"):
            raise ValueError(f"CompressedWindowMemory: pool must be 'frame_mean' or 'token', got {pool!r}")
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.sink_frames, self.window_frames = sink_frames, window_frames
        self.alpha_long, self.alpha_short, self.pool = float(alpha_long), float(alpha_short), pool

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CompressedWindowState:
        batch_size = check_init_args("CompressedWindowMemory.init_state", batch_size, device, dtype)
        dtype = dtype or torch.get_default_dtype()
        b, h, t, d = batch_size, self.heads, self.tokens_per_frame, self.head_dim

        def buf() -> Tensor:
            return torch.zeros((b, h, t, d), device=device, dtype=dtype)

        def frames(n: int) -> FrameBuffer:
            return FrameBuffer.empty(b, h, n, t, d, device=device, dtype=dtype)

        zeros = torch.zeros((b,), device=device, dtype=torch.long)
        return CompressedWindowState(
            sink=frames(self.sink_frames), window=frames(self.window_frames),
            long_k=buf(), long_v=buf(), short_k=buf(), short_v=buf(),
            mem_pos=zeros, mem_valid=zeros.bool(), frames_seen=zeros.clone(),
        )  # fmt: skip

    def _checked(self, where: str, state: CompressedWindowState) -> None:
        check_state(f"CompressedWindowMemory.{where}", state, CompressedWindowState)
        check_state_matches(f"CompressedWindowMemory.{where}", state, self)

    @typechecked
    def read(self, state: CompressedWindowState, query: Query) -> Context:
        """Sink, slow average, fast average, window: ``(b h (S+2+W)*t d)``, with validity and positions."""
        self._checked("read", state)
        check_query("CompressedWindowMemory", query, state.batch_size, self.heads, self.head_dim, state.window.k.device)
        return self._context(state)

    @typechecked
    def plan(self, state: CompressedWindowState, layout: ReadLayout) -> ReadPlan:
        """The whole read, prepared once per segment: it does not depend on the queries."""
        self._checked("plan", state)
        check_layout("CompressedWindowMemory", layout, state.batch_size, state.window.k.device)
        return ReadPlan(parts=(self._context(state),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _context(self, state: CompressedWindowState) -> Context:
        # the two averages as two slots, at the newest evicted frame's position (and the one before)
        averages = FrameBuffer(
            k=torch.stack([state.long_k, state.short_k], dim=2),
            v=torch.stack([state.long_v, state.short_v], dim=2),
            pos=torch.stack([state.mem_pos - 1, state.mem_pos], dim=1),
            valid=torch.stack([state.mem_valid, state.mem_valid], dim=1),
        )
        return state.sink.cat(averages, state.window).to_context()

    def _evicted_mean(self, frames: Tensor, evicted: Tensor) -> Tensor:
        """Mean ``(b h t d)`` of ``frames (b h F t d)`` where ``evicted (b F)`` (zeros where none is)."""
        weight = evicted.to(frames.dtype)[:, None, :, None, None]
        count = weight.sum(dim=2).clamp(min=1.0)  # (b 1 1 1)
        per_token = (frames * weight).sum(dim=2) / count
        if self.pool == "token":
            return per_token
        return per_token.mean(dim=2, keepdim=True).expand_as(per_token)

    @typechecked
    def write(self, state: CompressedWindowState, chunk: Chunk) -> CompressedWindowState:
        """Fill the sink first; slide the rest through the window; fold what leaves it into the averages."""
        self._checked("write", state)
        check_chunk(
            "CompressedWindowMemory",
            chunk,
            state.batch_size,
            self.heads,
            self.head_dim,
            state.window.k.device,
            self.tokens_per_frame,
        )
        new = FrameBuffer.from_chunk(chunk, self.tokens_per_frame, state.window.k.dtype)
        sink, past = state.sink.write_sink(new, state.frames_seen)
        cand = state.window.cat(new.replace(valid=past))
        keep = keep_last_valid(cand.valid, self.window_frames)
        kept = torch.zeros_like(cand.valid).scatter(1, keep, True)
        evicted = cand.valid & ~kept  # (b W+f): valid frames sliding out of the window now
        any_evicted = evicted.any(dim=1)  # (b,)
        newest_evicted = torch.where(evicted, cand.pos, torch.iinfo(torch.long).min).amax(dim=1)

        mean_k, mean_v = self._evicted_mean(cand.k, evicted), self._evicted_mean(cand.v, evicted)

        def fold(old: Tensor, new: Tensor, alpha: float) -> Tensor:
            # the first eviction initialises the average; a write that evicts nothing leaves it
            rate = torch.where(state.mem_valid, alpha, 1.0) * any_evicted.to(old.dtype)
            rate = rate.to(old.dtype)[:, None, None, None]
            return old * (1 - rate) + new * rate

        return CompressedWindowState(
            sink=sink,
            window=cand.gather(keep),
            long_k=fold(state.long_k, mean_k, self.alpha_long),
            long_v=fold(state.long_v, mean_v, self.alpha_long),
            short_k=fold(state.short_k, mean_k, self.alpha_short),
            short_v=fold(state.short_v, mean_v, self.alpha_short),
            mem_pos=torch.where(any_evicted, newest_evicted, state.mem_pos),
            mem_valid=state.mem_valid | any_evicted,
            frames_seen=state.frames_seen + new.frames,
        )

    def __repr__(self) -> str:
        return (
            f"CompressedWindowMemory(heads={self.heads}, head_dim={self.head_dim}, "
            f"tokens_per_frame={self.tokens_per_frame}, sink_frames={self.sink_frames}, "
            f"window_frames={self.window_frames}, alpha_long={self.alpha_long}, alpha_short={self.alpha_short}, "
            f"pool={self.pool!r})"
        )


register_memory("compressed_window", CompressedWindowMemory)
