"""One-entry memos keyed by tensors themselves: work a segment repeats with the very same tensors, done once.

Within one segment a sampler hands every layer and every denoising step the same tensors
(the frame positions, the read plans' masks, the projected prompt), and some work depends on
nothing else: the segment's rotary table, whether a mask is all valid, a prompt's relevance
to a memory's frames. A :class:`TensorMemo` keeps the last result per owner and hands it back
while the tensors it was computed from are the same objects (identity, through a weak
reference, so a freed tensor whose id is reused never matches) and unchanged (their version
counters, which every in-place edit bumps). Anything else that decides the result is part
of the key as plain hashable extras.

It is off under ``torch.compile`` (a graph must not branch on what Python remembers): the
callers check :func:`memo_active` and compute.
"""

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["TensorMemo", "memo_active"]


def memo_active(*, grad_ok: bool = True) -> bool:
    """Whether a memo may be used now: never while compiling; with ``grad_ok=False``, only under no_grad.

    Results that carry an autograd graph or depend on weights a training step changes must
    not be handed back across steps: their callers pass ``grad_ok=False``.
    """
    if torch.compiler.is_compiling():
        return False
    return grad_ok or not torch.is_grad_enabled()


def _keys(tensors: tuple[Tensor | None, ...]) -> tuple[Any, ...]:
    return tuple(None if t is None else (weakref.ref(t), t._version) for t in tensors)


def _same(keys: tuple[Any, ...], tensors: tuple[Tensor | None, ...]) -> bool:
    if len(keys) != len(tensors):
        return False
    for key, t in zip(keys, tensors, strict=True):
        if key is None or t is None:
            if key is not None or t is not None:
                return False
        elif key[0]() is not t or key[1] != t._version:
            return False
    return True


class TensorMemo:
    """The last results computed from some tensors, handed back while those tensors are the same and unchanged.

    ``owner`` scopes an entry: an object compared by identity (a memory module: each layer's
    memory keeps its own last entry), held weakly, so a dropped owner takes its entry with it
    and the owner itself holds nothing (it stays picklable). With ``owner=None`` entries are
    shared and told apart by the tensors' identities and ``extra``, the newest ``size`` kept.
    A result that is a tensor is checked too: a caller that edits it in place gets a fresh
    one next time.

    Example:
        >>> import torch
        >>> memo, x = TensorMemo(), torch.ones(3)
        >>> memo.get(None, (x,), "sum") is None
        True
        >>> total = memo.put(None, (x,), "sum", x.sum())
        >>> memo.get(None, (x,), "sum") is total
        True
        >>> _ = x.add_(1)                     # edited in place: the entry no longer matches
        >>> memo.get(None, (x,), "sum") is None
        True
    """

    def __init__(self, size: int = 1) -> None:
        self._size = size
        self._owned: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()
        self._shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    @staticmethod
    def _slot(tensors: tuple[Tensor | None, ...], extra: Any) -> tuple[Any, ...]:
        return (*(None if t is None else id(t) for t in tensors), extra)

    def get(self, owner: Any, tensors: tuple[Tensor | None, ...], extra: Any = None) -> Any:
        """The result stored for exactly these ``tensors`` (and ``extra``), or None."""
        entry = self._shared.get(self._slot(tensors, extra)) if owner is None else self._owned.get(owner)
        if entry is None:
            return None
        keys, stored_extra, result, result_key = entry
        if stored_extra != extra or not _same(keys, tensors):
            return None
        if result_key is not None and not _same(result_key, (result,)):
            return None
        return result

    def get_one(self, tensor: Tensor) -> Any:
        """``get(None, (tensor,))`` in fewer steps: the per-call lookup of attention's hot path."""
        entry = self._shared.get((id(tensor), None))
        if entry is None:
            return None
        keys, stored_extra, result, result_key = entry
        ((ref, version),) = keys  # a slot (id, None) holds entries of exactly one tensor
        if stored_extra is not None or ref() is not tensor or version != tensor._version:
            return None
        if result_key is not None and not _same(result_key, (result,)):
            return None
        return result

    def put(self, owner: Any, tensors: tuple[Tensor | None, ...], extra: Any, result: Any) -> Any:
        """Remember ``result`` for ``tensors`` and ``extra`` (the owner's last entry replaced); returns it."""
        entry = (_keys(tensors), extra, result, _keys((result,)) if isinstance(result, Tensor) else None)
        if owner is not None:
            self._owned[owner] = entry
            return result
        slot = self._slot(tensors, extra)
        self._shared.pop(slot, None)
        while len(self._shared) >= self._size:
            self._shared.pop(next(iter(self._shared)))  # the oldest
        self._shared[slot] = entry
        return result
