"""``NoMemory``: the memory-free baseline."""

import torch

from memkit.memories.frames import check_state
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan, empty_context
from memkit.state import MemoryState, check_init_args, memory_state


@memory_state
class NoState(MemoryState):
    """The state of :class:`NoMemory`: nothing at all (0 bytes)."""


class NoMemory:
    """Remembers nothing: each segment sees only its own tokens.

    ``read`` returns a context with no slots, so attention is exactly the segment's own
    self-attention; ``write`` returns the state unchanged.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.NoMemory()
        >>> state = mem.init_state(2)
        >>> q = memkit.Query(torch.randn(2, 4, 6, 8), torch.tensor([[0, 1, 2]] * 2), tokens_per_frame=2)
        >>> mem.read(state, q).k.shape
        torch.Size([2, 4, 0, 8])
    """

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> NoState:
        check_init_args("NoMemory.init_state", batch_size, device, dtype)
        return NoState()

    def read(self, state: NoState, query: Query) -> Context:
        check_state("NoMemory.read", state, NoState)  # an empty state: nothing else can differ
        return empty_context(query)

    def plan(self, state: NoState, layout: ReadLayout) -> ReadPlan:
        """Nothing to prepare: every read is empty (see :func:`memkit.plan_read`)."""
        check_state("NoMemory.plan", state, NoState)
        return ReadPlan(parts=(), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def write(self, state: NoState, chunk: Chunk) -> NoState:
        check_state("NoMemory.write", state, NoState)
        return state

    def __repr__(self) -> str:
        return "NoMemory()"


register_memory("none", NoMemory)
