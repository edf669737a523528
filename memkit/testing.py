"""Property checks for any memory: run memkit's protocol tests on your own memory.

:func:`check_memory` drives a memory through short random streams (read at every
segment, write once per segment) and asserts the protocol's invariants. It raises
``AssertionError`` naming the first property that failed (:data:`PROPERTIES`):

- ``is a Memory``: ``init_state``, ``read`` and ``write`` exist (:class:`memkit.Memory`).
- ``state is a pytree of tensors``: every leaf of the state is a tensor (``@memkit.memory_state``).
- ``state tensors have the batch first``: dim 0 of every state tensor is the batch.
- ``state shapes never change``: a write keeps the pytree structure and every shape, dtype, device.
- ``state bytes never change``: :func:`memkit.state_nbytes` is the same after every write.
- ``read never mutates the state``: the state given to ``read`` is bitwise unchanged.
- ``write never mutates the old state``: the state given to ``write`` is bitwise unchanged.
- ``reads are pure``: the same state and query give the same context twice.
- ``context is valid``: a :class:`memkit.Context` shaped ``(b h m d)`` for the query's batch,
  heads and head dim, with finite keys and values in valid slots.
- ``context shape never changes``: ``m`` (memory slots) is the same at every segment.
- ``causality``: later writes change neither a context already returned nor what reading an
  earlier state returns.
- ``batch independence``: changing stream ``j``'s queries and one of its segments leaves every
  other stream's contexts unchanged.
- ``batch selection``: reading item ``i`` of the state alone equals item ``i`` of the batched read.
- ``save/load round trip``: ``torch.save`` then ``torch.load(weights_only=True)`` gives an equal
  state that reads and writes as the original.

hypothesis is a development dependency (``pip install 'memkit[dev]'``); it is imported
only when :func:`check_memory` runs, so ``import memkit`` never needs it.
"""

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from memkit.protocol import Chunk, Context, Memory, Query
from memkit.state import map_tensors, state_nbytes

__all__ = ["check_memory", "PROPERTIES"]

#: The properties :func:`check_memory` asserts, in the order it first meets them.
PROPERTIES: tuple[str, ...] = (
    "is a Memory",
    "state is a pytree of tensors",
    "state tensors have the batch first",
    "state shapes never change",
    "state bytes never change",
    "read never mutates the state",
    "write never mutates the old state",
    "reads are pure",
    "context is valid",
    "context shape never changes",
    "causality",
    "batch independence",
    "batch selection",
    "save/load round trip",
)


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
    device: torch.device
    dtype: torch.dtype
    state_dtype: torch.dtype | None


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
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    shrink: bool = True,
) -> None:
    """Check that a memory keeps the protocol's promises (see :mod:`memkit.testing`).

    hypothesis draws ``examples`` random streams of 1 to ``segments`` segments (random
    queries, keys, values, hidden states, start positions and which stream to perturb);
    each segment is read, then written, and one more segment is read at the end. Runs under ``torch.no_grad()`` with an
    ``nn.Module`` memory in eval mode; derandomized, so a failure reproduces.

    Args:
        memory_factory: a function returning a fresh memory (called once per example), or
            a memory instance used as is.
        heads: ``h`` of queries, keys and values.
        head_dim: ``d``.
        tokens_per_frame: ``t``.
        frames_per_segment: frames in each segment, so ``n = frames_per_segment * t``.
        batch_size: streams per batch; 2 or more to check batch independence.
        segments: the longest stream drawn.
        examples: how many streams hypothesis draws.
        model_dim: ``D`` of ``Chunk.hidden``, default ``heads * head_dim``.
        prompt_dim: when given, queries and chunks carry a prompt ``(b p e)`` with
            ``e = prompt_dim`` and a padding mask (for prompt-reading memories).
        prompt_tokens: ``p``.
        device: where the state and inputs live (CPU by default).
        dtype: dtype of queries, keys, values, hidden states and prompts.
        state_dtype: passed to ``init_state`` (None: the memory's default).
        shrink: let hypothesis shrink a failing stream to a minimal one (slower to fail).

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
        raise ImportError("memkit.testing.check_memory needs hypothesis: pip install 'memkit[dev]'") from err

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
        device=torch.device(device) if device is not None else torch.device("cpu"),
        dtype=dtype,
        state_dtype=state_dtype,
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
    training = [(m, m.training) for m in (memory_factory,) if isinstance(m, nn.Module)]
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
        start=st.integers(0, 10_000),
        perturbed=st.integers(0, batch_size - 1),
        perturb_at=st.integers(0, segments - 1),
    )
    def run(seed: int, n_segments: int, start: int, perturbed: int, perturb_at: int) -> None:
        with torch.no_grad():
            _check_stream(make(), cfg, seed, n_segments, start, perturbed, min(perturb_at, n_segments - 1))

    try:
        run()
    finally:
        for module, mode in training:
            module.train(mode)


# --- inputs ------------------------------------------------------------------------------


def _inputs(cfg: _Config, gen: torch.Generator, positions: Tensor) -> tuple[Query, Chunk]:
    """A random query and clean chunk for one segment at frame ``positions (b f)``."""
    b, h, d, t = cfg.batch_size, cfg.heads, cfg.head_dim, cfg.tokens_per_frame
    n = cfg.frames_per_segment * t

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)

    prompt = prompt_mask = None
    if cfg.prompt_dim is not None:
        prompt = randn(b, cfg.prompt_tokens, cfg.prompt_dim)
        prompt_mask = torch.rand((b, cfg.prompt_tokens), generator=gen) < 0.7
        prompt_mask[:, 0] = True  # at least one real token per stream
        prompt_mask = prompt_mask.to(cfg.device)
    positions = positions.to(cfg.device)
    query = Query(randn(b, h, n, d), positions, t, prompt, prompt_mask)
    chunk = Chunk(randn(b, h, n, d), randn(b, h, n, d), randn(b, n, cfg.model_dim), positions, t, prompt, prompt_mask)
    return query, chunk


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
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    loose = a.dtype in (torch.float16, torch.bfloat16)
    return torch.allclose(a, b, rtol=1e-2 if loose else 1e-4, atol=1e-2 if loose else 1e-5, equal_nan=True)


def _tree_difference(old: Any, new: Any) -> str | None:
    """Where two states differ bitwise (None when they are equal)."""
    old_leaves, old_spec = _leaves(old)
    new_leaves, new_spec = _leaves(new)
    if old_spec != new_spec:
        return f"the pytree structure changed from {old_spec} to {new_spec}"
    for (name, a), (_, b) in zip(old_leaves, new_leaves, strict=True):
        if not _bitwise_equal(a, b):
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
            return f"context.{name} differs in valid slots"
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


def _check_context(fail: _Fail, ctx: Any, query: Query, cfg: _Config) -> None:
    prop = "context is valid"
    if not isinstance(ctx, Context):
        raise fail(prop, f"read returned a {type(ctx).__name__}, not a memkit.Context")
    b, h, _, d = ctx.k.shape
    want = (cfg.batch_size, cfg.heads, cfg.head_dim)
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


def _check_stream(
    memory: Any, cfg: _Config, seed: int, n_segments: int, start: int, perturbed: int, perturb_at: int
) -> None:
    fail = _Fail(memory)
    b, f = cfg.batch_size, cfg.frames_per_segment
    gen = torch.Generator().manual_seed(seed)
    segment_positions = [
        (start + s * f + torch.arange(f))[None].expand(b, f).clone() for s in range(n_segments + 1)
    ]  # the stream's segments are written; the last one is only read
    inputs = [_inputs(cfg, gen, p) for p in segment_positions]
    others = [_inputs(cfg, gen, p) for p in segment_positions]

    state = memory.init_state(b, device=cfg.device, dtype=cfg.state_dtype)
    spec, layout = _check_layout(fail, state, b)
    nbytes = state_nbytes(state)

    states: list[Any] = []
    contexts: list[Context] = []
    saved_contexts: list[Context] = []
    for s, (query, chunk) in enumerate(inputs):
        before = _clone(state)
        ctx = memory.read(state, query)
        if (where := _tree_difference(before, state)) is not None:
            raise fail("read never mutates the state", where)
        _check_context(fail, ctx, query, cfg)
        if contexts and ctx.k.shape != contexts[0].k.shape:
            raise fail(
                "context shape never changes",
                f"the first read returned {tuple(contexts[0].k.shape)}, a later one {tuple(ctx.k.shape)} "
                "(preallocate slots and mark the empty ones invalid)",
            )
        if (where := _context_difference(ctx, memory.read(state, query))) is not None:
            raise fail("reads are pure", f"reading the same state with the same query twice: {where}")
        states.append(state)
        contexts.append(ctx)
        saved_contexts.append(Context(*(x.clone() for x in _context_tensors(ctx).values())))
        if s == n_segments:
            break

        new_state = memory.write(state, chunk)
        if (where := _tree_difference(before, state)) is not None:
            raise fail("write never mutates the old state", f"{where} (return a new state instead)")
        new_spec, new_layout = _check_layout(fail, new_state, b)
        if new_spec != spec or new_layout != layout:
            changed = [f"{n}: {x} -> {y}" for (n, x), (_, y) in zip(layout, new_layout, strict=False) if x != y]
            detail = "; ".join(changed) if new_spec == spec else f"structure {spec} -> {new_spec}"
            raise fail(
                "state shapes never change",
                f"after a write {detail} (shapes, dtypes and devices are fixed by init_state)",
            )
        if state_nbytes(new_state) != nbytes:
            raise fail("state bytes never change", f"{nbytes} bytes became {state_nbytes(new_state)}")
        state = new_state

    for s, (old_state, ctx, saved) in enumerate(zip(states, contexts, saved_contexts, strict=True)):
        for name, x in _context_tensors(ctx).items():
            if not _bitwise_equal(x, getattr(saved, name)):
                raise fail(
                    "causality",
                    f"context.{name} returned by the read at segment {s} was changed in place by a later write "
                    "(it aliases a state buffer that write mutates)",
                )
        if (where := _context_difference(saved, memory.read(old_state, inputs[s][0]))) is not None:
            raise fail("causality", f"reading the state of segment {s} again after later writes: {where}")

    if b > 1:
        _check_batch(fail, memory, cfg, inputs, others, contexts, perturbed, perturb_at)
        _check_selection(fail, memory, states, inputs, contexts)
    _check_save_load(fail, memory, state, inputs[n_segments])  # the state after the last write


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


def _node_types(tree: Any) -> list[Any]:
    """Classes of the pytree's nodes (state dataclasses), for torch.load's allow-list."""
    found: list[Any] = []

    def visit(x: Any) -> None:
        if isinstance(x, Tensor) or x is None:
            return
        if type(x) not in (tuple, list, dict) and type(x) not in found:
            found.append(type(x))
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            children = [getattr(x, f.name) for f in dataclasses.fields(x)]
        elif isinstance(x, (tuple, list)):
            children = list(x)
        elif isinstance(x, dict):
            children = list(x.values())
        else:
            children = []
        for child in children:
            visit(child)

    visit(tree)
    return found


def _check_save_load(fail: _Fail, memory: Any, state: Any, next_segment: tuple[Query, Chunk]) -> None:
    prop = "save/load round trip"
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
        buffer.seek(0)
        with torch.serialization.safe_globals(_node_types(state)):
            loaded = torch.load(buffer, weights_only=True)
    except Exception as err:
        raise fail(prop, f"torch.save / torch.load(weights_only=True) raised {type(err).__name__}: {err}") from err
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
