"""What :func:`memkit.testing.check_memory` feeds a memory: its settings, random streams, the failure it raises."""

import dataclasses
from typing import Any

import torch
from torch import Tensor

from memkit.protocol import Chunk, Query

#: The properties :func:`check_memory` asserts, in the order it first meets them.
PROPERTIES: tuple[str, ...] = (
    "is a Memory",
    "state is a pytree of tensors",
    "state tensors have the batch first",
    "state bytes never change",
    "state shapes never change",
    "read never mutates the state",
    "write never mutates the old state",
    "reads are pure",
    "context is valid",
    "context shape never changes",
    "attention over the context",
    "causality",
    "batch independence",
    "batch selection",
    "streams advance independently",
    "save/load round trip",
    "refuses another configuration's state",
)

# arguments that set what a memory's queries and chunks look like: changing one of them makes
# another memory that cannot read this memory's queries, so it says nothing about states
_INTERFACE_ARGS = ("heads", "head_dim", "tokens_per_frame", "dim", "prompt_dim", "meta_dim")


@dataclasses.dataclass(frozen=True)
class _Config:
    heads: int
    head_dim: int
    tokens_per_frame: int
    frames_per_segment: int
    batch_size: int
    model_dim: int
    prompt_dim: int | None
    prompt_tokens: int
    meta_dim: int | None
    device: torch.device
    dtype: torch.dtype
    state_dtype: torch.dtype | None
    backend: str


class _Fail:
    """Builds the AssertionError for one memory, naming the property."""

    def __init__(self, memory: Any) -> None:
        self.name = type(memory).__name__

    def __call__(self, prop: str, detail: str) -> AssertionError:
        assert prop in PROPERTIES, prop
        return AssertionError(f"check_memory: {self.name} fails property '{prop}': {detail}")


# --- inputs ------------------------------------------------------------------------------


class _Stream:
    """Random inputs for a batch of streams; stream ``i`` starts at frame ``starts[i]``.

    Inputs are drawn per stream and per segment from seeds fixed by ``seed``, so the inputs
    of stream ``i``'s segment ``s`` are the same whether it runs alone or in a batch. With
    ``tied``, every key of every chunk is the same vector, so any scores a memory computes
    from keys tie and its tie-breaks (recency, say) decide.
    """

    def __init__(self, cfg: _Config, seed: int, starts: list[int], tied: bool = False) -> None:
        self.cfg, self.seed, self.starts, self.tied = cfg, seed, starts, tied

    def segment(self, s: int, items: list[int] | None = None, variant: int = 0) -> tuple[Query, Chunk]:
        """Segment ``s`` of the streams ``items`` (all by default), stacked into one batch."""
        items = list(range(self.cfg.batch_size)) if items is None else items
        parts = [self._one(i, s, variant) for i in items]
        return _stack([q for q, _ in parts]), _stack([c for _, c in parts])

    def _one(self, item: int, s: int, variant: int) -> tuple[Query, Chunk]:
        cfg = self.cfg
        h, d, t, f = cfg.heads, cfg.head_dim, cfg.tokens_per_frame, cfg.frames_per_segment
        n = f * t
        gen = torch.Generator().manual_seed((self.seed * 7919 + item * 104729 + s * 131 + variant) % 2**62)

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)

        prompt = prompt_mask = None
        if cfg.prompt_dim is not None:
            prompt = randn(1, cfg.prompt_tokens, cfg.prompt_dim)
            prompt_mask = torch.rand((1, cfg.prompt_tokens), generator=gen) < 0.7
            prompt_mask[:, 0] = True  # at least one real token per stream
            prompt_mask = prompt_mask.to(cfg.device)
        positions = (self.starts[item] + s * f + torch.arange(f))[None].to(cfg.device)
        meta = randn(1, f, cfg.meta_dim) if cfg.meta_dim is not None else None
        query = Query(randn(1, h, n, d), positions, t, prompt, prompt_mask, frame_meta=meta)
        k = torch.ones(1, h, n, d, device=cfg.device, dtype=cfg.dtype) if self.tied else randn(1, h, n, d)
        chunk = Chunk(
            k, randn(1, h, n, d), randn(1, n, cfg.model_dim), positions, t, prompt, prompt_mask, frame_meta=meta
        )
        return query, chunk


def _stack(parts: list[Any]) -> Any:
    """Queries (or chunks) of single streams as one batch."""
    first = parts[0]
    changes = {}
    for field in dataclasses.fields(first):
        x = getattr(first, field.name)
        if isinstance(x, Tensor):
            changes[field.name] = torch.cat([getattr(p, field.name) for p in parts])
    return dataclasses.replace(first, **changes)


def _replace_item(a: Any, b: Any, item: int) -> Any:
    """``a`` (a Query or Chunk) with batch item ``item`` taken from ``b``."""
    changes = {}
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, Tensor) and field.name != "frame_positions":
            x = x.clone()
            x[item] = y[item]
        changes[field.name] = x
    return dataclasses.replace(a, **changes)


# --- comparisons -------------------------------------------------------------------------
