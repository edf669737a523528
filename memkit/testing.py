"""Property checks for any memory: run memkit's protocol tests on your own memory.

:func:`check_memory` drives a memory through short random streams (read at every
segment, write once per segment) and asserts the protocol's invariants. It raises
``AssertionError`` naming the first property that failed (:data:`PROPERTIES`):

- ``is a Memory``: ``init_state``, ``read`` and ``write`` exist (:class:`memkit.Memory`).
- ``state is a pytree of tensors``: every leaf of the state is a tensor (``@memkit.memory_state``).
- ``state tensors have the batch first``: dim 0 of every state tensor is the batch.
- ``state bytes never change``: :func:`memkit.state_nbytes` is the same after every write.
- ``state shapes never change``: a write keeps the pytree structure and every shape, dtype, device.
- ``read never mutates the state``: the state given to ``read`` is bitwise unchanged.
- ``write never mutates the old state``: the state given to ``write`` is bitwise unchanged.
- ``reads are pure``: the same state and query give the same context twice.
- ``context is valid``: a :class:`memkit.Context` shaped ``(b h m d)`` for the query's batch,
  heads and head dim, with finite keys and values in valid slots.
- ``context shape never changes``: ``m`` (memory slots) is the same at every segment.
- ``attention over the context``: attention of the query over its own keys and the context
  (rotary at the slots' positions, :func:`memkit.attend`) is finite, and stays the same when
  the context's unused slots (mask False) are filled with NaN and their positions with garbage.
- ``causality``: later reads and writes change neither a context already returned nor what
  reading an earlier state returns.
- ``batch independence``: changing stream ``j``'s queries and one of its segments leaves every
  other stream's contexts unchanged.
- ``batch selection``: reading item ``i`` of the state alone equals item ``i`` of the batched read.
- ``streams advance independently``: streams at different positions that have written
  different numbers of segments, run alone and then stacked into one batch, read and write
  in the batch as they do alone (no counter or position is shared across the batch).
- ``save/load round trip``: :func:`memkit.save_states` then :func:`memkit.load_states` gives an
  equal state that reads and writes as the original.
- ``refuses another configuration's state``: ``read`` and ``write`` raise a
  :class:`memkit.MemkitError` for a state made by the same kind of memory with another
  configuration (``other_config``, or one derived by changing one integer argument).

"Unchanged" and "equal" allow float rounding only: ``1e-6`` relative and absolute in float32
and float64 (``1e-2`` in float16 and bfloat16), so a leak of ``1e-5`` between streams fails.

hypothesis is a development dependency (``pip install 'memkit-video[dev]'``); it is imported
only when :func:`check_memory` runs, so ``import memkit`` never needs it.
"""

import dataclasses
import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from memkit.errors import MemkitError
from memkit.protocol import Chunk, Context, Memory, Query, token_positions
from memkit.state import map_tensors, state_nbytes

__all__ = ["check_memory", "PROPERTIES"]

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


def check_memory(
    memory_factory: Callable[[], Memory[Any]] | Memory[Any],
    *,
    heads: int,
    head_dim: int,
    tokens_per_frame: int,
    frames_per_segment: int,
    batch_size: int = 2,
    segments: int = 4,
    examples: int = 20,
    model_dim: int | None = None,
    prompt_dim: int | None = None,
    prompt_tokens: int = 3,
    meta_dim: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    shrink: bool = True,
    backend: str = "auto",
    other_config: Callable[[], Memory[Any]] | Memory[Any] | Literal[False] | None = None,
) -> None:
    """Check that a memory keeps the protocol's promises (see :mod:`memkit.testing`).

    hypothesis draws ``examples`` random streams of 1 to ``segments`` segments (random
    queries, keys, values, hidden states, a start position per stream, which stream to
    perturb, how far each stream has got before they are stacked into one batch; sometimes
    every key is the same, so scores computed from keys tie and tie-breaks decide); each
    segment is read, then written, and one more segment is read at the end. Runs under
    ``torch.no_grad()`` with an ``nn.Module`` memory in eval mode; derandomized, so a failure
    reproduces.

    Args:
        memory_factory: a function returning a fresh memory (called once per example), or
            a memory instance used as is.
        heads: ``h`` of queries, keys and values.
        head_dim: ``d``.
        tokens_per_frame: ``t``.
        frames_per_segment: frames in each segment, so ``n = frames_per_segment * t``.
        batch_size: streams per batch; 2 or more to check batch independence, selection and
            streams advancing independently.
        segments: the longest stream drawn.
        examples: how many streams hypothesis draws.
        model_dim: ``D`` of ``Chunk.hidden``, default ``heads * head_dim``.
        prompt_dim: when given, queries and chunks carry a prompt ``(b p e)`` with
            ``e = prompt_dim`` and a padding mask (for prompt-reading memories).
        prompt_tokens: ``p``.
        meta_dim: when given, queries and chunks carry per-frame metadata ``(b f c)`` with
            ``c = meta_dim`` (for memories that retrieve by it, e.g. a camera pose).
        device: where the state and inputs live (CPU by default).
        dtype: dtype of queries, keys, values, hidden states and prompts.
        state_dtype: passed to ``init_state`` (None: the memory's default).
        shrink: let hypothesis shrink a failing stream to a minimal one (slower to fail).
        backend: the attention backend the attention check runs besides ``"math"`` (the
            one your host uses; see :func:`memkit.attend`).
        other_config: a memory of the same kind with another configuration (or a function
            returning one): ``read`` and ``write`` must refuse its states. ``None`` derives
            one by rebuilding the memory with one integer constructor argument changed
            (read back from the attribute of the same name) so that its state's layout
            differs, and skips the check when no such argument exists; ``False`` skips it.

    Raises:
        AssertionError: ``"check_memory: <Memory> fails property '<property>': <what happened>"``,
            with the property one of :data:`PROPERTIES`.

    Example:
        >>> import memkit
        >>> from memkit.testing import check_memory
        >>> check_memory(
        ...     lambda: memkit.SinkWindowMemory(2, 8, 4, sink_frames=1, window_frames=2),
        ...     heads=2, head_dim=8, tokens_per_frame=4, frames_per_segment=2, examples=3,
        ... )
    """
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st
    except ImportError as err:  # pragma: no cover - hypothesis ships with the dev extra
        raise ImportError("memkit.testing.check_memory needs hypothesis: pip install 'memkit-video[dev]'") from err

    if min(heads, head_dim, tokens_per_frame, frames_per_segment, batch_size, segments, examples) < 1:
        raise ValueError("check_memory: every size, segments and examples must be positive")
    cfg = _Config(
        heads=heads,
        head_dim=head_dim,
        tokens_per_frame=tokens_per_frame,
        frames_per_segment=frames_per_segment,
        batch_size=batch_size,
        model_dim=model_dim if model_dim is not None else heads * head_dim,
        prompt_dim=prompt_dim,
        prompt_tokens=prompt_tokens,
        meta_dim=meta_dim,
        device=torch.device(device) if device is not None else torch.device("cpu"),
        dtype=dtype,
        state_dtype=state_dtype,
        backend=backend,
    )

    def make() -> Any:
        if isinstance(memory_factory, Memory) and not isinstance(memory_factory, type):
            memory = memory_factory
        else:
            memory = memory_factory()
        if not isinstance(memory, Memory):
            raise _Fail(memory)(
                "is a Memory",
                f"{type(memory).__name__} lacks one of init_state(batch_size, *, device, dtype), "
                "read(state, query), write(state, chunk)",
            )
        if isinstance(memory, nn.Module):
            memory.eval()
        return memory

    # a memory instance handed in is put in eval mode for the checks and given back as it came
    training = [(m, m.training) for m in (memory_factory, other_config) if isinstance(m, nn.Module)]
    make()  # a memory that is not one fails here, before hypothesis starts drawing

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        # explain reruns a failing stream hundreds of times to say which argument mattered: too slow here
        phases=[p for p in Phase if p is not Phase.explain and (shrink or p is not Phase.shrink)],
    )
    @given(
        seed=st.integers(0, 2**31 - 1),
        n_segments=st.integers(1, segments),
        starts=st.lists(st.integers(0, 10_000), min_size=batch_size, max_size=batch_size),
        perturbed=st.integers(0, batch_size - 1),
        perturb_at=st.integers(0, segments - 1),
        written=st.lists(st.integers(0, segments), min_size=batch_size, max_size=batch_size),
        tied=st.booleans(),
    )
    def run(
        seed: int, n_segments: int, starts: list[int], perturbed: int, perturb_at: int, written: list[int], tied: bool
    ) -> None:
        with torch.no_grad():
            memory = make()
            stream = _Stream(cfg, seed, starts, tied)
            _check_stream(memory, cfg, stream, n_segments, perturbed, min(perturb_at, n_segments - 1))
            if batch_size > 1:
                _check_streams_apart(memory, cfg, stream, written)

    try:
        run()
        if other_config is not False:
            with torch.no_grad():
                _check_other_config(make(), cfg, other_config)
    finally:
        for module, mode in training:
            module.train(mode)


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


# --- the checks --------------------------------------------------------------------------


def _check_layout(fail: _Fail, state: Any, batch_size: int) -> tuple[Any, list[tuple[str, Any]]]:
    """Check the state's leaves; return its pytree spec and per-leaf (name, shape, dtype, device)."""
    leaves, spec = _leaves(state)
    for name, leaf in leaves:
        if not isinstance(leaf, Tensor):
            if name == "state":
                detail = (
                    f"a {type(leaf).__name__} is not a registered pytree; decorate its class with "
                    "@memkit.memory_state (and make every field a tensor)"
                )
            else:
                detail = f"{name} is a {type(leaf).__name__}, not a tensor (keep counters as tensors)"
            raise fail("state is a pytree of tensors", detail)
        if leaf.ndim == 0 or leaf.shape[0] != batch_size:
            raise fail(
                "state tensors have the batch first",
                f"{name} has shape {tuple(leaf.shape)}; dimension 0 should be the batch size {batch_size}",
            )
    return spec, [(name, (tuple(x.shape), x.dtype, x.device)) for name, x in leaves]


def _check_bytes(fail: _Fail, new_state: Any, nbytes: int) -> None:
    if state_nbytes(new_state) != nbytes:
        raise fail("state bytes never change", f"{nbytes} bytes became {state_nbytes(new_state)} after a write")


def _check_shapes(fail: _Fail, new_spec: Any, new_layout: Any, spec: Any, layout: list[tuple[str, Any]]) -> None:
    if new_spec != spec or new_layout != layout:
        changed = [f"{n}: {x} -> {y}" for (n, x), (_, y) in zip(layout, new_layout, strict=False) if x != y]
        detail = "; ".join(changed) if new_spec == spec else f"structure {spec} -> {new_spec}"
        raise fail(
            "state shapes never change",
            f"after a write {detail} (shapes, dtypes and devices are fixed by init_state)",
        )


def _check_read_unchanged(fail: _Fail, before: Any, state: Any) -> None:
    if (where := _tree_difference(before, state)) is not None:
        raise fail("read never mutates the state", where)


def _check_write_unchanged(fail: _Fail, before: Any, state: Any) -> None:
    if (where := _tree_difference(before, state)) is not None:
        raise fail("write never mutates the old state", f"{where} (return a new state instead)")


def _check_pure(fail: _Fail, memory: Any, state: Any, query: Query, ctx: Context) -> None:
    if (where := _context_difference(ctx, memory.read(state, query))) is not None:
        raise fail("reads are pure", f"reading the same state with the same query twice: {where}")


def _check_context(fail: _Fail, ctx: Any, query: Query, cfg: _Config) -> None:
    prop = "context is valid"
    if not isinstance(ctx, Context):
        raise fail(prop, f"read returned a {type(ctx).__name__}, not a memkit.Context")
    b, h, _, d = ctx.k.shape
    want = (query.batch_size, cfg.heads, cfg.head_dim)
    if (b, h, d) != want:
        raise fail(prop, f"context.k has shape {tuple(ctx.k.shape)}; expected (b h m d) with (b, h, d) = {want}")
    if not (ctx.k.is_floating_point() and ctx.v.is_floating_point()):
        raise fail(prop, f"context.k/v must be floating point, got {ctx.k.dtype} and {ctx.v.dtype}")
    if ctx.positions.is_floating_point() or ctx.positions.dtype == torch.bool:
        raise fail(prop, f"context.positions must be an integer tensor, got {ctx.positions.dtype}")
    for name, x in _context_tensors(ctx).items():
        if x.device != query.q.device:
            raise fail(prop, f"context.{name} is on {x.device} but the query is on {query.q.device}")
    for name in ("k", "v"):
        x = getattr(ctx, name)
        if not bool(torch.isfinite(x[ctx.mask]).all()):
            raise fail(prop, f"context.{name} holds non-finite values in valid slots")


def _poisoned(ctx: Context) -> Context:
    """``ctx`` with NaN keys and values and far-off positions in every unused slot."""
    unused = ~ctx.mask
    far = torch.iinfo(ctx.positions.dtype).max // 4
    return Context(
        k=ctx.k.masked_fill(unused[..., None], float("nan")),
        v=ctx.v.masked_fill(unused[..., None], float("nan")),
        mask=ctx.mask,
        positions=ctx.positions.masked_fill(unused, far),
    )


def _check_attention(fail: _Fail, ctx: Context, query: Query, cfg: _Config) -> None:
    """Attention of the query over itself and the context, as a host runs it, with and without poison."""
    from memkit.layers.memory_attention import attend_with_context
    from memkit.layers.rotary import apply_rotary

    prop = "attention over the context"
    q = query.q
    positions = token_positions(query.frame_positions, query.tokens_per_frame)
    rotate = apply_rotary if cfg.head_dim % 2 == 0 else None  # rotary needs pairs of channels
    for backend in dict.fromkeys(("math", cfg.backend)):
        out = attend_with_context(q, q, q, ctx, positions, rotate=rotate, backend=backend)
        if not bool(torch.isfinite(out).all()):
            raise fail(
                prop,
                f"attention ({backend!r} backend) over the context gives non-finite output "
                "(keys or values too large for attention in valid slots?)",
            )
        poisoned = attend_with_context(q, q, q, _poisoned(ctx), positions, rotate=rotate, backend=backend)
        if not _close(out, poisoned):
            raise fail(
                prop,
                f"attention ({backend!r} backend) changed when the context's unused slots (mask False) were "
                "filled with NaN: unused slots must contribute nothing",
            )


def _check_stream(memory: Any, cfg: _Config, stream: _Stream, n_segments: int, perturbed: int, perturb_at: int) -> None:
    fail = _Fail(memory)
    b = cfg.batch_size
    # the stream's segments are written; the last one is only read
    inputs = [stream.segment(s) for s in range(n_segments + 1)]

    state = memory.init_state(b, device=cfg.device, dtype=cfg.state_dtype)
    spec, layout = _check_layout(fail, state, b)
    nbytes = state_nbytes(state)

    states: list[Any] = []
    contexts: list[Context] = []
    saved_contexts: list[Context] = []
    for s, (query, chunk) in enumerate(inputs):
        before = _clone(state)
        ctx = memory.read(state, query)
        _check_read_unchanged(fail, before, state)
        _check_context(fail, ctx, query, cfg)
        if contexts and ctx.k.shape != contexts[0].k.shape:
            raise fail(
                "context shape never changes",
                f"the first read returned {tuple(contexts[0].k.shape)}, a later one {tuple(ctx.k.shape)} "
                "(preallocate slots and mark the empty ones invalid)",
            )
        _check_pure(fail, memory, state, query, ctx)
        _check_attention(fail, ctx, query, cfg)
        states.append(state)
        contexts.append(ctx)
        saved_contexts.append(Context(*(x.clone() for x in _context_tensors(ctx).values())))
        if s == n_segments:
            break

        new_state = memory.write(state, chunk)
        _check_write_unchanged(fail, before, state)
        new_spec, new_layout = _check_layout(fail, new_state, b)
        _check_bytes(fail, new_state, nbytes)  # first: a state that grows is named for what matters most
        _check_shapes(fail, new_spec, new_layout, spec, layout)
        state = new_state

    memory.write(state, inputs[n_segments][1])  # one more write, so even the last read has a later one
    _check_causality(fail, memory, states, [q for q, _ in inputs], contexts, saved_contexts)
    if b > 1:
        others = [stream.segment(s, variant=1) for s in range(n_segments + 1)]
        _check_batch(fail, memory, cfg, inputs, others, contexts, perturbed, perturb_at)
        _check_selection(fail, memory, states, inputs, contexts)
    _check_save_load(fail, memory, cfg, state, inputs[n_segments])  # the state after the last write


def _check_causality(
    fail: _Fail,
    memory: Any,
    states: list[Any],
    queries: list[Query],
    contexts: list[Context],
    saved_contexts: list[Context],
) -> None:
    for s, (old_state, ctx, saved) in enumerate(zip(states, contexts, saved_contexts, strict=True)):
        for name, x in _context_tensors(ctx).items():
            if not _bitwise_equal(x, getattr(saved, name)):
                raise fail(
                    "causality",
                    f"context.{name} returned by the read at segment {s} was changed in place by later reads or "
                    "writes (it aliases a buffer they change)",
                )
        if (where := _context_difference(saved, memory.read(old_state, queries[s]))) is not None:
            raise fail("causality", f"reading the state of segment {s} again after later writes: {where}")


def _check_batch(
    fail: _Fail,
    memory: Any,
    cfg: _Config,
    inputs: list[tuple[Query, Chunk]],
    others: list[tuple[Query, Chunk]],
    contexts: list[Context],
    perturbed: int,
    perturb_at: int,
) -> None:
    """Stream ``perturbed`` gets other queries throughout and another chunk at ``perturb_at``."""
    rest = [i for i in range(cfg.batch_size) if i != perturbed]
    state = memory.init_state(cfg.batch_size, device=cfg.device, dtype=cfg.state_dtype)
    for s, ((query, chunk), (other_query, other_chunk)) in enumerate(zip(inputs, others, strict=True)):
        ctx = memory.read(state, _replace_item(query, other_query, perturbed))
        if (where := _context_difference(contexts[s], ctx, rest)) is not None:
            raise fail(
                "batch independence",
                f"changing stream {perturbed}'s query (and its chunk at segment {perturb_at}) changed stream(s) "
                f"{rest}'s context at segment {s}: {where}",
            )
        if s + 1 < len(inputs):
            state = memory.write(state, _replace_item(chunk, other_chunk, perturbed) if s == perturb_at else chunk)


def _check_selection(
    fail: _Fail, memory: Any, states: list[Any], inputs: list[tuple[Query, Chunk]], contexts: list[Context]
) -> None:
    for s, (state, ctx) in enumerate(zip(states, contexts, strict=True)):
        for i in range(ctx.k.shape[0]):
            one = _select_item(state, i)
            one_query = _select_item(inputs[s][0], i)
            if (where := _context_difference(memory.read(one, one_query), _select(ctx, [i]))) is not None:
                raise fail(
                    "batch selection",
                    f"reading item {i} of the state at segment {s} alone differs from item {i} of the batched read: "
                    f"{where}",
                )


def _check_streams_apart(memory: Any, cfg: _Config, stream: _Stream, written: list[int]) -> None:
    """Stream ``i`` writes ``written[i]`` segments alone; stacked, the streams read, write, read together."""
    fail = _Fail(memory)
    prop = "streams advance independently"
    alone = []
    for i, count in enumerate(written):
        state = memory.init_state(1, device=cfg.device, dtype=cfg.state_dtype)
        for s in range(count):
            state = memory.write(state, stream.segment(s, [i])[1])
        alone.append(state)
    batched = pytree.tree_map(lambda *xs: torch.cat(xs), *alone)
    where_each = ", ".join(f"stream {i} at segment {n}" for i, n in enumerate(written))
    for step in range(2):
        parts = [stream.segment(n + step, [i]) for i, n in enumerate(written)]
        ctx = memory.read(batched, _stack([q for q, _ in parts]))
        for i, (query, _) in enumerate(parts):
            if (where := _context_difference(memory.read(alone[i], query), _select(ctx, [i]))) is not None:
                raise fail(
                    prop,
                    f"with {where_each} (positions {[p.frame_positions[0, 0].item() for p, _ in parts]}) stacked "
                    f"into one batch, stream {i}'s read differs from its read alone: {where}",
                )
        if step == 0:
            batched = memory.write(batched, _stack([c for _, c in parts]))
            alone = [memory.write(a, c) for a, (_, c) in zip(alone, parts, strict=True)]
            for i, a in enumerate(alone):
                if (where := _tree_difference(a, _select_item(batched, i), exact=False)) is not None:
                    raise fail(
                        prop,
                        f"with {where_each} stacked into one batch, a batched write gives stream {i} another state "
                        f"than writing it alone: {where}",
                    )


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


def _check_save_load(fail: _Fail, memory: Any, cfg: _Config, state: Any, next_segment: tuple[Query, Chunk]) -> None:
    from memkit.io import load_states, save_states

    prop = "save/load round trip"
    template = memory.init_state(cfg.batch_size, device=cfg.device, dtype=cfg.state_dtype)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state.safetensors"
            save_states(path, state, memory)
            loaded = load_states(path, template, memory)
    except Exception as err:
        raise fail(prop, f"memkit.save_states / memkit.load_states raised {type(err).__name__}: {err}") from err
    if type(loaded) is not type(state):
        raise fail(prop, f"saved a {type(state).__name__}, loaded a {type(loaded).__name__}")
    if (where := _tree_difference(state, loaded)) is not None:
        raise fail(prop, f"the loaded state differs: {where}")
    query, chunk = next_segment
    if (where := _context_difference(memory.read(state, query), memory.read(loaded, query))) is not None:
        raise fail(prop, f"reading the loaded state: {where}")
    after, after_loaded = memory.write(state, chunk), memory.write(loaded, chunk)
    if (where := _tree_difference(after, after_loaded)) is not None:
        raise fail(prop, f"writing into the loaded state gives another state than never stopping: {where}")


# --- another configuration's state ---------------------------------------------------------


def _rebuilt(memory: Any) -> tuple[type, dict[str, Any]] | None:
    """The memory's class and constructor arguments read back from its attributes (None if they cannot be)."""
    cls = type(memory)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    kwargs: dict[str, Any] = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            return None
        if hasattr(memory, name) and not callable(getattr(memory, name)):
            kwargs[name] = getattr(memory, name)
        elif p.default is p.empty:
            return None
    return cls, kwargs


def _layout(state: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(x.shape)) for name, x in _leaves(state)[0] if isinstance(x, Tensor)]


def _derive_other(memory: Any, cfg: _Config, query: Query) -> tuple[Any, str] | None:
    """Another configuration of ``memory``'s class whose states have another layout, and what changed."""
    found = _rebuilt(memory)
    if found is None:
        return None
    cls, kwargs = found
    mine = _layout(memory.init_state(1, device=cfg.device, dtype=cfg.state_dtype))
    for name, value in kwargs.items():
        if name in _INTERFACE_ARGS or isinstance(value, bool) or not isinstance(value, int):
            continue
        for new in (value + 1, value - 1):
            try:
                with torch.random.fork_rng(devices=[]):  # building a module draws its initial weights
                    other = cls(**{**kwargs, name: new})
                if isinstance(other, nn.Module):
                    other = other.to(cfg.device).eval()
                state = other.init_state(1, device=cfg.device, dtype=cfg.state_dtype)
                other.read(state, _select_item(query, 0))  # it must take the same queries
            except Exception:  # an argument that cannot change is simply skipped
                continue
            if _layout(state) != mine:
                return other, f"{name}={new} instead of {value}"
    return None


def _check_other_config(memory: Any, cfg: _Config, other_config: Any) -> None:
    fail = _Fail(memory)
    prop = "refuses another configuration's state"
    stream = _Stream(cfg, 0, [0] * cfg.batch_size)
    (query, chunk), (next_query, next_chunk) = stream.segment(0), stream.segment(1)
    if other_config is None:
        derived = _derive_other(memory, cfg, query)
        if derived is None:
            return  # no integer argument changes the state's layout: nothing to refuse by shape
        other, what = derived
    else:
        other = other_config() if callable(other_config) and not isinstance(other_config, Memory) else other_config
        if isinstance(other, nn.Module):
            other.eval()
        what = repr(other)
    state = other.init_state(cfg.batch_size, device=cfg.device, dtype=cfg.state_dtype)
    try:
        state = other.write(state, chunk)  # a state that has been written, if the other memory takes the chunk
    except Exception:
        pass
    for op, call in (
        ("read", lambda: memory.read(state, next_query)),
        ("write", lambda: memory.write(state, next_chunk)),
    ):
        try:
            call()
        except MemkitError:
            continue
        except Exception as err:
            raise fail(
                prop,
                f"{op} of a state made with {what} raised {type(err).__name__} ({err}), not a memkit.MemkitError "
                "(check the state's sizes against the memory's and raise memkit.StateError)",
            ) from err
        raise fail(
            prop,
            f"{op} accepted a state made with {what} (check the state's sizes against the memory's and raise "
            "memkit.StateError)",
        )
