"""Attention backends in a small registry.

* ``math``: :mod:`memkit.attention.reference`, the readable reference every test
  compares against.
* ``sdpa``: torch's ``scaled_dot_product_attention`` over the concatenation of the
  segment's keys and every context (one fused call; the default on CPU).
* ``xformers``: ``xformers.ops.memory_efficient_attention``; CUDA only, imported lazily.

``auto`` picks xformers for CUDA tensors when it is installed and importable, otherwise
sdpa. Asking for a backend by name that cannot run raises
:class:`memkit.BackendUnavailableError` saying what is missing: never a silent fallback.
"""

import dataclasses
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from memkit.attention.reference import attend_math
from memkit.errors import BackendUnavailableError

# (q, k, v, [(k_ctx, v_ctx, mask_ctx), ...]) -> out; every tensor in b h n d layout
AttendFn = Callable[[Tensor, Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]], Tensor]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to compute attention; ``why_not`` says what stops it running, or None."""

    name: str
    fn: AttendFn
    why_not: Callable[[Tensor], str | None]


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend by name."""
    _REGISTRY[backend.name] = backend


def available_backends(q: Tensor | None = None) -> list[str]:
    """Names of the backends that can run on ``q`` (on a CPU tensor when ``q`` is None)."""
    probe = q if q is not None else torch.zeros(1, 1, 1, 1)
    return [name for name, b in _REGISTRY.items() if b.why_not(probe) is None]


def get_backend(name: str, q: Tensor) -> Backend:
    """The backend called ``name`` for ``q``, resolving ``auto``; raises if it cannot run."""
    if name == "auto":
        xf = _REGISTRY.get("xformers")
        if xf is not None and xf.why_not(q) is None:
            return xf
        return _REGISTRY["sdpa"]
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(_REGISTRY)}"
        )
    backend = _REGISTRY[name]
    reason = backend.why_not(q)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {name!r} cannot run here: {reason}")
    return backend


def _concat(
    k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys, values and a (b h m) key mask (None when every key is valid) over all sources."""
    if not contexts:
        return k, v, None
    # a masked-out slot contributes nothing, whatever it holds: the attention mask alone is not
    # enough (a NaN or Inf key or value still reaches the arithmetic), so zero such slots first
    keys = torch.cat([k, *(torch.where(c[2][..., None], c[0], 0) for c in contexts)], dim=2)
    values = torch.cat([v, *(torch.where(c[2][..., None], c[1], 0) for c in contexts)], dim=2)
    local = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
    mask = torch.cat([local, *(c[2].expand(k.shape[0], k.shape[1], -1) for c in contexts)], dim=2)
    return keys, values, mask


def attend_sdpa(q: Tensor, k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    keys, values, mask = _concat(k, v, contexts)
    attn_mask = None if mask is None else mask[:, :, None, :]
    # the segment's own keys are always valid, so no query row is ever fully masked
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=attn_mask)


def _sdpa_why_not(q: Tensor) -> str | None:
    return None


def _xformers_why_not(q: Tensor) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'memkit-video[xformers]')"
    if q.device.type != "cuda":
        return f"xformers runs only on CUDA tensors, got a tensor on {q.device}"
    return None


def attend_xformers(q: Tensor, k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    import xformers.ops as xops

    keys, values, mask = _concat(k, v, contexts)
    b, h, n, _ = q.shape
    m = keys.shape[2]
    bias = None
    if mask is not None:
        # xformers wants the bias's last dimension padded to a multiple of 8 and sliced back
        pad = (-m) % 8
        full = torch.zeros((b, h, n, m + pad), dtype=q.dtype, device=q.device)
        bias_view = full[..., :m]
        bias_view.masked_fill_(~mask[:, :, None, :], float("-inf"))
        bias = bias_view
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), keys.to(q.dtype).transpose(1, 2), values.to(q.dtype).transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


register_backend(Backend("math", attend_math, _sdpa_why_not))
register_backend(Backend("sdpa", attend_sdpa, _sdpa_why_not))
register_backend(Backend("xformers", attend_xformers, _xformers_why_not))
