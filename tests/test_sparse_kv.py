"""SparseKVMemory: top-k routing over a ring buffer of frames (MemFlow SMA / MoC)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit
from memkit import Chunk, Context, Query, ShapeError, SparseKVMemory, StateError
from memkit.layers.rotary import apply_rotary
from memkit.memories.frames import frames_to_context


def make_chunk(b: int, h: int, d: int, t: int, start: int, frames: int, seed: int) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    n = frames * t
    k = torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    pos = torch.arange(start, start + frames).expand(b, frames).clone()
    return Chunk(k, v, torch.randn(b, n, 4, generator=g), pos, t)


def make_query(b: int, h: int, d: int, t: int, start: int, frames: int, seed: int) -> Query:
    g = torch.Generator().manual_seed(seed + 10_000)
    q = torch.randn(b, h, frames * t, d, generator=g)
    return Query(q, torch.arange(start, start + frames).expand(b, frames).clone(), t)


def run(mem: SparseKVMemory, b: int, writes: list[int], seed: int) -> tuple[memkit.memories.SparseKVState, int]:
    state = mem.init_state(b)
    start = 0
    for i, f in enumerate(writes):
        state = mem.write(state, make_chunk(b, mem.heads, mem.head_dim, mem.tokens_per_frame, start, f, seed + i))
        start += f
    return state, start


def dense_context(state: memkit.memories.SparseKVState) -> Context:
    return Context.concat(
        [
            frames_to_context(state.sink.k, state.sink.v, state.sink.pos, state.sink.valid),
            frames_to_context(state.ring.k, state.ring.v, state.ring.pos, state.ring.valid),
        ]
    )


def rotated_attention(q: Query, ctx: Context) -> torch.Tensor:
    """Attention of the query over its own keys (= q here) and the context, with rotary at stored positions."""
    tok_pos = memkit.protocol.token_positions(q.frame_positions, q.tokens_per_frame)
    qr = apply_rotary(q.q, tok_pos)
    rotated = Context(apply_rotary(ctx.k, ctx.positions), ctx.v, ctx.mask, ctx.positions)
    return memkit.attend(qr, qr, q.q, rotated, backend="math")


configs = st.fixed_dictionaries(
    {
        "b": st.integers(1, 2),
        "h": st.integers(1, 3),
        "d": st.sampled_from([2, 4, 8]),
        "t": st.integers(1, 3),
        "capacity": st.integers(1, 6),
        "always": st.integers(0, 2),
        "writes": st.lists(st.integers(1, 5), min_size=1, max_size=6),  # always something written
        "seed": st.integers(0, 10_000),
    }
)


@settings(max_examples=40, deadline=None)
@given(cfg=configs, extra=st.integers(0, 3))
def test_top_k_at_least_valid_equals_dense_attention(cfg: dict, extra: int) -> None:
    b, h, d, t, c = cfg["b"], cfg["h"], cfg["d"], cfg["t"], cfg["capacity"]
    probe = SparseKVMemory(h, d, t, capacity=c, always_frames=cfg["always"])
    state, start = run(probe, b, cfg["writes"], cfg["seed"])
    n_valid = int(state.ring.valid.sum(1).max())
    mem = SparseKVMemory(h, d, t, capacity=c, top_k=max(n_valid, 1) + extra, always_frames=cfg["always"])
    q = make_query(b, h, d, t, start, 2, cfg["seed"])
    sparse = rotated_attention(q, mem.read(state, q))
    dense = rotated_attention(q, dense_context(state))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(cfg=configs, top_k=st.integers(1, 7))
def test_selects_the_top_k_valid_frames_and_never_an_invalid_one(cfg: dict, top_k: int) -> None:
    b, h, d, t, c = cfg["b"], cfg["h"], cfg["d"], cfg["t"], cfg["capacity"]
    mem = SparseKVMemory(h, d, t, capacity=c, top_k=top_k, always_frames=cfg["always"])
    state, start = run(mem, b, cfg["writes"], cfg["seed"])
    q = make_query(b, h, d, t, start, 1, cfg["seed"])
    ctx = mem.read(state, q)
    kk = min(top_k, c)
    a = cfg["always"]
    assert ctx.k.shape == (b, h, (a + kk) * t, d)
    sel_mask = ctx.mask[:, :, a * t :: t]  # one flag per returned ring frame
    sel_pos = ctx.positions[:, :, a * t :: t]
    routed = q.q.mean(2)
    for i in range(b):
        valid_pos = state.ring.pos[i][state.ring.valid[i]].tolist()
        for j in range(h):
            chosen = sel_pos[i, j][sel_mask[i, j]].tolist()
            assert int(sel_mask[i, j].sum()) == min(kk, len(valid_pos))
            assert set(chosen) <= set(valid_pos) and len(set(chosen)) == len(chosen)
            # brute force: the chosen frames have the highest scores among valid frames
            scores = {
                int(state.ring.pos[i, s]): float(state.desc[i, j, s] @ routed[i, j])
                for s in range(c)
                if state.ring.valid[i, s]
            }
            if chosen:
                worst_chosen = min(scores[p] for p in chosen)
                best_left = max([scores[p] for p in scores if p not in chosen], default=-float("inf"))
                assert worst_chosen >= best_left - 1e-6


def test_ties_prefer_the_newest_frames_deterministically() -> None:
    mem = SparseKVMemory(1, 4, 2, capacity=4, top_k=2)
    state = mem.init_state(1)
    key = torch.ones(1, 1, 2, 4)
    for p in range(6):  # identical frames: every score ties; ring wraps around
        state = mem.write(state, Chunk(key, key, torch.zeros(1, 2, 3), torch.tensor([[p]]), 2))
    q = Query(torch.ones(1, 1, 2, 4), torch.tensor([[6]]), 2)
    first = mem.read(state, q)
    assert first.positions[0, 0, ::2].tolist() == [5, 4]
    again = mem.read(state, q)
    assert torch.equal(first.positions, again.positions) and torch.equal(first.k, again.k)


def position_chunk(b: int, h: int, d: int, t: int, start: int, frames: int) -> Chunk:
    """A chunk whose keys and values encode their frame position (so the ring's contents can be read back)."""
    pos = torch.arange(start, start + frames).expand(b, frames).clone()
    k = pos.repeat_interleave(t, dim=1)[:, None, :, None].expand(b, h, frames * t, d).float()
    return Chunk(k, k + 0.5, torch.zeros(b, frames * t, 4), pos, t)


@given(
    capacity=st.integers(1, 6),
    always=st.integers(0, 3),
    t=st.integers(1, 2),
    writes=st.lists(st.integers(1, 7), min_size=1, max_size=8),
)
def test_ring_holds_the_newest_non_sink_frames_and_the_sink_the_first(
    capacity: int, always: int, t: int, writes: list[int]
) -> None:
    """For any write sequence: the sink holds the first A frames, the ring the newest C of the rest."""
    mem = SparseKVMemory(2, 4, t, capacity=capacity, top_k=capacity, always_frames=always)
    state = mem.init_state(1)
    written: list[int] = []
    for f in writes:
        state = mem.write(state, position_chunk(1, 2, 4, t, len(written), f))
        written += range(len(written), len(written) + f)
    assert state.sink.pos[0, state.sink.valid[0]].tolist() == written[:always]
    assert sorted(state.ring.pos[0, state.ring.valid[0]].tolist()) == written[always:][-capacity:]
    assert state.frames_seen.tolist() == [len(written)]
    # contents follow their positions; descriptors are the frame's mean key
    for buf, values, pos, valid in (
        (state.ring.k, state.ring.v, state.ring.pos, state.ring.valid),
        (state.sink.k, state.sink.v, state.sink.pos, state.sink.valid),
    ):
        p = pos[0, valid[0]].float()[None, :, None, None].expand(2, -1, t, 4)
        assert torch.equal(buf[0][:, valid[0]], p) and torch.equal(values[0][:, valid[0]], p + 0.5)
    assert torch.equal(
        state.desc[0][:, state.ring.valid[0]],
        state.ring.pos[0, state.ring.valid[0]].float()[None, :, None].expand(2, -1, 4),
    )
    # a read with top_k = capacity returns the sink and the whole ring
    ctx = mem.read(state, Query(torch.randn(1, 2, t, 4), torch.tensor([[len(written)]]), t))
    got = sorted(set(ctx.positions[0, 0][ctx.mask[0, 0]].tolist()))
    assert got == sorted(written[:always] + written[always:][-capacity:])


def test_ties_prefer_each_streams_own_newest_frames() -> None:
    """Streams that have written different numbers of frames break ties by their own recency."""
    mem = SparseKVMemory(1, 4, 1, capacity=4, top_k=2)
    key = torch.ones(1, 1, 1, 4)
    alone = []
    for count in (3, 6):  # stream 1's ring has wrapped around, stream 0's has not
        state = mem.init_state(1)
        for p in range(count):
            state = mem.write(state, Chunk(key, key, torch.zeros(1, 1, 3), torch.tensor([[p]]), 1))
        alone.append(state)
    both = torch.utils._pytree.tree_map(lambda *xs: torch.cat(xs), *alone)
    ctx = mem.read(both, Query(torch.ones(2, 1, 1, 4), torch.tensor([[10], [10]]), 1))
    assert ctx.positions[:, 0].tolist() == [[2, 1], [5, 4]]
    for i, state in enumerate(alone):
        one = mem.read(state, Query(torch.ones(1, 1, 1, 4), torch.tensor([[10]]), 1))
        assert torch.equal(one.positions, ctx.positions[i : i + 1])


def test_ring_keeps_newest_frames_and_sink_keeps_first() -> None:
    mem = SparseKVMemory(2, 4, 1, capacity=3, top_k=3, always_frames=2)
    state, _ = run(mem, 1, [4, 1, 7], seed=0)  # a chunk larger than the ring included
    assert state.sink.pos.tolist() == [[0, 1]]
    assert sorted(state.ring.pos[0].tolist()) == [9, 10, 11]
    assert state.ring.valid.all() and state.frames_seen.tolist() == [12]
    # the stored keys are the chunk's own pre-rotary keys for those positions
    chunk = make_chunk(1, 2, 4, 1, 5, 7, seed=2)
    for slot, p in enumerate(state.ring.pos[0].tolist()):
        torch.testing.assert_close(state.ring.k[0, :, slot, 0], chunk.k[0, :, p - 5])
        torch.testing.assert_close(state.desc[0, :, slot], chunk.k[0, :, p - 5])


@settings(max_examples=25, deadline=None)
@given(cfg=configs)
def test_shapes_constant_and_write_is_pure(cfg: dict) -> None:
    b, h, d, t, c = cfg["b"], cfg["h"], cfg["d"], cfg["t"], cfg["capacity"]
    mem = SparseKVMemory(h, d, t, capacity=c, top_k=2, always_frames=cfg["always"])
    state = mem.init_state(b)
    shapes = [x.shape for x in torch.utils._pytree.tree_leaves(state)]
    nbytes = state.nbytes
    start = 0
    for i, f in enumerate(cfg["writes"]):
        before = memkit.map_tensors(torch.clone, state)
        q = make_query(b, h, d, t, start, 1, i)
        ctx_before = mem.read(state, q)
        new = mem.write(state, make_chunk(b, h, d, t, start, f, cfg["seed"] + i))
        for x, y in zip(torch.utils._pytree.tree_leaves(before), torch.utils._pytree.tree_leaves(state), strict=True):
            assert torch.equal(x, y)
        assert torch.equal(mem.read(state, q).k, ctx_before.k)  # earlier reads are unaffected
        assert [x.shape for x in torch.utils._pytree.tree_leaves(new)] == shapes
        state, start = new, start + f
    assert state.nbytes == nbytes
    s = 4  # float32
    a = cfg["always"]
    assert nbytes == b * h * (2 * (c + a) * t * d + c * d) * s + 9 * b * (c + a) + 8 * b


@settings(max_examples=25, deadline=None)
@given(cfg=configs)
def test_batch_items_are_independent(cfg: dict) -> None:
    h, d, t, c = cfg["h"], cfg["d"], cfg["t"], cfg["capacity"]
    mem = SparseKVMemory(h, d, t, capacity=c, top_k=2, always_frames=cfg["always"])
    state, start = run(mem, 2, cfg["writes"], cfg["seed"])
    q = make_query(2, h, d, t, start, 2, cfg["seed"])
    ctx = mem.read(state, q)
    for i in range(2):
        alone = mem.init_state(1)
        s0 = 0
        for j, f in enumerate(cfg["writes"]):
            full = make_chunk(2, h, d, t, s0, f, cfg["seed"] + j)
            alone = mem.write(
                alone,
                Chunk(full.k[i : i + 1], full.v[i : i + 1], full.hidden[i : i + 1], full.frame_positions[i : i + 1], t),
            )
            s0 += f
        one = mem.read(alone, Query(q.q[i : i + 1], q.frame_positions[i : i + 1], t))
        assert torch.equal(one.k, ctx.k[i : i + 1]) and torch.equal(one.mask, ctx.mask[i : i + 1])
        assert torch.equal(one.positions, ctx.positions[i : i + 1])


def test_torch_compile_traces_read_and_write() -> None:
    torch._dynamo.reset()
    mem = SparseKVMemory(2, 4, 2, capacity=3, top_k=2, always_frames=1)
    read = torch.compile(mem.read, fullgraph=True, backend="eager")
    write = torch.compile(mem.write, fullgraph=True, backend="eager")
    state = state_eager = mem.init_state(2)
    for i in range(4):
        chunk = make_chunk(2, 2, 4, 2, 2 * i, 2, i)
        state, state_eager = write(state, chunk), mem.write(state_eager, chunk)
        q = make_query(2, 2, 4, 2, 2 * i + 2, 2, i)
        got, want = read(state, q), mem.read(state_eager, q)
        assert torch.equal(got.k, want.k) and torch.equal(got.positions, want.positions)
        assert torch.equal(got.mask, want.mask)


def test_errors_name_the_dimension() -> None:
    mem = SparseKVMemory(4, 8, 2, capacity=3)
    state = mem.init_state(2)
    with pytest.raises(ShapeError, match=r"dimension h \(heads\) of query.q should be 4, got 3"):
        mem.read(state, Query(torch.randn(2, 3, 4, 8), torch.tensor([[0, 1]] * 2), 2))
    with pytest.raises(ShapeError, match=r"dimension d \(head_dim\) of chunk.k should be 8, got 6"):
        mem.write(state, make_chunk(2, 4, 6, 2, 0, 2, 0))
    with pytest.raises(ShapeError, match=r"dimension b \(batch\) of query.q should be 2"):
        mem.read(state, Query(torch.randn(1, 4, 4, 8), torch.tensor([[0, 1]]), 2))
    with pytest.raises(ShapeError, match=r"chunk.tokens_per_frame should be 2"):
        mem.write(state, make_chunk(2, 4, 8, 1, 0, 2, 0))
    other = memkit.SinkWindowMemory(4, 8, 2).init_state(2)
    # the type checker (on in tests) refuses it first; without it, check_state does
    with pytest.raises(memkit.MemkitError, match=r"SparseKVState"):
        mem.read(other, make_query(2, 4, 8, 2, 0, 1, 0))
    with pytest.raises(StateError, match=r"expected a SparseKVState, got SinkWindowState"):
        memkit.memories.frames.check_state("SparseKVMemory.read", other, memkit.memories.SparseKVState)
    with pytest.raises(ValueError, match=r"capacity and top_k must be positive"):
        SparseKVMemory(4, 8, 2, top_k=0)


def test_in_memory_attention_layer() -> None:
    torch.manual_seed(0)
    attn = memkit.MemoryAttention(16, 2, memory=SparseKVMemory(2, 8, 2, capacity=4, top_k=2, always_frames=1))
    state = attn.init_state(1)
    x = torch.randn(1, 4, 16)
    for s in range(3):
        pos = torch.tensor([[2 * s, 2 * s + 1]])
        y, state = attn.forward_and_write(x, state, pos)
        assert y.shape == (1, 4, 16)
    assert state.sink.pos.tolist() == [[0]] and sorted(state.ring.pos[0].tolist()) == [2, 3, 4, 5]
