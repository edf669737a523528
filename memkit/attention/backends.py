"""Attention backends in a small registry, chosen by priority or by name.

* ``math``: :mod:`memkit.attention.reference`, the readable reference every test
  compares against (never chosen by ``auto``: it is the slow, exact one).
* ``sdpa``: torch's ``scaled_dot_product_attention`` over the concatenation of the
  segment's keys and every context (one fused call; priority 10, runs everywhere).
* ``xformers``: ``xformers.ops.memory_efficient_attention``; CUDA only, imported lazily
  (priority 20).

``auto`` takes the backend of highest priority that can run on the query (so xformers for
CUDA tensors when it is installed, otherwise sdpa); a backend registered with a higher
priority is tried first. :func:`attention_backend` changes what ``auto`` means inside a
``with`` block. Asking for a backend by name that cannot run raises
:class:`memkit.BackendUnavailableError` saying what is missing: never a silent fallback.
"""

import contextlib
import dataclasses
import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from memkit.attention.reference import attend_math
from memkit.errors import BackendUnavailableError
from memkit.memo import TensorMemo

__all__ = ["Backend", "register_backend", "available_backends", "get_backend", "attention_backend"]

# (q, k, v, [(k_ctx, v_ctx, mask_ctx), ...]) -> out; every tensor in b h n d layout
AttendFn = Callable[[Tensor, Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]], Tensor]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to compute attention.

    Attributes:
        name: what ``backend=`` and :func:`attention_backend` call it.
        fn: ``fn(q, k, v, [(k_ctx, v_ctx, mask_ctx), ...]) -> out``, tensors ``(b h n d)``.
        why_not: ``why_not(q)`` says what stops it running on ``q``, or ``None``.
        priority: ``auto`` tries higher priorities first; ``None``: only when named.
    """

    name: str
    fn: AttendFn
    why_not: Callable[[Tensor], str | None]
    priority: int | None = None


# the backends "auto" tries, best first (rebuilt after the registry changes)
_RANKED: list[Backend] = []


class _Registry(dict[str, Backend]):
    """The backends by name; any change drops ``auto``'s ranking (tests and examples delete entries)."""

    def __setitem__(self, name: str, backend: Backend) -> None:
        super().__setitem__(name, backend)
        _RANKED.clear()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        _RANKED.clear()


_REGISTRY: dict[str, Backend] = _Registry()

# what "auto" means now: the innermost attention_backend() block's choice, if any. Process-wide
# (like torch.backends flags), not per thread; a plain list, so torch.compile reads it as a constant.
_CHOSEN: list[str] = []


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend by name.

    Example:
        >>> import torch, memkit
        >>> from memkit.attention import Backend, get_backend, register_backend
        >>> from memkit.attention.backends import attend_sdpa
        >>> register_backend(Backend("my_sdpa", attend_sdpa, lambda q: None, priority=5))
        >>> with memkit.attention_backend("my_sdpa"):
        ...     get_backend("auto", torch.zeros(1, 1, 1, 1)).name
        'my_sdpa'
        >>> get_backend("auto", torch.zeros(1, 1, 1, 1)).name   # priority 5 < sdpa's 10
        'sdpa'
        >>> from memkit.attention import backends; del backends._REGISTRY["my_sdpa"]   # the example's clean-up
    """
    _REGISTRY[backend.name] = backend


def available_backends(q: Tensor | None = None) -> list[str]:
    """Names of the backends that can run on ``q`` (on a CPU tensor when ``q`` is None).

    Example:
        >>> import memkit
        >>> {"math", "sdpa"} <= set(memkit.available_backends())
        True
    """
    probe = q if q is not None else torch.zeros(1, 1, 1, 1)
    return [name for name, b in _REGISTRY.items() if b.why_not(probe) is None]


def _check_name(name: str) -> None:
    if name != "auto" and name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(_REGISTRY)}"
        )


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Inside the block, attention that asks for ``"auto"`` (the default everywhere) uses ``name``.

    Covers every :func:`memkit.attend` call, so every :class:`memkit.MemoryAttention`, the
    reference backbone and attached host models, without passing ``backend=`` down. A
    ``backend=`` given by name still wins (it is the more specific choice). Blocks nest;
    ``"auto"`` restores the priority order. A backend that cannot run on a query raises
    :class:`memkit.BackendUnavailableError` when attention runs, as when named directly.
    The choice is process-wide (like ``torch.backends`` flags), not per thread.

    Args:
        name: ``"auto"`` or a registered backend (``"math"``, ``"sdpa"``, ``"xformers"``).

    Raises:
        BackendUnavailableError: ``name`` is not a registered backend (at once).

    Example:
        >>> import torch, memkit
        >>> q = k = v = torch.randn(1, 2, 6, 8)
        >>> with memkit.attention_backend("math"):
        ...     out = memkit.attend(q, k, v)          # the float32 reference
        >>> torch.equal(out, memkit.attend(q, k, v, backend="math"))
        True
    """
    _check_name(name)
    _CHOSEN.append(name)
    try:
        yield
    finally:
        _CHOSEN.pop()


def get_backend(name: str, q: Tensor) -> Backend:
    """The backend called ``name`` for ``q``, resolving ``auto``; raises if it cannot run.

    ``auto`` means the innermost :func:`attention_backend` choice, else the runnable
    backend of highest priority.

    Example:
        >>> import torch
        >>> get_backend("auto", torch.zeros(1, 1, 1, 1)).name   # on a CPU tensor
        'sdpa'
    """
    if name == "auto" and _CHOSEN:
        name = _CHOSEN[-1]
    if name == "auto":
        if not _RANKED:
            _RANKED.extend(
                sorted((b for b in _REGISTRY.values() if b.priority is not None), key=lambda b: -(b.priority or 0))
            )
        for backend in _RANKED:
            if backend.why_not(q) is None:
                return backend
        raise BackendUnavailableError(f"no attention backend can run on a tensor on {q.device}")
    _check_name(name)
    backend = _REGISTRY[name]
    reason = backend.why_not(q)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {name!r} cannot run here: {reason}")
    return backend


# masks already seen, by identity and version: a read plan hands the same mask tensor to every
# denoising step of a segment, so each is reduced once
_VALID_SEEN = TensorMemo(size=64)


def _all_valid(masks: list[Tensor]) -> bool:
    """Whether every slot of every context mask is valid, when that is cheap to know: on the CPU, eagerly.

    Then the slots need no zeroing and attention no mask (the output is the same, bit for
    bit: an all-True mask adds nothing, ``where(True, x, 0)`` is ``x``), which saves a copy
    of every context and the masked kernel. A mask seen before unchanged (same tensor, same
    version counter) is not reduced again. On an accelerator the answer would cost a device
    sync per call, and under ``torch.compile`` a branch on data breaks the graph: there the
    mask is always applied.
    """
    if not masks[0].is_cpu or torch.compiler.is_compiling():
        return False
    for m in masks:
        ok = _VALID_SEEN.get_one(m)
        if ok is None:
            ok = _VALID_SEEN.put(None, (m,), None, bool(m.all()))
        if not ok:
            return False
    return True


def _concat(
    k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys, values and a (b h m) key mask (None when every key is valid) over all sources."""
    if not contexts:
        return k, v, None
    if _all_valid([c[2] for c in contexts]):
        return torch.cat([k, *(c[0] for c in contexts)], dim=2), torch.cat([v, *(c[1] for c in contexts)], dim=2), None
    # a masked-out slot contributes nothing, whatever it holds: the attention mask alone is not
    # enough (a NaN or Inf key or value still reaches the arithmetic), so zero such slots first
    keys = torch.cat([k, *(torch.where(c[2][..., None], c[0], 0) for c in contexts)], dim=2)
    values = torch.cat([v, *(torch.where(c[2][..., None], c[1], 0) for c in contexts)], dim=2)
    local = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
    mask = torch.cat([local, *(c[2].expand(k.shape[0], k.shape[1], -1) for c in contexts)], dim=2)
    return keys, values, mask


def attend_sdpa(q: Tensor, k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    keys, values, mask = _concat(k, v, contexts)
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    if mask is None:  # every call costs here: at small shapes the Python around SDPA is a measurable share
        return F.scaled_dot_product_attention(q, keys, values)
    # the segment's own keys are always valid, so no query row is ever fully masked
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, :, None, :])


def _sdpa_why_not(q: Tensor) -> str | None:
    return None


# whether xformers is installed, asked once: "auto" asks at every call (xformers ranks first) and a
# find_spec stats the file system each time (a plain list, which torch.compile reads as a constant)
_XFORMERS_INSTALLED: list[bool] = []


def _xformers_installed() -> bool:
    if not _XFORMERS_INSTALLED:
        _XFORMERS_INSTALLED.append(importlib.util.find_spec("xformers") is not None)
    return _XFORMERS_INSTALLED[0]


def _xformers_why_not(q: Tensor) -> str | None:
    if not _xformers_installed():
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
register_backend(Backend("sdpa", attend_sdpa, _sdpa_why_not, priority=10))
register_backend(Backend("xformers", attend_xformers, _xformers_why_not, priority=20))
