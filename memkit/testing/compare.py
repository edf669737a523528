"""Comparisons :func:`memkit.testing.check_memory` makes: states, contexts and their batch items."""

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from memkit.protocol import Chunk, Context, Query
from memkit.state import map_tensors


def _leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    with_path, spec = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path) or "state", leaf) for path, leaf in with_path], spec


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    return torch.equal(a, b)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to float rounding (1e-6 relative and absolute; 1e-2 in half precision)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-6
    return torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=True)


def _tree_difference(old: Any, new: Any, *, exact: bool = True) -> str | None:
    """Where two states differ (bitwise, or beyond rounding; None when they are equal)."""
    old_leaves, old_spec = _leaves(old)
    new_leaves, new_spec = _leaves(new)
    if old_spec != new_spec:
        return f"the pytree structure changed from {old_spec} to {new_spec}"
    for (name, a), (_, b) in zip(old_leaves, new_leaves, strict=True):
        same = _bitwise_equal(a, b) if exact else a.device == b.device and _close(a, b)
        if not same:
            return f"{name} changed"
    return None


def _clone(tree: Any) -> Any:
    return map_tensors(lambda x: x.clone(), tree)


def _context_tensors(ctx: Context) -> dict[str, Tensor]:
    return {"k": ctx.k, "v": ctx.v, "mask": ctx.mask, "positions": ctx.positions}


def _select(ctx: Context, items: list[int]) -> Context:
    return Context(*(x[items] for x in _context_tensors(ctx).values()))


def _context_difference(a: Context, b: Context, items: list[int] | None = None) -> str | None:
    """Where two contexts differ (only valid slots' keys, values and positions count)."""
    if items is not None:
        a, b = _select(a, items), _select(b, items)
    if a.k.shape != b.k.shape:
        return f"context shape {tuple(a.k.shape)} became {tuple(b.k.shape)}"
    if not torch.equal(a.mask, b.mask):
        return "context.mask differs"
    mask = a.mask
    if not torch.equal(a.positions[mask], b.positions[mask]):
        return "context.positions differ in valid slots"
    for name in ("k", "v"):
        x, y = getattr(a, name), getattr(b, name)
        if not _close(torch.where(mask[..., None], x, 0), torch.where(mask[..., None], y, 0)):
            gap = float((torch.where(mask[..., None], x, 0) - torch.where(mask[..., None], y, 0)).abs().max())
            return f"context.{name} differs in valid slots (by up to {gap:.3g})"
    return None


def _select_item(tree: Any, i: int) -> Any:
    """Batch item ``i`` of a state, query or chunk, keeping the batch dimension."""
    if isinstance(tree, (Query, Chunk)):
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(tree):
            x = getattr(tree, field.name)
            if isinstance(x, Tensor):
                changes[field.name] = x[i : i + 1]
        return dataclasses.replace(tree, **changes)
    return map_tensors(lambda x: x[i : i + 1], tree)


def _layout(state: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(x.shape)) for name, x in _leaves(state)[0] if isinstance(x, Tensor)]
