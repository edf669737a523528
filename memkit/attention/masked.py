"""Attention with per-query masks over several key sources (the attach path's masked route).

:func:`memkit.attend` takes a memory's contexts and the segment's own keys, every segment
key visible to every query. Host models also mask their own attention: key padding
(HunyuanVideo's prompt), frame-level block-causal masks (SkyReels-V2's diffusion forcing),
extra tokens such as a prompt's keys in joint text-video attention. :func:`attend_masked`
takes any number of ``(k, v, mask)`` sources, each mask broadcastable to ``(b h n m)``,
and equals softmax attention over the concatenation of the sources under the
concatenated mask.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from memkit.attention.backends import get_backend
from memkit.errors import BackendUnavailableError, ShapeError

__all__ = ["attend_masked"]

#: One key source: keys and values ``(b h m d)`` and a boolean mask broadcastable to
#: ``(b h n m)`` (True = may be attended) or ``None`` (every key visible to every query).
Source = tuple[Tensor, Tensor, Tensor | None]


def attend_masked(q: Tensor, sources: Sequence[Source], *, backend: str = "auto") -> Tensor:
    """Attention of ``q (b h n d)`` over the concatenation of ``sources`` under their masks.

    A query row that sees no key at all gets a zero output (softmax over nothing is
    undefined; zero is what the log-sum-exp merge of :mod:`memkit.attention.reference`
    gives such a row). Keys must already carry their rotary embedding.

    Args:
        q: queries ``(b h n d)``.
        sources: ``(k, v, mask)`` triples, ``k, v (b h m d)`` (``b`` and ``h`` may be 1 to
            broadcast), ``mask`` bool broadcastable to ``(b h n m)`` or ``None``.
        backend: ``"auto"``, ``"math"`` (float32 reference), ``"sdpa"`` or ``"xformers"``.

    Returns:
        ``(b h n d)`` in ``q``'s dtype.

    Example:
        >>> import torch
        >>> from memkit.attention.masked import attend_masked
        >>> q = k = v = torch.randn(1, 2, 4, 8)
        >>> causal = torch.ones(4, 4, dtype=torch.bool).tril()        # (n m), broadcast over b and h
        >>> out = attend_masked(q, [(k, v, causal)])
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
        True
    """
    if q.ndim != 4:
        raise ShapeError(f"q: expected (b h n d), got shape {tuple(q.shape)}")
    b, h, n, d = q.shape
    keys, values, masks = [], [], []
    for i, (k, v, mask) in enumerate(sources):
        if k.ndim != 4 or k.shape[-1] != d or v.shape[:3] != k.shape[:3]:
            raise ShapeError(
                f"sources[{i}]: expected k, v (b h m d) with dimension d (head_dim) {d}, "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        m = k.shape[2]
        if m == 0:
            continue
        full = torch.ones((1, 1, 1, m), dtype=torch.bool, device=q.device) if mask is None else mask
        if full.dtype != torch.bool:
            raise ShapeError(f"sources[{i}]: expected a boolean mask (True = may be attended), got {full.dtype}")
        try:
            full = full.expand(b, h, n, m)
        except RuntimeError:
            raise ShapeError(
                f"sources[{i}]: the mask {tuple(full.shape)} does not broadcast to (b h n m) = {(b, h, n, m)}"
            ) from None
        keys.append(k.expand(b, h, m, d))
        values.append(v.expand(b, h, m, v.shape[-1]))
        masks.append(full)
    if not keys:
        return q.new_zeros((b, h, n, d))
    key, value, mask = torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=3)
    seen = mask.any(dim=-1, keepdim=True)  # (b h n 1)
    # a row that sees nothing would be NaN; let it see every key, then zero it
    mask = mask | ~seen
    name = get_backend(backend, q).name
    if name == "math":
        scale = 1.0 / math.sqrt(d)
        scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), key.float()) * scale
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.einsum("bhnm,bhmd->bhnd", weights, value.float()).to(q.dtype)
    elif name == "xformers":
        import xformers.ops as xops

        m = key.shape[2]
        pad = (-m) % 8  # xformers wants the bias's last dimension padded to a multiple of 8
        bias = torch.zeros((b, h, n, m + pad), dtype=q.dtype, device=q.device)[..., :m]
        bias.masked_fill_(~mask, float("-inf"))
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), key.to(q.dtype).transpose(1, 2), value.to(q.dtype).transpose(1, 2), attn_bias=bias
        ).transpose(1, 2)
    elif name == "sdpa":
        out = F.scaled_dot_product_attention(q, key.to(q.dtype), value.to(q.dtype), attn_mask=mask)
    else:  # a registered backend takes no per-query mask: say so rather than run another kernel
        raise BackendUnavailableError(
            f"attention backend {name!r} has no masked form; masked attention runs on 'math', 'sdpa' or 'xformers'"
        )
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
