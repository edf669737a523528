"""The parts of :class:`memkit.models.malt.MALTNetwork`: patches, embeddings, and the transformer block with memory."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from memkit.layers import MemoryAttention
from memkit.models.malt.config import MALTConfig
from memkit.protocol import Memory

__all__ = ["patchify", "unpatchify", "timestep_embedding", "sincos_2d", "MALTBlock"]


def patchify(x: Tensor, patch: int, tubelet: int) -> Tensor:
    """``(b F c H W) -> (b n tubelet*c*patch*patch)``, tokens frame-major then row-major."""
    return rearrange(x, "b (f pt) c (hh p) (ww q) -> b (f hh ww) (pt c p q)", pt=tubelet, p=patch, q=patch)


def unpatchify(tokens: Tensor, patch: int, tubelet: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    return rearrange(
        tokens,
        "b (f hh ww) (pt c p q) -> b (f pt) c (hh p) (ww q)",
        hh=height // patch,
        ww=width // patch,
        pt=tubelet,
        c=channels,
        p=patch,
        q=patch,
    )


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000, as DiT does), ``(b,) -> (b dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def sincos_2d(rows: int, cols: int, dim: int) -> Tensor:
    """DiT/MAE's 2-D sin-cos position table ``(rows * cols, dim)``, row-major; half the channels
    encode the row, half the column, values in ``[-1, 1]`` (channels past ``4 * (dim // 4)`` are 0).

    Example:
        >>> sincos_2d(2, 3, 8).shape
        torch.Size([6, 8])
    """
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=-1).float()
    return torch.nn.functional.pad(table, (0, dim - table.shape[-1]))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor) -> Tensor:
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(ctx), "b p (two h d) -> two b h p d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class MALTBlock(nn.Module):
    """adaLN-Zero transformer block: memory self-attention, optional prompt cross-attention, MLP.

    The modulation is computed per token-frame from the conditioning ``(b f D)`` (timestep
    + pooled prompt + that frame's action), so each frame can be conditioned differently.
    """

    def __init__(self, config: MALTConfig, memory: Memory[Any] | None) -> None:
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MemoryAttention(
            dim,
            config.heads,
            memory,
            rope_theta=config.rope_theta,
            qk_norm=config.qk_norm,
            backend=config.backend,
            max_distance=config.memory_max_distance,
        )
        self.cross: _CrossAttention | None = None
        self.layer_text_keys = config.memory_text_keys == "layer"
        if config.prompt_dim and config.prompt_mode == "cross":
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = _CrossAttention(dim, config.heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        h: Tensor,
        cond: Tensor,
        state: Any,
        frame_positions: Tensor,
        *,
        write: bool,
        mem_prompt: Tensor | None,
        mem_prompt_mask: Tensor | None,
        cross_ctx: tuple[Tensor, Tensor] | None,
        frame_meta: Tensor | None = None,
        output: bool = True,
    ) -> tuple[Tensor, Any]:
        """``(h, state)``; ``output=False``: only the memory write (``h`` returned as it came in)."""
        t = h.shape[1] // frame_positions.shape[1]
        mod = self.ada(cond).repeat_interleave(t, dim=1)  # (b n 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = _modulate(self.norm1(h), shift1, scale1)
        if self.layer_text_keys and self.cross is not None and mem_prompt is not None:
            # this block's own text keys (the key half of its cross-attention projection), as MemFlow scores its bank
            mem_prompt = self.cross.to_kv(mem_prompt)[..., : mem_prompt.shape[-1]]
        if not output:  # the clean pass's last block: its output is never used, only the write is
            if write:
                state = self.attn._write_only(x, state, frame_positions, mem_prompt, mem_prompt_mask, frame_meta)
            return h, state
        a, state = self.attn.step(
            x, state, frame_positions, mem_prompt, mem_prompt_mask, write=write, frame_meta=frame_meta
        )
        h = h + gate1 * a
        if self.cross is not None and cross_ctx is not None:
            h = h + self.cross(self.norm_cross(h), *cross_ctx)
        h = h + gate2 * self.mlp(_modulate(self.norm2(h), shift2, scale2))
        return h, state
