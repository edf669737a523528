"""``PackedHistoryMemory``: recent frames whole, older frames pooled into geometrically fewer tokens (FramePack)."""

import torch
from einops import rearrange
from torch import Tensor

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.memories.frames import FrameBuffer, keep_last_valid
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked


@memory_state
class PackedHistoryState(MemoryState):
    """State of :class:`PackedHistoryMemory`: one frame buffer per level.

    Attributes:
        levels: ``L`` :class:`memkit.memories.frames.FrameBuffer` s of ``F`` slots, oldest frame first;
            level ``i``'s keys and values are ``(b h F t_i d)`` with ``t_i = t / 2**i`` tokens a frame.

    Files saved before the buffers (format version 1) named the tensors ``k[i], v[i], pos[i],
    valid[i]``; :func:`memkit.load_states` maps the old names.
    """

    levels: tuple[FrameBuffer, ...]


def pool_tokens(x: Tensor, frame_shape: tuple[int, int], level: int) -> Tensor:
    """Average-pool the tokens of each frame of ``x (b h F t d)`` by ``2**level``.

    Tokens are a raster ``(H, W) = frame_shape`` of the frame; the pooling alternates the
    width and the height (level 1 pools 1x2, level 2 2x2, level 3 2x4...), so a frame of
    ``t`` tokens becomes ``t / 2**level``. A frame of one row (``H = 1``) pools along the row.

    Example:
        >>> x = torch.arange(8.).reshape(1, 1, 1, 8, 1)          # one frame, 2 rows of 4 tokens
        >>> pool_tokens(x, (2, 4), 1).flatten().tolist()
        [0.5, 2.5, 4.5, 6.5]
        >>> pool_tokens(x, (2, 4), 2).flatten().tolist()
        [2.5, 4.5]
    """
    fh, fw = _factors(frame_shape, level)
    return rearrange(x, "b h f (H fh W fw) d -> b h f (H W) (fh fw) d", H=frame_shape[0] // fh, fh=fh, fw=fw).mean(
        dim=-2
    )


def _pool_step(x: Tensor, frame_shape: tuple[int, int], level: int) -> Tensor:
    """Pool frames of ``x (b h F t_{level-1} d)``, already at ``level - 1``, to ``level``: 2 tokens to 1."""
    fh0, fw0 = _factors(frame_shape, level - 1)
    fh1, fw1 = _factors(frame_shape, level)
    rows = frame_shape[0] // fh1
    return rearrange(x, "b h f (H fh W fw) d -> b h f (H W) (fh fw) d", H=rows, fh=fh1 // fh0, fw=fw1 // fw0).mean(
        dim=-2
    )


def _factors(frame_shape: tuple[int, int], level: int) -> tuple[int, int]:
    """The (height, width) pooling factors of a level: width first, then alternating."""
    if frame_shape[0] == 1:
        return 1, 2**level
    return 2 ** (level // 2), 2 ** ((level + 1) // 2)


class PackedHistoryMemory:
    """Multi-rate packed history: the newest frames at full resolution, older ones pooled 2x per level (FramePack).

    Level 0 holds the ``frames_per_level`` newest frames whole. A frame leaving level
    ``i`` is average-pooled to half as many tokens and enters level ``i + 1``; leaving the
    last level it is dropped. ``L`` levels of ``F`` frames cover the last ``L F`` frames
    with ``F t (2 - 2**(1-L))`` slots, fewer than ``2 F t`` however many levels, so the
    context length stays bounded while the covered history grows geometrically cheaper.
    Pooling acts on keys before rotary and on values; a pooled token keeps its frame's
    position, so it is rotated as its frame was (memkit's rotary is per frame). The
    pooling is defined here on keys/values, not on latents, so it works on any host.

    FramePack compresses older frames with larger patchify kernels on the *input* and
    trains the model for it; this is the training-free memory-side analogue (averaged keys
    and values), documented as such. A pooled token stands for ``2**i`` tokens but gets one
    token's share of attention (no log-count bias: :class:`memkit.Context` has none).

    Cost: ``read`` O(1) (concatenates the levels), ``write`` O(L F t h d).
    State bytes: ``2 b h F t d (2 - 2**(1-L)) * itemsize + 9 b F L``.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``; must equal ``H * W`` of ``frame_shape``.
        frames_per_level: ``F``.
        levels: ``L`` (``t`` must be divisible by ``2**(L-1)``, with ``frame_shape`` splitting evenly).
        frame_shape: ``(H, W)`` raster of a frame's tokens; default ``(1, t)`` (pool along the token order).

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PackedHistoryMemory(2, 8, 16, frames_per_level=2, levels=3, frame_shape=(4, 4))
        >>> state = mem.init_state(1)
        >>> [level.k.shape[3] for level in state.levels]  # tokens a frame at each level
        [16, 8, 4]
        >>> k = torch.randn(1, 2, 5 * 16, 8)  # 5 frames
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 80, 16), torch.arange(5)[None], 16))
        >>> [level.pos.tolist() for level in state.levels], [level.valid.tolist() for level in state.levels]
        ([[[3, 4]], [[1, 2]], [[0, 0]]], [[[True, True]], [[True, True]], [[False, True]]])
        >>> mem.read(state, memkit.Query(torch.randn(1, 2, 16, 8), torch.tensor([[5]]), 16)).num_slots
        56
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        frames_per_level: int = 2,
        levels: int = 3,
        frame_shape: tuple[int, int] | None = None,
    ) -> None:
        if min(heads, head_dim, tokens_per_frame, frames_per_level, levels) < 1:
            raise ValueError(
                "PackedHistoryMemory: heads, head_dim, tokens_per_frame, frames_per_level and levels must be "
                f"positive, got {heads}, {head_dim}, {tokens_per_frame}, {frames_per_level}, {levels}"
            )
        shape = (1, tokens_per_frame) if frame_shape is None else tuple(int(s) for s in frame_shape)
        if len(shape) != 2 or shape[0] * shape[1] != tokens_per_frame:
            raise ValueError(
                f"PackedHistoryMemory: frame_shape {frame_shape} should be (H, W) with H * W = tokens_per_frame "
                f"= {tokens_per_frame}"
            )
        fh, fw = _factors((shape[0], shape[1]), levels - 1)
        if shape[0] % fh or shape[1] % fw:
            raise ValueError(
                f"PackedHistoryMemory: {levels} levels pool the last level's frames by {fh}x{fw} (height x width), "
                f"which does not divide frame_shape {shape}; use fewer levels or another frame_shape"
            )
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.frames_per_level, self.levels = frames_per_level, levels
        self.frame_shape: tuple[int, int] = (shape[0], shape[1])

    def level_tokens(self, level: int) -> int:
        """Tokens a frame has at ``level``: ``t / 2**level``."""
        return self.tokens_per_frame >> level

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PackedHistoryState:
        batch_size = check_init_args("PackedHistoryMemory.init_state", batch_size, device, dtype)
        b, h, d, f = batch_size, self.heads, self.head_dim, self.frames_per_level
        return PackedHistoryState(
            levels=tuple(
                FrameBuffer.empty(b, h, f, self.level_tokens(i), d, device=device, dtype=dtype)
                for i in range(self.levels)
            )
        )

    def _checked(self, where: str, state: PackedHistoryState) -> None:
        check_state(f"PackedHistoryMemory.{where}", state, PackedHistoryState)
        check_state_matches(f"PackedHistoryMemory.{where}", state, self)

    @typechecked
    def read(self, state: PackedHistoryState, query: Query) -> Context:
        """Every level, oldest (most pooled) first: ``(b h F t (2 - 2**(1-L)) d)`` slots."""
        self._checked("read", state)
        check_query("PackedHistoryMemory", query, state.batch_size, self.heads, self.head_dim, state.levels[0].k.device)
        return self._context(state)

    @typechecked
    def plan(self, state: PackedHistoryState, layout: ReadLayout) -> ReadPlan:
        """The whole read, prepared once per segment: it does not depend on the queries."""
        self._checked("plan", state)
        check_layout("PackedHistoryMemory", layout, state.batch_size, state.levels[0].k.device)
        return ReadPlan(parts=(self._context(state),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _context(self, state: PackedHistoryState) -> Context:
        return Context.concat([level.to_context() for level in reversed(state.levels)])

    @typechecked
    def write(self, state: PackedHistoryState, chunk: Chunk) -> PackedHistoryState:
        """Push the new frames into level 0; what each level evicts, pooled, enters the next."""
        self._checked("write", state)
        check_chunk(
            "PackedHistoryMemory",
            chunk,
            state.batch_size,
            self.heads,
            self.head_dim,
            state.levels[0].k.device,
            self.tokens_per_frame,
        )
        # frames entering the current level, in order; fixed count f at every level
        new = FrameBuffer.from_chunk(chunk, self.tokens_per_frame, state.levels[0].k.dtype)
        f, capacity = new.frames, self.frames_per_level
        levels = []
        for i, level in enumerate(state.levels):
            if i > 0:  # what level i-1 evicted, pooled once more (an average of equal-size averages)
                new = new.replace(k=_pool_step(new.k, self.frame_shape, i), v=_pool_step(new.v, self.frame_shape, i))
            cand = level.cat(new)
            order = keep_last_valid(cand.valid, capacity + f)  # every candidate: dropped ones first, in order
            levels.append(cand.gather(order[:, f:]))
            new = cand.gather(order[:, :f])
        return PackedHistoryState(levels=tuple(levels))

    def __repr__(self) -> str:
        return (
            f"PackedHistoryMemory(heads={self.heads}, head_dim={self.head_dim}, "
            f"tokens_per_frame={self.tokens_per_frame}, frames_per_level={self.frames_per_level}, "
            f"levels={self.levels}, frame_shape={self.frame_shape})"
        )


register_memory("packed_history", PackedHistoryMemory)
