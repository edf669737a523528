"""``ComposeMemory`` / :func:`compose`: several memories side by side behind one protocol."""

from typing import Any

import torch
from torch import nn

from memkit.errors import StateError
from memkit.memories.frames import check_state
from memkit.protocol import Chunk, Context, Memory, Query, ReadLayout, ReadPlan, plan_read, read_dynamic
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked

__all__ = ["ComposeMemory", "ComposeState", "compose"]


@memory_state
class ComposeState(MemoryState):
    """State of :class:`ComposeMemory`: the member states, in member order.

    A pytree like any state (``.to()``, ``detach()``, ``index_batch``, save/load reach every
    member's tensors); index it or iterate it like the tuple it holds.

    Attributes:
        states: one state per member memory.

    Example:
        >>> import memkit
        >>> mem = memkit.compose(memkit.FIFOMemory(2, 8, 4, frames=2), memkit.NoMemory())
        >>> state = mem.init_state(1)
        >>> len(state), type(state[0]).__name__
        (2, 'SinkWindowState')
    """

    states: tuple[Any, ...]

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> Any:
        return self.states[i]

    def __iter__(self) -> Any:
        return iter(self.states)


class ComposeMemory(nn.Module):
    """Run several memories side by side: one context holding every member's slots.

    ``read`` concatenates the members' contexts (member order), so attention over it equals
    attention over every member's keys at once (exact, by log-sum-exp merging); ``write``
    hands the same chunk to every member. Members that are ``nn.Module`` (with parameters,
    e.g. :class:`PromptBankMemory`'s ``prompt_proj``) are registered as submodules, so a
    :class:`MemoryAttention` holding the composition moves and trains them.

    Composition does not deduplicate across members: a frame held by two members is
    attended twice, which doubles its softmax weight (a ``log 2`` logit bonus).

    Cost: the sum of the members' costs (plus one concatenation on read).
    State bytes: the sum of the members' state bytes.

    Args:
        *memories: at least one :class:`memkit.Memory`, all built for the same ``heads``
            and ``head_dim``.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.compose(
        ...     memkit.PromptBankMemory(heads=2, head_dim=8, tokens_per_frame=4, bank_frames=3),
        ...     memkit.SparseKVMemory(heads=2, head_dim=8, tokens_per_frame=4, capacity=8, top_k=3, always_frames=1),
        ... )
        >>> state = mem.init_state(1)
        >>> k = torch.randn(1, 2, 8, 8)
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 8, 16), torch.tensor([[0, 1]]), 4))
        >>> q = memkit.Query(torch.randn(1, 2, 8, 8), torch.tensor([[2, 3]]), 4, prompt=torch.randn(1, 5, 16))
        >>> mem.read(state, q).k.shape   # bank 3 frames + sink 1 + top-3, of 4 tokens each
        torch.Size([1, 2, 28, 8])
    """

    def __init__(self, *memories: Memory[Any]) -> None:
        super().__init__()
        if not memories:
            raise ValueError("ComposeMemory: give at least one memory")
        for i, m in enumerate(memories):
            if not isinstance(m, Memory):
                raise TypeError(
                    f"ComposeMemory: memories[{i}] is a {type(m).__name__}, not a memkit.Memory "
                    "(it needs init_state, read and write)"
                )
            if isinstance(m, nn.Module):
                self.add_module(f"member{i}", m)
        self.memories: tuple[Memory[Any], ...] = tuple(memories)

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ComposeState:
        """Every member's empty state."""
        batch_size = check_init_args("ComposeMemory.init_state", batch_size, device, dtype)
        return ComposeState(tuple(m.init_state(batch_size, device=device, dtype=dtype) for m in self.memories))

    def _check(self, where: str, state: ComposeState) -> None:
        check_state(f"ComposeMemory.{where}", state, ComposeState)
        if len(state.states) != len(self.memories):
            raise StateError(
                f"ComposeMemory.{where}: expected a ComposeState of {len(self.memories)} member states, "
                f"got {len(state.states)}"
            )
        check_state_matches(f"ComposeMemory.{where}", state, self)

    @typechecked
    def read(self, state: ComposeState, query: Query) -> Context:
        """Every member's context, concatenated along the slot dimension ``m``: ``(b h sum(m_i) d)``."""
        self._check("read", state)
        return Context.concat([m.read(s, query) for m, s in zip(self.memories, state.states, strict=True)])

    @typechecked
    def plan(self, state: ComposeState, layout: ReadLayout) -> ReadPlan:
        """Every member's plan; the parts in member order (what ``read`` concatenates)."""
        self._check("plan", state)
        plans = tuple(plan_read(m, s, layout) for m, s in zip(self.memories, state.states, strict=True))
        return ReadPlan(parts=tuple(p for plan in plans for p in plan.parts), state=state, extra=plans)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return tuple(
            c
            for m, p in zip(self.memories, plan.extra, strict=True)
            if any(part is None for part in p.parts)
            for c in read_dynamic(m, p, query)
        )

    @typechecked
    def write(self, state: ComposeState, chunk: Chunk) -> ComposeState:
        """Every member written with the same chunk."""
        self._check("write", state)
        return ComposeState(tuple(m.write(s, chunk) for m, s in zip(self.memories, state.states, strict=True)))

    def __repr__(self) -> str:
        return f"ComposeMemory({', '.join(repr(m) for m in self.memories)})"


def compose(*memories: Memory[Any]) -> ComposeMemory:
    """Several memories side by side (see :class:`ComposeMemory`).

    Example:
        >>> import memkit
        >>> memkit.compose(memkit.NoMemory(), memkit.FIFOMemory(2, 8, 4, frames=2))
        ComposeMemory(NoMemory(), FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=2))
    """
    return ComposeMemory(*memories)
