"""``SinkWindowMemory`` (LongLive's frame sink + local window) and the naive FIFO bank."""

from typing import ClassVar

import torch
from torch import Tensor

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.memories.frames import FrameBuffer
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked


@memory_state
class SinkWindowState(MemoryState):
    """State of :class:`SinkWindowMemory`: two frame buffers and a counter.

    Attributes:
        sink: a :class:`memkit.memories.frames.FrameBuffer` of ``S`` slots: the first ``S`` frames ever written.
        window: a ``FrameBuffer`` of ``W`` slots: the newest ``W`` frames after the sink, oldest first.
        frames_seen: ``(b,)`` frames written so far.

    Files saved before the buffers (format version 1) named these ``sink_k ... win_valid``;
    :func:`memkit.load_states` maps the old names.
    """

    #: each field's layout (a buffer's: the letter of its slots): how a state of another configuration is reported
    layouts: ClassVar[dict[str, str]] = {"sink": "S", "window": "W", "frames_seen": "b"}

    sink: FrameBuffer
    window: FrameBuffer
    frames_seen: Tensor


class SinkWindowMemory:
    """A frame sink plus a sliding window of the most recent frames (LongLive).

    The first ``sink_frames`` frames ever written stay forever (they anchor identity and
    style); the ``window_frames`` newest frames after them slide. Every frame sits in
    exactly one of the two, so the memory holds the sink plus the last ``W`` other frames,
    in order. Keys are stored before rotary embedding with their frame positions.

    Cost: ``read`` O(1) (returns the buffers), ``write`` O((S + W) t h d) copies.
    State bytes: ``2 b h (S + W) t d * itemsize + (S + W) * 9 b + 8 b``.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``, tokens in one frame.
        sink_frames: ``S``.
        window_frames: ``W``.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.SinkWindowMemory(heads=2, head_dim=8, tokens_per_frame=4, sink_frames=1, window_frames=2)
        >>> state = mem.init_state(1)
        >>> k = torch.randn(1, 2, 12, 8)  # 3 frames of 4 tokens
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 12, 16), torch.tensor([[0, 1, 2]]), 4))
        >>> state.sink.pos.tolist(), state.window.pos.tolist()
        ([[0]], [[1, 2]])
    """

    def __init__(
        self, heads: int, head_dim: int, tokens_per_frame: int, *, sink_frames: int = 1, window_frames: int = 4
    ) -> None:
        if min(heads, head_dim, tokens_per_frame) < 1 or min(sink_frames, window_frames) < 0:
            raise ValueError(
                "SinkWindowMemory: heads, head_dim and tokens_per_frame must be positive and "
                f"sink_frames, window_frames non-negative, got {heads}, {head_dim}, {tokens_per_frame}, "
                f"{sink_frames}, {window_frames}"
            )
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.sink_frames, self.window_frames = sink_frames, window_frames

    @property
    def _name(self) -> str:
        return type(self).__name__

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SinkWindowState:
        batch_size = check_init_args(f"{self._name}.init_state", batch_size, device, dtype)
        b, h, t, d = batch_size, self.heads, self.tokens_per_frame, self.head_dim
        return SinkWindowState(
            sink=FrameBuffer.empty(b, h, self.sink_frames, t, d, device=device, dtype=dtype),
            window=FrameBuffer.empty(b, h, self.window_frames, t, d, device=device, dtype=dtype),
            frames_seen=torch.zeros((b,), device=device, dtype=torch.long),
        )

    @typechecked
    def read(self, state: SinkWindowState, query: Query) -> Context:
        """The sink then the window, ``(b h (S+W)*t d)``, with validity and positions."""
        check_state(f"{self._name}.read", state, SinkWindowState)
        check_state_matches(f"{self._name}.read", state, self)
        check_query(self._name, query, state.batch_size, self.heads, self.head_dim, state.window.k.device)
        return self._context(state)

    @typechecked
    def plan(self, state: SinkWindowState, layout: ReadLayout) -> ReadPlan:
        """The whole read, prepared once per segment: it does not depend on the queries."""
        check_state(f"{self._name}.plan", state, SinkWindowState)
        check_state_matches(f"{self._name}.plan", state, self)
        check_layout(self._name, layout, state.batch_size, state.window.k.device)
        return ReadPlan(parts=(self._context(state),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _context(self, state: SinkWindowState) -> Context:
        return state.sink.cat(state.window).to_context()

    @typechecked
    def write(self, state: SinkWindowState, chunk: Chunk) -> SinkWindowState:
        """Fill the sink with the first frames ever seen; slide the rest into the window."""
        check_state(f"{self._name}.write", state, SinkWindowState)
        check_state_matches(f"{self._name}.write", state, self)
        check_chunk(
            self._name, chunk, state.batch_size, self.heads, self.head_dim, state.window.k.device, self.tokens_per_frame
        )
        new = FrameBuffer.from_chunk(chunk, self.tokens_per_frame, state.window.k.dtype)
        sink, past = state.sink.write_sink(new, state.frames_seen)
        window = state.window.cat(new.replace(valid=past)).newest(self.window_frames)
        return SinkWindowState(sink=sink, window=window, frames_seen=state.frames_seen + new.frames)

    def __repr__(self) -> str:
        return (
            f"{self._name}(heads={self.heads}, head_dim={self.head_dim}, tokens_per_frame={self.tokens_per_frame}, "
            f"sink_frames={self.sink_frames}, window_frames={self.window_frames})"
        )


class FIFOMemory(SinkWindowMemory):
    """The naive bank most tutorials show: concatenate, truncate to the newest ``N`` frames.

    A :class:`SinkWindowMemory` without a sink; kept as a baseline.

    Example:
        >>> import memkit
        >>> mem = memkit.FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=3)
        >>> mem.init_state(1).window.k.shape
        torch.Size([1, 2, 3, 4, 8])
    """

    def __init__(self, heads: int, head_dim: int, tokens_per_frame: int, *, frames: int = 4) -> None:
        super().__init__(heads, head_dim, tokens_per_frame, sink_frames=0, window_frames=frames)

    def __repr__(self) -> str:
        return (
            f"FIFOMemory(heads={self.heads}, head_dim={self.head_dim}, tokens_per_frame={self.tokens_per_frame}, "
            f"frames={self.window_frames})"
        )


register_memory("sink_window", SinkWindowMemory)
register_memory("fifo", FIFOMemory)
