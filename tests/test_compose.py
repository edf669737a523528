"""compose(): memories side by side; compose(m) behaves as m; the MemFlow combination."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit
from memkit import Chunk, ComposeMemory, Context, Query, StateError, compose
from memkit.memories import ComposeState


def members(kind: str, h: int, d: int, t: int) -> memkit.Memory:  # type: ignore[type-arg]
    return {
        "none": lambda: memkit.NoMemory(),
        "fifo": lambda: memkit.FIFOMemory(h, d, t, frames=3),
        "sink": lambda: memkit.SinkWindowMemory(h, d, t, sink_frames=1, window_frames=2),
        "sparse": lambda: memkit.SparseKVMemory(h, d, t, capacity=4, top_k=2, always_frames=1),
        "bank": lambda: memkit.PromptBankMemory(h, d, t, bank_frames=2),
    }[kind]()


def segments(b: int, h: int, d: int, t: int, frames: list[int], seed: int) -> list[tuple[Chunk, Query]]:
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for f in frames:
        n = f * t
        pos = torch.arange(start, start + f).expand(b, f).clone()
        prompt = torch.randn(b, 3, h * d, generator=g)
        k, v = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
        chunk = Chunk(k, v, torch.randn(b, n, 5, generator=g), pos, t, prompt)
        query = Query(torch.randn(b, h, n, d, generator=g), pos, t, prompt)
        out.append((chunk, query))
        start += f
    return out


def same(a: Context, b: Context) -> bool:
    fields = ("k", "v", "mask", "positions")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


KINDS = ["none", "fifo", "sink", "sparse", "bank"]


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    b=st.integers(1, 2),
    t=st.integers(1, 2),
    frames=st.lists(st.integers(1, 3), max_size=5),
    seed=st.integers(0, 1000),
)
def test_composing_one_memory_behaves_as_it(kind: str, b: int, t: int, frames: list[int], seed: int) -> None:
    h, d = 2, 4
    mem = members(kind, h, d, t)
    composed = compose(mem)
    state, cstate = mem.init_state(b), composed.init_state(b)
    for chunk, query in segments(b, h, d, t, frames, seed):
        assert same(composed.read(cstate, query), mem.read(state, query))
        state, cstate = mem.write(state, chunk), composed.write(cstate, chunk)
        for x, y in zip(
            torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(cstate[0]), strict=True
        ):
            assert torch.equal(x, y)
    assert cstate.nbytes == state.nbytes


@settings(max_examples=25, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=3),
    frames=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_reads_concatenate_members_and_attention_is_exact(kinds: list[str], frames: list[int], seed: int) -> None:
    b, h, d, t = 2, 2, 4, 2
    mems = [members(k, h, d, t) for k in kinds]
    composed = compose(*mems)
    states, cstate = [m.init_state(b) for m in mems], composed.init_state(b)
    for chunk, query in segments(b, h, d, t, frames, seed):
        ctx = composed.read(cstate, query)
        parts = [m.read(s, query) for m, s in zip(mems, states, strict=True)]
        assert same(ctx, Context.concat(parts))
        # one attention over the composed context == attention given every part separately
        q, k, v = query.q, chunk.k, chunk.v
        torch.testing.assert_close(
            memkit.attend(q, k, v, ctx, backend="math"), memkit.attend(q, k, v, *parts, backend="math")
        )
        states = [m.write(s, chunk) for m, s in zip(mems, states, strict=True)]
        cstate = composed.write(cstate, chunk)
    assert cstate.nbytes == sum(s.nbytes for s in states)


def test_memflow_combination_prompt_bank_plus_sparse_kv() -> None:
    torch.manual_seed(0)
    h, d, t = 2, 8, 4
    bank = memkit.PromptBankMemory(h, d, t, bank_frames=3)
    sparse = memkit.SparseKVMemory(h, d, t, capacity=12, top_k=3, always_frames=3)  # sink + routed history
    attn = memkit.MemoryAttention(h * d, h, memory=compose(bank, sparse), backend="math")
    state = attn.init_state(1)
    assert isinstance(state, ComposeState) and len(state) == 2
    x = torch.randn(1, 3 * t, h * d)
    prompt = torch.randn(1, 6, h * d)
    for s in range(6):  # chunks of 3 frames, as MemFlow streams them
        pos = torch.arange(3 * s, 3 * s + 3)[None]
        y, state = attn.forward_and_write(x, state, pos, prompt)
        assert y.shape == x.shape and torch.isfinite(y).all()
    bank_state, sparse_state = state
    assert int(bank_state.pool.valid.sum()) == 4  # bank of 3 + the newest prototype
    assert sorted(bank_state.pool.pos[0].tolist()) == sorted(set(bank_state.pool.pos[0].tolist()))
    assert sparse_state.sink.pos.tolist() == [[0, 1, 2]]
    ctx = attn.memory.read(state, Query(torch.randn(1, h, 3 * t, d), torch.tensor([[18, 19, 20]]), t, prompt))
    assert ctx.k.shape == (1, h, (3 + 3 + 3) * t, d) and ctx.mask.all()
    # state is a pytree: detach, batch selection and device moves reach both members
    assert state.detach().index_batch(0).batch_size == 1


def test_torch_compile_traces_read_and_write() -> None:
    torch._dynamo.reset()
    h, d, t = 2, 4, 2
    mem = compose(memkit.PromptBankMemory(h, d, t, bank_frames=2), memkit.SparseKVMemory(h, d, t, capacity=3))
    read = torch.compile(mem.read, fullgraph=True, backend="eager")
    write = torch.compile(mem.write, fullgraph=True, backend="eager")
    state = eager = mem.init_state(1)
    for chunk, query in segments(1, h, d, t, [2, 2, 2], 0):  # fixed sizes: no recompiles
        assert same(read(state, query), mem.read(eager, query))
        state, eager = write(state, chunk), mem.write(eager, chunk)


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least one memory"):
        ComposeMemory()
    with pytest.raises(TypeError, match=r"memories\[1\] is a int, not a memkit.Memory"):
        compose(memkit.NoMemory(), 3)  # type: ignore[arg-type]
    mem = compose(memkit.NoMemory(), memkit.FIFOMemory(2, 4, 1))
    wrong = ComposeState((memkit.NoMemory().init_state(1),))
    query = Query(torch.randn(1, 2, 1, 4), torch.tensor([[0]]), 1)
    with pytest.raises(StateError, match=r"expected a ComposeState of 2 member states, got 1"):
        mem.read(wrong, query)
    with pytest.raises(memkit.MemkitError, match="ComposeState"):
        mem.read(memkit.NoMemory().init_state(1), query)  # type: ignore[arg-type]
    # a member's own check still speaks, with its own name
    with pytest.raises(memkit.ShapeError, match=r"dimension h \(heads\) of query.q should be 2, got 3"):
        mem.read(mem.init_state(1), Query(torch.randn(1, 3, 1, 4), torch.tensor([[0]]), 1))


def test_memflow_combination_passes_the_protocol_checks() -> None:
    from memkit.testing import check_memory

    def make() -> ComposeMemory:
        bank = memkit.PromptBankMemory(2, 8, 4, bank_frames=2)
        return compose(bank, memkit.SparseKVMemory(2, 8, 4, capacity=3, top_k=2, always_frames=1))

    check_memory(make, heads=2, head_dim=8, tokens_per_frame=4, frames_per_segment=2, prompt_dim=16, examples=10)
