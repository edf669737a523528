"""``FullHistoryMemory``: the unbounded baseline every bounded memory is measured against.

It keeps the keys and values of every token ever written and hands all of them to
attention, as a plain KV cache over the whole video does. Its state grows with every write
(so it deliberately breaks memkit's fixed-shape rule): it lives here, in the benchmarks, and
never in memkit.
"""

from typing import Any

import torch
from torch import Tensor

from memkit.protocol import Chunk, Context, Query, token_positions
from memkit.state import MemoryState, memory_state


@memory_state
class FullHistoryState(MemoryState):
    """Every token written so far: ``k, v (b h N d)`` and ``positions (b N)``; ``N`` grows."""

    k: Tensor
    v: Tensor
    positions: Tensor


class FullHistoryMemory:
    """Attends to everything: the state is the concatenation of every chunk ever written.

    Example:
        >>> import torch, memkit
        >>> mem = FullHistoryMemory(heads=2, head_dim=8)
        >>> s = mem.init_state(1)
        >>> k = torch.randn(1, 2, 4, 8)
        >>> for i in range(3):
        ...     s = mem.write(s, memkit.Chunk(k, k, torch.randn(1, 4, 16), torch.tensor([[2 * i, 2 * i + 1]]), 2))
        >>> s.k.shape[2], memkit.state_nbytes(s) > memkit.state_nbytes(mem.init_state(1))
        (12, True)
    """

    def __init__(self, heads: int, head_dim: int, **_: Any) -> None:
        self.heads, self.head_dim = heads, head_dim

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FullHistoryState:
        dtype = dtype or torch.get_default_dtype()
        z = torch.zeros((batch_size, self.heads, 0, self.head_dim), device=device, dtype=dtype)
        return FullHistoryState(z, z.clone(), torch.zeros((batch_size, 0), device=device, dtype=torch.long))

    def read(self, state: FullHistoryState, query: Query) -> Context:
        b, h, n, _ = state.k.shape
        return Context(
            k=state.k,
            v=state.v,
            mask=torch.ones((b, h, n), dtype=torch.bool, device=state.k.device),
            positions=state.positions[:, None, :].expand(b, h, n),
        )

    def write(self, state: FullHistoryState, chunk: Chunk) -> FullHistoryState:
        dtype = state.k.dtype
        return FullHistoryState(
            k=torch.cat([state.k, chunk.k.to(dtype)], dim=2),
            v=torch.cat([state.v, chunk.v.to(dtype)], dim=2),
            positions=torch.cat(
                [state.positions, token_positions(chunk.frame_positions.long(), chunk.tokens_per_frame)], dim=1
            ),
        )

    def __repr__(self) -> str:
        return f"FullHistoryMemory(heads={self.heads}, head_dim={self.head_dim})"
