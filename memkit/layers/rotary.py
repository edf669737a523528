"""Rotary position embedding with explicit (integer) positions.

Positions are absolute frame indices, passed in rather than inferred from tensor length,
so a key kept in memory is rotated at the frame where it was recorded and positions keep
counting past the length a model was trained on.
"""

import torch
from torch import Tensor

from memkit.memo import TensorMemo, memo_active


def rotary_angles(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of shape ``positions.shape + (dim,)`` (half-split layout).

    On the CPU, rows of a table of every position from 0 up (kept per ``dim`` and ``theta``,
    grown when a larger position comes) instead of computing them again: one lookup instead of
    eight float64 operations, at every rotation of every layer and denoising step. The table's
    rows are this function's own values (computed by :func:`_compute_angles`), so the bits are
    the same; tests compare the two.
    """
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    if positions.is_cpu and not torch.compiler.is_compiling() and positions.numel():
        table = _table_for(positions, dim, theta)
        if table is not None:
            flat = positions.reshape(-1)
            cos, sin = table[0].index_select(0, flat), table[1].index_select(0, flat)
            return cos.view(*positions.shape, dim), sin.view(*positions.shape, dim)
    return _compute_angles(positions, dim, theta)


# (dim, theta) -> (cos, sin) rows for positions 0 .. P-1 (P a power of two); positions from _TABLE_LIMIT on
# are computed, which caps a table at 16 MB (dim 128)
_TABLES: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}
_TABLE_LIMIT = 1 << 14


def _table_for(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor] | None:
    """The CPU table covering ``positions`` (None when one is negative or past the limit)."""
    if positions.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        return None
    low, high = (int(x) for x in torch.aminmax(positions))
    if low < 0 or high >= _TABLE_LIMIT:
        return None
    key = (dim, float(theta))
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] <= high:
        size = min(_TABLE_LIMIT, max(1024, 1 << high.bit_length()))
        table = _compute_angles(torch.arange(size), dim, theta)
        _TABLES[key] = table
    return table


def _compute_angles(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """:func:`rotary_angles` computed from the positions (the reference the CPU table is made of)."""
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
_SEGMENT_TABLE = TensorMemo()


def segment_rotary_table(
    frame_positions: Tensor, tokens_per_frame: int, dim: int, theta: float
) -> tuple[Tensor, Tensor]:
    """``cos, sin`` ``(b 1 n dim)`` for a segment's tokens at ``frame_positions (b f)``, frame-major.

    Memoised on the ``frame_positions`` tensor itself (its identity and version counter), so
    every layer and every denoising step of a segment share one table. The values are those
    of :func:`rotary_angles` at the tokens' positions.
    """
    active, extra = memo_active(), (tokens_per_frame, dim, theta)
    if active:
        hit: tuple[Tensor, Tensor] | None = _SEGMENT_TABLE.get(None, (frame_positions,), extra)
        if hit is not None:
            return hit
    positions = frame_positions.repeat_interleave(tokens_per_frame, dim=1)[:, None, :]
    cos, sin = rotary_angles(positions, dim, theta)
    if active:
        _SEGMENT_TABLE.put(None, (frame_positions,), extra, (cos, sin))
    return cos, sin
