"""``attend``: the one seam through which memory enters attention."""

import torch
from torch import Tensor

from memkit.attention.backends import get_backend
from memkit.attention.masked import attend_masked
from memkit.errors import ShapeError
from memkit.protocol import Context
from memkit.typing import Float, at_door, check_floating, check_shape, typechecked


@typechecked
def attend(
    q: Float[Tensor, "b h n d"],
    k: Float[Tensor, "b h n2 d"],
    v: Float[Tensor, "b h n2 d"],
    *contexts: Context,
    mask: Tensor | None = None,
    backend: str = "auto",
) -> Float[Tensor, "b h n d"]:
    """Attend queries over their own keys and every context's valid slots.

    Equals softmax attention over the concatenation of ``k`` and all context keys, with
    invalid context slots masked out; a context with no valid slot contributes nothing.
    Keys must already carry their rotary embedding (:class:`MemoryAttention` does it).

    Args:
        q: queries ``(b h n d)``.
        k: the segment's own keys ``(b h n2 d)``; always valid.
        v: the segment's own values ``(b h n2 d)``.
        *contexts: :class:`Context` objects from memories, ``(b h m d)`` each.
        mask: the host's own boolean mask over the segment's keys, broadcastable to
            ``(b h n n2)`` as ``scaled_dot_product_attention``'s ``attn_mask`` (True = may
            be attended): key padding as ``(b 1 1 n2)``, a block-causal mask as ``(n n2)``.
            Context slots are the past: every query sees every valid slot. A query that
            sees no key at all gets a zero output. ``None``: every segment key is valid.
        backend: ``"auto"`` (the :func:`memkit.attention_backend` choice, else the runnable
            backend of highest priority), ``"math"``, ``"sdpa"`` or ``"xformers"``.

    Returns:
        ``(b h n d)``, in ``q``'s dtype.

    Example:
        >>> import torch, memkit
        >>> q = k = v = torch.randn(1, 2, 6, 8)
        >>> memkit.attend(q, k, v).shape
        torch.Size([1, 2, 6, 8])
        >>> causal = torch.ones(6, 6, dtype=torch.bool).tril()
        >>> out = memkit.attend(q, k, v, mask=causal)
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
        True
    """
    if at_door():
        check_attend_inputs(q, k, v, contexts)
    if mask is not None:
        sources = [
            (torch.where(c.mask[..., None], c.k, 0), torch.where(c.mask[..., None], c.v, 0), c.mask[:, :, None, :])
            for c in contexts
            if c.k.shape[2] > 0
        ]
        return attend_masked(q, [*sources, (k, v, mask)], backend=backend)
    return attend_parts(q, k, v, [(c.k, c.v, c.mask) for c in contexts if c.k.shape[2] > 0], backend)


def attend_parts(
    q: Tensor, k: Tensor, v: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]], backend: str = "auto"
) -> Tensor:
    """:func:`attend` without checks, contexts given as ``(k, v, mask)`` triples with at least one slot each.

    memkit's own layers call it with tensors already checked where they entered (and keys
    already rotated), so nothing is validated or rebuilt here.
    """
    return get_backend(backend, q).fn(q, k, v, parts)


def _fits(q: Tensor, k: Tensor, v: Tensor, contexts: tuple[Context, ...]) -> bool:
    """All inputs fit (in as few tensor attribute reads as possible: each costs about a microsecond)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)) or not q.is_floating_point():
        return False
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4:
        return False
    b, h, _, d = qs
    if ks[0] != b or ks[1] != h or ks[3] != d or v.shape != ks:
        return False
    # is_cpu is a flag; .device builds a torch.device per call (measurable at small shapes)
    on_cpu = q.is_cpu
    device = None if on_cpu else q.device
    for c in contexts:
        if not isinstance(c, Context):
            return False
        cs = c.k.shape
        if len(cs) != 4 or cs[0] != b or cs[1] != h or cs[3] != d:
            return False
        if not (c.k.is_cpu if on_cpu else c.k.device == device):
            return False
    return True


def check_attend_inputs(q: Tensor, k: Tensor, v: Tensor, contexts: tuple[Context, ...]) -> None:
    """The checks :func:`attend` runs at the door: shapes, heads, head_dim and device of every input."""
    if _fits(q, k, v, contexts):  # the common case in a few comparisons; the checks below name what is wrong
        return
    check_floating("q", q)
    s = check_shape("q", q, "b h n d")
    check_shape("k", k, "b h n d", b=s["b"], h=s["h"], d=s["d"])
    check_shape("v", v, "b h n d", b=s["b"], h=s["h"], n=k.shape[2], d=s["d"])
    for i, c in enumerate(contexts):
        if not isinstance(c, Context):
            raise ShapeError(f"contexts[{i}]: expected a memkit.Context, got {type(c).__name__}")
        check_shape(f"contexts[{i}].k", c.k, "b h m d", b=s["b"], h=s["h"], d=s["d"])
        if c.k.device != q.device:
            raise ShapeError(f"contexts[{i}]: expected tensors on {q.device}, got {c.k.device}")
