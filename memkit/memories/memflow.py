"""``MemFlowMemory``: MemFlow's NAM + SMA as released (sink, prompt bank, routed; dense local window)."""

from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.memories.frames import FrameBuffer, gather_per_head_all, top_k_frames
from memkit.memories.prompt_bank import PromptBankMemory, PromptBankState
from memkit.memories.registry import register_memory
from memkit.memories.sink_window import SinkWindowMemory, SinkWindowState
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked

__all__ = ["MemFlowMemory", "MemFlowState"]


@memory_state
class MemFlowState(MemoryState):
    """State of :class:`MemFlowMemory`: the frame sink + local window, and the prompt bank.

    Attributes:
        frames: a :class:`memkit.SinkWindowState`: the first ``S`` frames and the newest ``W`` after them.
        bank: a :class:`memkit.PromptBankState` (``rule="memflow"``): the bank and its pending prototype.

    Example:
        >>> import memkit
        >>> s = memkit.MemFlowMemory(heads=2, head_dim=8, tokens_per_frame=4).init_state(1)
        >>> s.frames.sink.k.shape, s.frames.window.k.shape, s.bank.pool.k.shape
        (torch.Size([1, 2, 3, 4, 8]), torch.Size([1, 2, 6, 4, 8]), torch.Size([1, 2, 4, 4, 8]))
    """

    #: nested states report their own layouts
    layouts: ClassVar[dict[str, str]] = {}

    frames: SinkWindowState
    bank: PromptBankState


class MemFlowMemory(nn.Module):
    """MemFlow's memory as released: frame sink, Narrative Adaptive Memory, Sparse Memory Activation.

    What one segment (MemFlow: a chunk of 3 latent frames) attends to besides its own tokens,
    following ``CausalWanSelfAttention.forward`` in KlingTeam/MemFlow ``wan/modules/causal_model.py``:

    * the **local window**, always and in full: the newest ``W`` frames that are not sink
      frames (MemFlow: ``local_attn_size - sink_size - frames per chunk`` = 12 - 3 - 3 = 6);
    * the **sink** (first ``S = 3`` frames ever written) and the **bank** (NAM, ``B = 3`` frames
      chosen by the prompt: a :class:`PromptBankMemory` with ``rule="memflow"``, prototype =
      a chunk's first frame recorded every ``record_interval = 3`` chunks). With ``top_k``
      set (SMA), each head attends only to its ``top_k`` best of these ``S + B`` frames, scored
      by the dot product of the segment's mean query (over all its tokens) with each frame's
      mean key; with ``top_k=None`` (the released configs, ``SMA: False``) to all of them.

    The window is never routed; the routing pool is sink + bank. (memkit's
    :class:`SparseKVMemory` is a different memory: it routes over a ring of recent frames and
    always returns its sink.) Keys are stored and scored before rotary embedding; the release
    scores rotated keys and queries. Differences are tabled in ``docs/memories/memflow.md``.

    Read returns ``(K + W) * t`` slots per head with SMA (``K = min(top_k, S + B)``, routed
    first), ``(S + B + W) * t`` without (sink, bank, window, the release's order).

    Cost: ``read`` the bank's selection (see :class:`PromptBankMemory`) plus
    O(b h (n d + (S + B) t d)) to route; ``write`` O(b h (S + W + B + 1) t d) copies.
    State bytes: the sink-window state plus the bank state.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``, tokens in one frame.
        sink_frames: ``S`` (MemFlow: 3).
        window_frames: ``W``, past non-sink frames always attended (MemFlow: 6).
        bank_frames: ``B`` (MemFlow: 3).
        top_k: frames each head reads from sink + bank (SMA, MemFlow's code: 3); ``None``: all.
        record_interval: a prototype every this many writes (MemFlow: 3).
        score: the bank's relevance formula, ``"release"`` (default) or ``"softmax"``.
        prompt_dim: ``e`` of the prompt (or per-layer text keys); ``None`` means ``heads * head_dim``.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.MemFlowMemory(heads=2, head_dim=8, tokens_per_frame=4)
        >>> state, prompt = mem.init_state(1), torch.randn(1, 5, 16)
        >>> for s in range(5):   # chunks of 3 frames
        ...     k = torch.randn(1, 2, 12, 8)
        ...     pos = torch.arange(3 * s, 3 * s + 3)[None]
        ...     state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 12, 16), pos, 4, prompt))
        >>> q = memkit.Query(torch.randn(1, 2, 12, 8), torch.tensor([[15, 16, 17]]), 4, prompt=prompt)
        >>> mem.read(state, q).k.shape   # top-3 of sink + bank, then the 6-frame window
        torch.Size([1, 2, 36, 8])
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        sink_frames: int = 3,
        window_frames: int = 6,
        bank_frames: int = 3,
        top_k: int | None = 3,
        record_interval: int = 3,
        score: str = "release",
        prompt_dim: int | None = None,
    ) -> None:
        super().__init__()
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"MemFlowMemory: top_k must be a positive int or None, got {top_k!r}")
        if sink_frames + bank_frames < 1:
            raise ValueError("MemFlowMemory: sink_frames + bank_frames must be at least 1 (the routing pool)")
        self.frames = SinkWindowMemory(
            heads, head_dim, tokens_per_frame, sink_frames=sink_frames, window_frames=window_frames
        )
        self.bank = PromptBankMemory(
            heads,
            head_dim,
            tokens_per_frame,
            bank_frames=bank_frames,
            prompt_dim=prompt_dim,
            rule="memflow",
            record_interval=record_interval,
            score=score,
        )
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.top_k = top_k

    @property
    def _name(self) -> str:
        return type(self).__name__

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemFlowState:
        """The empty sink, window and bank."""
        batch_size = check_init_args(f"{self._name}.init_state", batch_size, device, dtype)
        return MemFlowState(
            frames=self.frames.init_state(batch_size, device=device, dtype=dtype),
            bank=self.bank.init_state(batch_size, device=device, dtype=dtype),
        )

    def _route(self, q: Tensor, pool: FrameBuffer, top_k: int, desc: Tensor | None = None) -> Context:
        """SMA: each head's ``top_k`` frames of ``pool`` (``F`` slots) by mean query . mean key (``desc``, if given)."""
        b, h, f, t, _ = pool.k.shape
        desc = pool.k.float().mean(dim=3) if desc is None else desc
        scores = torch.einsum("bhfd,bhd->bhf", desc, q.float().mean(dim=2))
        valid3 = pool.valid[:, None, :].expand(b, h, f)
        # ties (only between identical frames: a prototype held twice) go to the earlier slot
        index, ok = top_k_frames(
            scores, valid3, torch.zeros_like(valid3, dtype=torch.long), min(top_k, f), priority_bound=1
        )
        k, v = gather_per_head_all(index, pool.k, pool.v)
        return Context(
            k=rearrange(k, "b h f t d -> b h (f t) d"),
            v=rearrange(v, "b h f t d -> b h (f t) d"),
            mask=ok.repeat_interleave(t, dim=2),
            positions=pool.pos[:, None, :].expand(b, h, f).gather(2, index).repeat_interleave(t, dim=2),
        )

    def _pools(
        self, state: MemFlowState, prompt: Tensor | None, prompt_mask: Tensor | None
    ) -> tuple[FrameBuffer, Context]:
        """The routing pool (the sink, then the bank chosen for ``prompt``: ``S + B`` slots) and the window context.

        Depends on the prompt, not on the queries: made once per segment, as the release
        compresses its bank once per chunk.
        """
        sink = state.frames.sink
        bank = self.bank.select(state.bank, prompt, prompt_mask)
        pool = sink.cat(bank.replace(k=bank.k.to(sink.k.dtype), v=bank.v.to(sink.v.dtype)))
        return pool, state.frames.window.to_context()

    @typechecked
    def read(self, state: MemFlowState, query: Query) -> Context:
        """Routed (or all) sink + bank frames, then the whole local window."""
        check_state(f"{self._name}.read", state, MemFlowState)
        check_state_matches(f"{self._name}.read", state, self)
        check_query(self._name, query, state.batch_size, self.heads, self.head_dim, state.frames.window.k.device)
        self.bank._check_prompt("read", query.prompt)
        pool, window = self._pools(state, query.prompt, query.prompt_mask)
        if self.top_k is None:
            return Context.concat([pool.to_context(), window])
        return Context.concat([self._route(query.q, pool, self.top_k), window])

    def plan(self, state: MemFlowState, layout: ReadLayout) -> ReadPlan:
        """Bank chosen and window prepared once per segment; SMA's routing waits for each step's queries."""
        check_state(f"{self._name}.plan", state, MemFlowState)
        check_state_matches(f"{self._name}.plan", state, self)
        check_layout(self._name, layout, state.batch_size, state.frames.window.k.device)
        self.bank._check_prompt("plan", layout.prompt, "layout.prompt")
        pool, window = self._pools(state, layout.prompt, layout.prompt_mask)
        if self.top_k is None:
            return ReadPlan(parts=(pool.to_context(), window), state=state)
        return ReadPlan(parts=(None, window), state=state, extra=(pool, pool.k.float().mean(dim=3)))

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        if self.top_k is None:
            return ()
        pool, desc = plan.extra  # the pool's frame descriptors, pooled once per segment
        return (self._route(query.q, pool, self.top_k, desc),)

    @typechecked
    def write(self, state: MemFlowState, chunk: Chunk) -> MemFlowState:
        """The sink/window take the segment's frames; the bank commits and records its prototype."""
        check_state(f"{self._name}.write", state, MemFlowState)
        check_state_matches(f"{self._name}.write", state, self)
        check_chunk(
            self._name,
            chunk,
            state.batch_size,
            self.heads,
            self.head_dim,
            state.frames.window.k.device,
            self.tokens_per_frame,
        )
        return MemFlowState(frames=self.frames.write(state.frames, chunk), bank=self.bank.write(state.bank, chunk))

    def extra_repr(self) -> str:
        return (
            f"sink_frames={self.frames.sink_frames}, window_frames={self.frames.window_frames}, "
            f"bank_frames={self.bank.bank_frames}, top_k={self.top_k}, "
            f"record_interval={self.bank.record_interval}, score={self.bank.score!r}"
        )


register_memory("memflow", MemFlowMemory)
