"""``PackedHistoryMemory``: recent frames whole, older frames pooled into geometrically fewer tokens (FramePack)."""

from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor

from memkit.memories.frames import (
    check_chunk,
    check_layout,
    check_query,
    check_state,
    gather_frames,
    keep_last_valid,
    split_frames,
)
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import typechecked


@memory_state
class PackedHistoryState(MemoryState):
    """State of :class:`PackedHistoryMemory`: one frame buffer per level.

    Attributes:
        k, v: tuples of ``L`` tensors; level ``i`` is ``(b h F t_i d)`` with ``t_i = t / 2**i``
            tokens a frame, oldest frame first.
        pos, valid: tuples of ``L`` tensors ``(b F)``: frame positions and filled slots.
    """

    layouts: ClassVar[dict[str, str]] = {"pos": "b F", "valid": "b F"}

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    pos: tuple[Tensor, ...]
    valid: tuple[Tensor, ...]


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
        >>> [k.shape[3] for k in state.k]  # tokens a frame at each level
        [16, 8, 4]
        >>> k = torch.randn(1, 2, 5 * 16, 8)  # 5 frames
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 80, 16), torch.arange(5)[None], 16))
        >>> [p.tolist() for p in state.pos], [v.tolist() for v in state.valid]
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
        dtype = dtype or torch.get_default_dtype()
        b, h, d, f = batch_size, self.heads, self.head_dim, self.frames_per_level

        def buf(level: int) -> Tensor:
            return torch.zeros((b, h, f, self.level_tokens(level), d), device=device, dtype=dtype)

        levels = range(self.levels)
        return PackedHistoryState(
            k=tuple(buf(i) for i in levels),
            v=tuple(buf(i) for i in levels),
            pos=tuple(torch.zeros((b, f), device=device, dtype=torch.long) for _ in levels),
            valid=tuple(torch.zeros((b, f), device=device, dtype=torch.bool) for _ in levels),
        )

    def _checked(self, where: str, state: PackedHistoryState) -> None:
        check_state(f"PackedHistoryMemory.{where}", state, PackedHistoryState)
        check_state_matches(f"PackedHistoryMemory.{where}", state, self)

    @typechecked
    def read(self, state: PackedHistoryState, query: Query) -> Context:
        """Every level, oldest (most pooled) first: ``(b h F t (2 - 2**(1-L)) d)`` slots."""
        self._checked("read", state)
        check_query("PackedHistoryMemory", query, state.batch_size, self.heads, self.head_dim, state.k[0].device)
        return self._context(state)

    @typechecked
    def plan(self, state: PackedHistoryState, layout: ReadLayout) -> ReadPlan:
        """The whole read, prepared once per segment: it does not depend on the queries."""
        self._checked("plan", state)
        check_layout("PackedHistoryMemory", layout, state.batch_size, state.k[0].device)
        return ReadPlan(parts=(self._context(state),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _context(self, state: PackedHistoryState) -> Context:
        ks, vs, masks, positions = [], [], [], []
        for i in reversed(range(self.levels)):
            b, h, _, t, _ = state.k[i].shape
            ks.append(rearrange(state.k[i], "b h f t d -> b h (f t) d"))
            vs.append(rearrange(state.v[i], "b h f t d -> b h (f t) d"))
            masks.append(state.valid[i].repeat_interleave(t, dim=1)[:, None, :].expand(b, h, -1))
            positions.append(state.pos[i].repeat_interleave(t, dim=1)[:, None, :].expand(b, h, -1))
        return Context(
            k=torch.cat(ks, dim=2),
            v=torch.cat(vs, dim=2),
            mask=torch.cat(masks, dim=2),
            positions=torch.cat(positions, 2),
        )

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
            state.k[0].device,
            self.tokens_per_frame,
        )
        dtype = state.k[0].dtype
        # frames entering the current level, in order; fixed count f at every level
        in_k = split_frames(chunk.k.to(dtype), self.tokens_per_frame)
        in_v = split_frames(chunk.v.to(dtype), self.tokens_per_frame)
        in_pos = chunk.frame_positions.long()
        in_valid = torch.ones_like(in_pos, dtype=torch.bool)
        f, capacity = in_pos.shape[1], self.frames_per_level
        ks, vs, poss, valids = [], [], [], []
        for i in range(self.levels):
            if i > 0:  # what level i-1 evicted, pooled once more (an average of equal-size averages)
                in_k, in_v = _pool_step(in_k, self.frame_shape, i), _pool_step(in_v, self.frame_shape, i)
            cand_k, cand_v = torch.cat([state.k[i], in_k], dim=2), torch.cat([state.v[i], in_v], dim=2)
            cand_pos = torch.cat([state.pos[i], in_pos], dim=1)
            cand_valid = torch.cat([state.valid[i], in_valid], dim=1)
            order = keep_last_valid(cand_valid, capacity + f)  # every candidate: dropped ones first, in order
            keep, out = order[:, f:], order[:, :f]
            ks.append(gather_frames(cand_k, keep, 2))
            vs.append(gather_frames(cand_v, keep, 2))
            poss.append(cand_pos.gather(1, keep))
            valids.append(cand_valid.gather(1, keep))
            in_k, in_v = gather_frames(cand_k, out, 2), gather_frames(cand_v, out, 2)
            in_pos, in_valid = cand_pos.gather(1, out), cand_valid.gather(1, out)
        return PackedHistoryState(k=tuple(ks), v=tuple(vs), pos=tuple(poss), valid=tuple(valids))

    def __repr__(self) -> str:
        return (
            f"PackedHistoryMemory(heads={self.heads}, head_dim={self.head_dim}, "
            f"tokens_per_frame={self.tokens_per_frame}, frames_per_level={self.frames_per_level}, "
            f"levels={self.levels}, frame_shape={self.frame_shape})"
        )


register_memory("packed_history", PackedHistoryMemory)
