"""Rotary position embedding with explicit (integer) positions.

Positions are absolute frame indices, passed in rather than inferred from tensor length,
so a key kept in memory is rotated at the frame where it was recorded and positions keep
counting past the length a model was trained on.
"""

import weakref
from typing import Any

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of shape ``positions.shape + (dim,)`` (half-split layout)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    # float64 angles: frame indices in the tens of thousands keep their precision
    angles = positions.to(torch.float64)[..., None] * inv_freq
    # the two halves share their angles: cos and sin of one half, then each copied (same values, half the work)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rotary(x: Tensor, positions: Tensor, theta: float = 10000.0, rotary_dim: int | None = None) -> Tensor:
    """Rotate ``x (b h n d)`` by ``positions`` (``(b n)`` or ``(b h n)``) over its first ``rotary_dim`` channels."""
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if positions.ndim == 2:
        positions = positions[:, None, :]
    elif positions.shape[1] > 1 and positions.stride(1) == 0:
        # positions shared by every head (a context expanded over h): one table, broadcast over the heads
        positions = positions[:, :1]
    cos, sin = rotary_angles(positions, rd, theta)
    return rotate_with(x, cos, sin)


def rotate_with(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (b h n d)`` by a table from :func:`rotary_angles` over its first ``cos.shape[-1]`` channels.

    Equals :func:`apply_rotary` at the table's positions (the same arithmetic, so the same bits).
    """
    rd = cos.shape[-1]
    rot = x[..., :rd].float()
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = (rot * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    if rd == x.shape[-1]:  # every channel rotates: nothing to append (and no copy to make)
        return rotated
    return torch.cat([rotated, x[..., rd:]], dim=-1)


# the segment's own tokens sit at the same positions in every layer and at every denoising step
# (a sampler hands the same frame_positions tensor to each call of the segment), so their table
# is computed once and kept for as long as that tensor lives unchanged
_SEGMENT_TABLE: list[Any] = [None]


def segment_rotary_table(
    frame_positions: Tensor, tokens_per_frame: int, dim: int, theta: float
) -> tuple[Tensor, Tensor]:
    """``cos, sin`` ``(b 1 n dim)`` for a segment's tokens at ``frame_positions (b f)``, frame-major.

    Memoised on the ``frame_positions`` tensor itself (its identity and version counter), so
    every layer and every denoising step of a segment share one table. The values are those
    of :func:`rotary_angles` at the tokens' positions.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        hit = _SEGMENT_TABLE[0]
        if (
            hit is not None
            and hit[0]() is frame_positions
            and hit[1] == (frame_positions._version, tokens_per_frame, dim, theta)
        ):
            return hit[2], hit[3]
    positions = frame_positions.repeat_interleave(tokens_per_frame, dim=1)[:, None, :]
    cos, sin = rotary_angles(positions, dim, theta)
    if not compiling:
        key = (frame_positions._version, tokens_per_frame, dim, theta)
        _SEGMENT_TABLE[0] = (weakref.ref(frame_positions), key, cos, sin)
    return cos, sin
