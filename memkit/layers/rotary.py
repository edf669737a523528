"""Rotary position embedding with explicit (integer) positions.

Positions are absolute frame indices, passed in rather than inferred from tensor length,
so a key kept in memory is rotated at the frame where it was recorded and positions keep
counting past the length a model was trained on.
"""

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of shape ``positions.shape + (dim,)`` (half-split layout)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    # float64 angles: frame indices in the tens of thousands keep their precision
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, positions: Tensor, theta: float = 10000.0, rotary_dim: int | None = None) -> Tensor:
    """Rotate ``x (b h n d)`` by ``positions`` (``(b n)`` or ``(b h n)``) over its first ``rotary_dim`` channels."""
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if positions.ndim == 2:
        positions = positions[:, None, :]
    cos, sin = rotary_angles(positions, rd, theta)
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot.float().chunk(2, dim=-1)
    rotated = rot.float() * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)
