"""``TinySegmentModel``: the smallest segment-autoregressive transformer that hosts memories.

Used by learning tests, the stream tour and examples. Each block is pre-norm
:class:`MemoryAttention` + MLP; tokens are laid out frame-major with a learned
within-frame position embedding, and the frame position enters through rotary embeddings.
"""

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from memkit.layers import MemoryAttention, init_memory_states
from memkit.protocol import Memory
from memkit.state import like_states
from memkit.typing import Bool, Float, Int, check_shape, typechecked


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, memory: Memory[Any] | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MemoryAttention(dim, heads, memory)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class TinySegmentModel(nn.Module):
    """A tiny transformer that processes a video one segment at a time, with memory.

    Args:
        in_dim: features per input token.
        out_dim: features per output token.
        tokens_per_frame: ``t``.
        dim, depth, heads: transformer width, blocks, heads.
        memory: ``memory(layer_index) -> Memory | None``; called once per block (``None``
            for no memory at that block).

    Shapes: ``x (b n in_dim)`` with ``n = f * t``; ``frame_positions (b f)``; returns
    ``(b n out_dim)`` and the per-layer states (a tuple, one per block).

    Example:
        >>> import torch, memkit
        >>> from memkit.models import TinySegmentModel
        >>> model = TinySegmentModel(3, 3, tokens_per_frame=4, dim=16, heads=2,
        ...     memory=lambda i: memkit.FIFOMemory(2, 8, 4, frames=4))
        >>> states = model.init_states(1)
        >>> x, pos = torch.randn(1, 8, 3), torch.tensor([[0, 1]])
        >>> _, states = model(x, states, pos, write=True)   # clean pass of segment 0
        >>> y, _ = model(x, states, pos + 2)                # segment 1 reads segment 0
        >>> y.shape
        torch.Size([1, 8, 3])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        tokens_per_frame: int,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        memory: Callable[[int], Memory[Any] | None] | None = None,
    ) -> None:
        super().__init__()
        self.tokens_per_frame = tokens_per_frame
        self.inp = nn.Linear(in_dim, dim)
        self.spatial = nn.Parameter(torch.randn(tokens_per_frame, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, memory(i) if memory else None) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def _blocks(self) -> list[_Block]:
        return cast(list[_Block], list(self.blocks))

    def init_states(self, batch_size: int, **kwargs: Any) -> tuple[Any, ...]:
        """One empty memory state per block, by block name (:func:`memkit.init_memory_states`)."""
        return init_memory_states(self, batch_size, **kwargs)

    @typechecked
    def forward(
        self,
        x: Float[Tensor, "b n i"],
        states: tuple[Any, ...],
        frame_positions: Int[Tensor, "b f"],
        *,
        write: bool = False,
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
    ) -> tuple[Float[Tensor, "b n o"], tuple[Any, ...]]:
        """Process one segment; with ``write=True`` also write it into every memory."""
        f = check_shape("frame_positions", frame_positions, "b f")["f"]
        check_shape("x", x, "b n i", n=f * self.tokens_per_frame)
        h = self.inp(x) + self.spatial.repeat(f, 1)
        new_states = []
        for block, state in zip(self._blocks(), states, strict=True):
            a, state = block.attn.step(block.norm1(h), state, frame_positions, prompt, prompt_mask, write=write)
            new_states.append(state)
            h = h + a
            h = h + block.mlp(block.norm2(h))
        return self.out(self.norm(h)), like_states(states, new_states)
