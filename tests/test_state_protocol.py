"""State as pytrees and the protocol's purity, batch-independence and causality properties."""

import io

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

import memkit

H, D, T = 2, 4, 2

MEMORIES = {
    "none": lambda: memkit.NoMemory(),
    "sink_window": lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=3),
    "fifo": lambda: memkit.FIFOMemory(H, D, T, frames=2),
}


def make_chunk(gen, b, first_frame, f=2):
    pos = torch.arange(first_frame, first_frame + f).expand(b, f)
    return memkit.Chunk(
        torch.randn(b, H, f * T, D, generator=gen),
        torch.randn(b, H, f * T, D, generator=gen),
        torch.randn(b, f * T, 8, generator=gen),
        pos,
        T,
    )


def make_query(gen, b, first_frame, f=2):
    return memkit.Query(
        torch.randn(b, H, f * T, D, generator=gen), torch.arange(first_frame, first_frame + f).expand(b, f), T
    )


def leaves(tree):
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", MEMORIES)
def test_state_is_a_pytree(name):
    mem = MEMORIES[name]()
    gen = torch.Generator().manual_seed(0)
    state = mem.write(mem.init_state(3), make_chunk(gen, 3, 0))
    flat, spec = pytree.tree_flatten(state)
    assert_trees_equal(pytree.tree_unflatten(flat, spec), state)
    doubled = pytree.tree_map(lambda x: x * 2 if x.is_floating_point() else x, state)
    assert type(doubled) is type(state)
    assert_to_casts_floats_only(state)
    assert_trees_equal(state.detach(), state)
    if leaves(state):
        assert state.index_batch(1).batch_size == 1
        assert_trees_equal(state.index_batch(torch.tensor([0, 2])).index_batch(1), state.index_batch(2))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert_trees_equal(torch.load(buffer, weights_only=False), state)


def assert_to_casts_floats_only(state):
    """``.to(dtype)`` casts floating-point tensors, keeps integer and boolean ones, and keeps every value."""
    for dtype in (torch.float64, torch.float16):
        cast = state.to(dtype)
        assert type(cast) is type(state)
        for x, y in zip(leaves(state), leaves(cast), strict=True):
            assert y.dtype == (dtype if x.is_floating_point() else x.dtype), (x.dtype, y.dtype)
            assert torch.equal(y, x.to(y.dtype))
    for moved in (state.to("cpu"), state.to(device="cpu"), state.to(torch.device("cpu"), torch.float64)):
        for x, y in zip(leaves(state), leaves(moved), strict=True):
            assert y.device.type == "cpu" and torch.equal(y, x.to(y.dtype))
            assert not x.is_floating_point() or y.dtype in (x.dtype, torch.float64)
            assert x.is_floating_point() or y.dtype == x.dtype


def test_to_casts_floats_and_keeps_integer_counters():
    mem = memkit.SparseKVMemory(H, D, T, capacity=3, always_frames=1)
    state = mem.write(mem.init_state(2), make_chunk(torch.Generator().manual_seed(0), 2, 0))
    assert_to_casts_floats_only(state)
    cast = state.to(torch.float64)
    assert (
        cast.frames_seen.dtype == torch.long
        and cast.ring.valid.dtype == torch.bool
        and cast.ring.k.dtype == torch.float64
    )
    assert cast.nbytes > state.nbytes


def test_chunk_refuses_non_finite_values():
    """memkit's policy: nothing non-finite is ever written, so a Chunk holding NaN or Inf is refused."""
    gen = torch.Generator().manual_seed(0)
    chunk = make_chunk(gen, 2, 0)
    fields = dict(k=chunk.k, v=chunk.v, hidden=chunk.hidden, frame_positions=chunk.frame_positions, tokens_per_frame=T)
    for name in ("k", "v", "hidden", "prompt"):
        for bad in (float("nan"), float("inf"), float("-inf")):
            args = dict(fields, prompt=torch.randn(2, 3, 5, generator=gen))
            x = args[name].clone()
            x.view(-1)[3] = bad
            args[name] = x
            with pytest.raises(memkit.NonFiniteError, match=rf"^chunk\.{name}: 1 non-finite value\(s\) \(NaN/Inf\)"):
                memkit.Chunk(**args)
    assert issubclass(memkit.NonFiniteError, memkit.MemkitError)
    memkit.Chunk(**fields)  # finite: accepted


@pytest.mark.parametrize("name", MEMORIES)
@given(segments=st.integers(1, 6), seed=st.integers(0, 1000), batch=st.integers(1, 3))
def test_writes_keep_shapes_and_never_mutate(name, segments, seed, batch):
    mem = MEMORIES[name]()
    gen = torch.Generator().manual_seed(seed)
    state = mem.init_state(batch)
    spec = [(x.shape, x.dtype) for x in leaves(state)]
    for s in range(segments):
        before = pytree.tree_map(lambda x: x.clone(), state)
        new = mem.write(state, make_chunk(gen, batch, 2 * s))
        assert_trees_equal(state, before)  # the old state is untouched
        assert [(x.shape, x.dtype) for x in leaves(new)] == spec
        assert new.nbytes == state.nbytes
        state = new


@pytest.mark.parametrize("name", MEMORIES)
@given(seed=st.integers(0, 1000), segments=st.integers(1, 5), changed=st.integers(0, 2))
def test_batch_items_are_independent(name, seed, segments, changed):
    """Changing one stream's chunks never changes what any other stream reads (every stream checked)."""
    mem = MEMORIES[name]()
    gen = torch.Generator().manual_seed(seed)
    a, b = mem.init_state(3), mem.init_state(3)
    for s in range(segments):
        chunk = make_chunk(gen, 3, 2 * s)
        k, v = chunk.k.clone(), chunk.v.clone()
        k[changed], v[changed] = torch.randn_like(k[changed]), torch.randn_like(v[changed])
        other = memkit.Chunk(k, v, chunk.hidden, chunk.frame_positions, T)
        a, b = mem.write(a, chunk), mem.write(b, other)
    query = make_query(gen, 3, 100)
    ca, cb = mem.read(a, query), mem.read(b, query)
    rest = [i for i in range(3) if i != changed]
    for x, y in ((ca.k, cb.k), (ca.v, cb.v), (ca.mask, cb.mask), (ca.positions, cb.positions)):
        assert torch.equal(x[rest], y[rest])
    if segments and name != "none":
        assert not torch.equal(ca.k[changed], cb.k[changed])  # the change itself is seen


@pytest.mark.parametrize("name", MEMORIES)
@given(seed=st.integers(0, 1000), segments=st.integers(2, 6))
def test_a_write_never_changes_earlier_reads(name, seed, segments):
    mem = MEMORIES[name]()
    gen = torch.Generator().manual_seed(seed)
    state = mem.init_state(1)
    history = []
    for s in range(segments):
        query = make_query(gen, 1, 2 * s)
        ctx = mem.read(state, query)
        history.append((state, query, ctx.k.clone(), ctx.mask.clone()))
        state = mem.write(state, make_chunk(gen, 1, 2 * s))
    for old_state, query, k, mask in history:
        again = mem.read(old_state, query)
        assert torch.equal(again.k, k) and torch.equal(again.mask, mask)


def test_all_baselines_satisfy_the_protocol():
    for make in MEMORIES.values():
        assert isinstance(make(), memkit.Memory)
    assert not isinstance(object(), memkit.Memory)


def test_query_and_chunk_refuse_inconsistent_layouts():
    with pytest.raises(memkit.ShapeError, match=r"3 frames x 2 tokens per frame = 6, but dimension n \(tokens\) is 5"):
        memkit.Query(torch.randn(1, H, 5, D), torch.tensor([[0, 1, 2]]), 2)
    with pytest.raises(memkit.ShapeError, match=r"chunk.v: dimension d \(head_dim\) should be 4, got 3"):
        memkit.Chunk(torch.randn(1, H, 4, D), torch.randn(1, H, 4, 3), torch.randn(1, 4, 8), torch.tensor([[0, 1]]), 2)
    with pytest.raises(memkit.ShapeError, match=r"chunk.hidden: dimension b \(batch\) should be 1, got 2"):
        memkit.Chunk(torch.randn(1, H, 4, D), torch.randn(1, H, 4, D), torch.randn(2, 4, 8), torch.tensor([[0, 1]]), 2)
    with pytest.raises(memkit.ShapeError, match="frame_positions: expected an integer tensor, got dtype torch.float32"):
        memkit.Query(torch.randn(1, H, 4, D), torch.tensor([[0.0, 1.0]]), 2)
    with pytest.raises(memkit.ShapeError, match=r"query.prompt_mask: dimension p \(prompt tokens\) should be 5, got 4"):
        memkit.Query(
            torch.randn(1, H, 4, D), torch.tensor([[0, 1]]), 2, torch.randn(1, 5, 8), torch.ones(1, 4, dtype=torch.bool)
        )
    with pytest.raises(memkit.ShapeError, match="query.q: expected a floating-point tensor, got dtype torch.int64"):
        memkit.Query(torch.ones(1, H, 4, D, dtype=torch.long), torch.tensor([[0, 1]]), 2)


def test_read_refuses_a_state_on_another_batch_size():
    mem = memkit.SinkWindowMemory(H, D, T)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(
        memkit.ShapeError, match=r"dimension b \(batch\) of query.q should be 3 \(the state's batch size\), got 2"
    ):
        mem.read(mem.init_state(3), make_query(gen, 2, 0))
