"""Adapters for attention modules memkit knows: ``torch.nn.MultiheadAttention``."""

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from memkit.errors import AttachError
from memkit.integrations.layer_attend import LayerAttend

__all__ = ["multihead_attention_adapter"]


def multihead_attention_adapter(module: nn.MultiheadAttention, attend: LayerAttend, *args: Any, **kwargs: Any) -> Any:
    """An :class:`AttentionAdapter` for ``torch.nn.MultiheadAttention`` used as self-attention.

    Supports ``batch_first=True`` modules with packed input projections, called as
    ``mha(x, x, x)`` without masks; returns ``(output (b n D), None)`` like
    ``need_weights=False``.

    Example:
        >>> import torch, memkit
        >>> from torch import nn
        >>> from memkit.integrations import multihead_attention_adapter
        >>> mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 8, 16)
        >>> want = mha(x, x, x, need_weights=False)[0]
        >>> with memkit.attach(mha, memkit.NoMemory(), layers="", adapter=multihead_attention_adapter) as s:
        ...     s.set_segment([0, 1])
        ...     got = mha(x, x, x)[0]
        >>> torch.allclose(got, want, atol=1e-6)
        True
    """
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    bound = dict(zip(names, args, strict=False)) | kwargs
    query = bound.get("query")
    if not isinstance(query, Tensor):
        raise AttachError("multihead_attention_adapter: expected the query tensor as the first argument")
    x: Tensor = query
    if not module.batch_first or not module._qkv_same_embed_dim:
        raise AttachError("multihead_attention_adapter needs batch_first=True and equal q/k/v embedding sizes")
    if bound.get("key") is not x or bound.get("value") is not x:
        raise AttachError("multihead_attention_adapter supports self-attention only: call mha(x, x, x)")
    if any(bound.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or bound.get("is_causal"):
        raise AttachError("multihead_attention_adapter does not support attention masks")
    assert module.in_proj_weight is not None  # packed projections were checked above
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, module.num_heads, -1)).permute(2, 0, 3, 1, 4)
    out = attend(q, k, v, hidden=x)
    return module.out_proj(out.transpose(1, 2).flatten(2)), None
