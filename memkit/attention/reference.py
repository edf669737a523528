"""The readable reference: attention as partial results merged by log-sum-exp.

Attention of queries over several key/value sources can be computed one source at a
time. Each partial result keeps its log-sum-exp (the log of its softmax normaliser);
merging weights each partial output by ``exp(lse_i - lse)`` where
``lse = logsumexp_i(lse_i)``. The merge equals attention over the concatenation of the
sources, exactly (up to rounding), which is why memories compose.
"""

import math

import torch
from torch import Tensor


def attend_partial(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of ``q (b h n d)`` over one source ``k, v (b h m d)``.

    ``mask`` is ``(b h m)`` bool (True = may be attended; a False slot contributes exactly
    nothing, even when it holds NaN or Inf). Returns the normalised output
    ``(b h n d)`` and its log-sum-exp ``(b h n)``; a query that sees no valid key gets a
    zero output and ``lse = -inf``, so it contributes nothing to a merge.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mask is not None:
        # a masked-out slot contributes nothing, whatever it holds: zero it before any arithmetic
        # (a -inf score alone is not enough, since its weight 0 times a NaN or Inf value is NaN)
        k = torch.where(mask[..., None], k, 0)
        v = torch.where(mask[..., None], v, 0)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) is nan; a row with no valid key must give weights 0 instead
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(scores - safe_lse[..., None])
    out = torch.einsum("bhnm,bhmd->bhnd", weights, v.float())
    return out, lse


def merge_partials(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge normalised partial outputs by their log-sum-exps (see the module docstring)."""
    lse_all = torch.stack(lses)  # (s b h n)
    lse = torch.logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_all - safe)  # a source with lse -inf gets weight 0
    out = sum(w[..., None] * o for w, o in zip(weights, outs, strict=True))
    assert isinstance(out, Tensor)
    return out, lse


def attend_math(q: Tensor, k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Reference backend: one partial per source, merged by log-sum-exp; float32 inside."""
    outs, lses = [], []
    for kk, vv, mm in [(k, v, None), *contexts]:
        o, lse = attend_partial(q, kk, vv, mm)
        outs.append(o)
        lses.append(lse)
    out, _ = merge_partials(outs, lses)
    return out.to(q.dtype)
