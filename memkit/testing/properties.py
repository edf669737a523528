"""The protocol's properties, one check each: what :func:`memkit.testing.check_memory` asserts."""

import inspect
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from memkit.errors import MemkitError
from memkit.protocol import Chunk, Context, Memory, Query, token_positions
from memkit.state import MemoryState, state_nbytes
from memkit.testing.compare import (
    _bitwise_equal,
    _clone,
    _close,
    _context_difference,
    _context_tensors,
    _layout,
    _leaves,
    _select,
    _select_item,
    _tree_difference,
)
from memkit.testing.inputs import _INTERFACE_ARGS, _Config, _Fail, _replace_item, _stack, _Stream

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
    if leaves and isinstance(state, MemoryState) and state.batch_size != batch_size:
        raise fail("state tensors have the batch first", f"state.batch_size is {state.batch_size}, not {batch_size}")
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
