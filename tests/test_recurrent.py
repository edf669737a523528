"""RecurrentMemory: fixed-size state, purity, batch independence, exact truncated backprop."""

import gc
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import memkit
from memkit.memories import RecurrentMemory, RecurrentState

DIM, H, D, T, M = 16, 2, 8, 2, 4


def make(seed: int = 0, **kwargs) -> RecurrentMemory:
    torch.manual_seed(seed)
    return RecurrentMemory(DIM, H, slots=M, **kwargs)


def make_chunk(gen, b, first_frame, f=2, grad=False) -> memkit.Chunk:
    pos = torch.arange(first_frame, first_frame + f).expand(b, f)
    hidden = torch.randn(b, f * T, DIM, generator=gen).requires_grad_(grad)
    k = torch.randn(b, H, f * T, D, generator=gen)
    return memkit.Chunk(k, torch.randn(b, H, f * T, D, generator=gen), hidden, pos, T)


def make_query(gen, b, first_frame, f=2) -> memkit.Query:
    return memkit.Query(
        torch.randn(b, H, f * T, D, generator=gen), torch.arange(first_frame, first_frame + f).expand(b, f), T
    )


def leaves(tree) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def assert_trees_equal(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert torch.equal(x, y)


def test_is_a_memory_and_a_module():
    mem = make()
    assert isinstance(mem, memkit.Memory) and isinstance(mem, torch.nn.Module)
    assert memkit.RecurrentMemory is RecurrentMemory
    assert "slots=4" in repr(mem)


@given(
    truncation=st.sampled_from([None, 1, 2, 3]),
    batch=st.integers(1, 3),
    frames=st.lists(st.integers(1, 3), min_size=1, max_size=6),
    training=st.booleans(),
    grad=st.booleans(),
)
@settings(max_examples=30)
def test_state_shapes_never_change(truncation, batch, frames, training, grad):
    mem = make(truncation=truncation, noise_std=0.1)
    mem.train(training)
    gen = torch.Generator().manual_seed(len(frames))
    with torch.set_grad_enabled(grad):
        first = mem.init_state(batch)
        state, start = first, 0
        for f in frames:
            state = mem.write(state, make_chunk(gen, batch, start, f))
            start += f
            for a, b in zip(leaves(state), leaves(first), strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype and a.shape[0] == batch
            assert state.nbytes == first.nbytes
    k = truncation or 1
    assert first.nbytes == batch * (k * M * DIM + 2 * H * M * D) * 4 + 8 * batch
    assert state.writes.tolist() == [len(frames)] * batch


def test_other_dtype_state_keeps_its_dtype():
    mem = make(truncation=2)
    state = mem.init_state(2, dtype=torch.float64)
    state = mem.write(state, make_chunk(torch.Generator().manual_seed(0), 2, 0))
    assert {x.dtype for x in leaves(state) if x.is_floating_point()} == {torch.float64}


@pytest.mark.parametrize("truncation", [None, 2])
def test_write_leaves_the_old_state_unchanged(truncation):
    mem = make(truncation=truncation, noise_std=0.5).train()
    gen = torch.Generator().manual_seed(0)
    state = mem.write(mem.init_state(2), make_chunk(gen, 2, 0, grad=True))
    before = [x.detach().clone() for x in leaves(state)]
    query = make_query(gen, 2, 2)
    ctx_before = mem.read(state, query)
    mem.write(state, make_chunk(gen, 2, 2, grad=True))
    for x, y in zip(leaves(state), before, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(mem.read(state, query).k, ctx_before.k)


@given(j=st.integers(0, 2), segments=st.integers(1, 4), truncation=st.sampled_from([None, 2]))
@settings(max_examples=20)
def test_batch_items_are_independent(j, segments, truncation):
    mem = make(truncation=truncation).eval()
    gen = torch.Generator().manual_seed(segments)
    chunks = [make_chunk(gen, 3, 2 * s) for s in range(segments)]
    bent = [
        memkit.Chunk(c.k, c.v, torch.where(torch.arange(3)[:, None, None] == j, c.hidden * 3 + 1, c.hidden),
                     c.frame_positions, T)
        for c in chunks
    ]  # fmt: skip
    a, b = mem.init_state(3), mem.init_state(3)
    for c, c2 in zip(chunks, bent, strict=True):
        a, b = mem.write(a, c), mem.write(b, c2)
    query = make_query(gen, 3, 2 * segments)
    others = [i for i in range(3) if i != j]
    assert_trees_equal(a.index_batch(others), b.index_batch(others))
    assert torch.equal(mem.read(a, query).v[others], mem.read(b, query).v[others])
    assert not torch.equal(a.latent[j], b.latent[j])


def grads_of_loss_at(mem, segment: int, total: int):
    """Gradients of a loss at ``segment`` (1-based) on the hidden states of every write."""
    gen = torch.Generator().manual_seed(segment)
    chunks = [make_chunk(gen, 2, 2 * s, grad=True) for s in range(total)]
    state = mem.init_state(2)
    for c in chunks[: segment - 1]:  # the loss at segment s reads the state after writes 1..s-1
        state = mem.write(state, c)
    ctx = mem.read(state, make_query(gen, 2, 2 * (segment - 1)))
    loss = ctx.k.pow(2).sum() + ctx.v.pow(2).sum()
    return torch.autograd.grad(loss, [c.hidden for c in chunks[: segment - 1]], allow_unused=True)


@pytest.mark.parametrize("truncation", [1, 2, 3])
@pytest.mark.parametrize("segment", [2, 4, 7])
def test_truncation_window_is_exact(truncation, segment):
    mem = make(truncation=truncation, noise_std=0.3).train()
    grads = grads_of_loss_at(mem, segment, segment)
    for write, g in enumerate(grads, start=1):
        if write >= segment - truncation:  # writes s-1 .. s-K
            assert g is not None and g.abs().sum() > 0, (write, segment)
        else:  # write s-K-1 and older: not even in the graph
            assert g is None, (write, segment)


def test_no_truncation_reaches_every_write():
    grads = grads_of_loss_at(make(), 6, 6)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_truncation_reaches_the_initial_latent_only_inside_the_window():
    mem = make(truncation=2)
    gen = torch.Generator().manual_seed(0)
    state = mem.init_state(1)
    for s in range(3):
        ctx = mem.read(state, make_query(gen, 1, 2 * s))
        (g,) = torch.autograd.grad(ctx.k.sum(), [mem.init_latent], allow_unused=True)
        assert (g is not None) == (s < 2), s  # after 2 writes the initial latent lies outside the window
        state = mem.write(state, make_chunk(gen, 1, 2 * s))


def test_old_segments_are_released_outside_the_window():
    mem = make(truncation=2).train()
    gen = torch.Generator().manual_seed(0)
    state = mem.init_state(1)
    first = make_chunk(gen, 1, 0, grad=True)
    ref = weakref.ref(first.hidden)
    state = mem.write(state, first)
    del first
    gc.collect()
    assert ref() is not None  # still inside the window
    for s in range(1, 3):
        state = mem.write(state, make_chunk(gen, 1, 2 * s, grad=True))
    gc.collect()
    assert ref() is None  # nothing in the state's autograd graph holds it any more


def test_truncation_changes_gradients_not_values():
    gen = torch.Generator().manual_seed(0)
    chunks = [make_chunk(gen, 2, 2 * s) for s in range(5)]
    full, trunc = make(), make(truncation=3)
    trunc.load_state_dict(full.state_dict())
    a, b = full.init_state(2), trunc.init_state(2)
    with torch.no_grad():
        c = trunc.init_state(2)
    for ch in chunks:
        a, b = full.write(a, ch), trunc.write(b, ch)
        with torch.no_grad():
            c = trunc.write(c, ch)
    torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=0)
    torch.testing.assert_close(b.latent, c.latent, rtol=0, atol=0)
    for p in b.partial:
        torch.testing.assert_close(p, b.latent, rtol=0, atol=0)


def test_noise_only_in_training_mode():
    mem = make(noise_std=0.5)
    gen = torch.Generator().manual_seed(0)
    state, chunk = mem.init_state(2), make_chunk(gen, 2, 0)
    mem.eval()
    assert torch.equal(mem.write(state, chunk).latent, mem.write(state, chunk).latent)
    mem.train()
    assert not torch.equal(mem.write(state, chunk).latent, mem.write(state, chunk).latent)
    quiet = make()
    quiet.load_state_dict(mem.state_dict())
    assert torch.equal(quiet.train().write(state, chunk).latent, mem.eval().write(state, chunk).latent)


def test_read_places_the_latent_just_before_the_segment():
    mem = make()
    gen = torch.Generator().manual_seed(0)
    state = mem.write(mem.init_state(2), make_chunk(gen, 2, 0))
    query = memkit.Query(torch.randn(2, H, 3 * T, D), torch.tensor([[7, 8, 9], [1000, 1001, 1002]]), T)
    ctx = mem.read(state, query)
    assert ctx.k.shape == ctx.v.shape == (2, H, M, D)
    assert ctx.mask.all()
    assert ctx.positions[0].unique().tolist() == [6] and ctx.positions[1].unique().tolist() == [999]
    assert torch.equal(ctx.k, state.read_k) and torch.equal(ctx.v, state.read_v)


def test_an_untrained_gate_keeps_most_of_the_old_latent():
    """Untrained, the gate is sigmoid(gate_bias) everywhere: ``L' = g C + (1 - g) L`` with ``g ~ 0.12``.

    ``C``, the candidate, is what the same memory writes with its gate fully open (bias +30).
    """
    mem = make().eval()
    opened = make().eval()
    opened.load_state_dict(mem.state_dict())
    with torch.no_grad():
        opened.gate.bias.fill_(30.0)
    gen = torch.Generator().manual_seed(0)
    state = mem.write(mem.init_state(2), make_chunk(gen, 2, 0))  # a written latent, not the initial one
    chunk = make_chunk(gen, 2, 2)
    new, candidate = mem.write(state, chunk).latent, opened.write(state, chunk).latent
    g = torch.sigmoid(torch.tensor(-2.0))
    torch.testing.assert_close(new, g * candidate + (1 - g) * state.latent)
    assert (new - state.latent).norm() < 0.2 * (candidate - state.latent).norm()


def test_latent_remembers_the_first_segment():
    mem = make().eval()
    gen = torch.Generator().manual_seed(0)
    first_a, first_b = make_chunk(gen, 1, 0), make_chunk(gen, 1, 0)
    rest = [make_chunk(gen, 1, 2 * s) for s in range(1, 7)]
    a, b = mem.write(mem.init_state(1), first_a), mem.write(mem.init_state(1), first_b)
    for c in rest:
        a, b = mem.write(a, c), mem.write(b, c)
    gap = (a.latent - b.latent).norm() / a.latent.norm()
    assert gap > 0.01, float(gap)
    # and the read of segment 8 is differentiable with respect to segment 1
    first = make_chunk(gen, 1, 0, grad=True)
    state = mem.write(mem.init_state(1), first)
    for c in rest:
        state = mem.write(state, c)
    (g,) = torch.autograd.grad(mem.read(state, make_query(gen, 1, 14)).v.sum(), [first.hidden])
    assert g.abs().sum() > 0


@pytest.mark.parametrize(("truncation", "grad"), [(None, False), (2, True), (2, False)])
def test_compiles_fullgraph(truncation, grad):
    # every @typechecked function shares one wrapper code object, hence one dynamo cache: start empty
    torch._dynamo.reset()
    counters.clear()
    mem = make(truncation=truncation).eval()
    gen = torch.Generator().manual_seed(0)
    chunk, query = make_chunk(gen, 2, 0), make_query(gen, 2, 2)
    write = torch.compile(mem.write, fullgraph=True, backend="eager")
    read = torch.compile(mem.read, fullgraph=True, backend="eager")
    with torch.set_grad_enabled(grad):
        state = mem.init_state(2)
        compiled, eager = write(state, chunk), mem.write(state, chunk)
        for a, b in zip(leaves(compiled), leaves(eager), strict=True):
            torch.testing.assert_close(a, b)
        compiled = write(compiled, chunk)  # same shapes: the same graph serves every later write
        eager = mem.write(eager, chunk)
        torch.testing.assert_close(compiled.latent, eager.latent)
        ctx = read(compiled, query)
        assert torch.equal(ctx.positions, mem.read(eager, query).positions)
        torch.testing.assert_close(ctx.k, mem.read(eager, query).k)
    assert counters["stats"]["unique_graphs"] == 2  # one for write, one for read: no recompilation


def test_inside_memory_attention():
    mem = make(truncation=2)
    attn = memkit.MemoryAttention(DIM, H, memory=mem)
    assert any(p is mem.init_latent for p in attn.parameters())
    state = attn.init_state(2)
    x, pos = torch.randn(2, 3 * T, DIM), torch.tensor([[0, 1, 2]] * 2)
    _, state = attn.forward_and_write(x, state, pos)
    out = attn(x, state, pos + 3)
    assert out.shape == (2, 3 * T, DIM)
    out.sum().backward()
    assert mem.to_q.weight.grad is not None and mem.to_read_kv.weight.grad is not None


def test_diversity_loss():
    mem = make()
    state = mem.init_state(2)
    ortho = torch.eye(DIM)[None, :M].expand(2, M, DIM)
    same = torch.randn(2, 1, DIM).expand(2, M, DIM)
    assert float(mem.diversity_loss(state.replace(latent=ortho))) == 0.0
    assert float(mem.diversity_loss(state.replace(latent=same))) == pytest.approx(1.0)
    value = mem.diversity_loss(state)
    assert value.shape == () and 0 < float(value.detach()) < 1
    (g,) = torch.autograd.grad(value, [mem.init_latent])
    assert g.abs().sum() > 0
    single = RecurrentMemory(DIM, H, slots=1)
    assert float(single.diversity_loss(single.init_state(1))) == 0.0


@given(st.integers(0, 1000))
@settings(max_examples=25)
def test_diversity_loss_is_between_zero_and_one(seed):
    mem = make()
    latent = torch.randn(3, M, DIM, generator=torch.Generator().manual_seed(seed))
    value = float(mem.diversity_loss(mem.init_state(3).replace(latent=latent)))
    assert 0.0 <= value <= 1.0


def test_error_messages_name_the_dimension():
    mem = make()
    gen = torch.Generator().manual_seed(0)
    state = mem.init_state(1)
    c = make_chunk(gen, 1, 0)
    wrong_dim = memkit.Chunk(c.k, c.v, torch.randn(1, 2 * T, 12), c.frame_positions, T)
    with pytest.raises(memkit.ShapeError, match=r"chunk.hidden: dimension D \(model dim\) should be 16, got 12"):
        mem.write(state, wrong_dim)
    with pytest.raises(memkit.ShapeError, match=r"dimension b \(batch\) of chunk.k should be 1.*got 2"):
        mem.write(state, make_chunk(gen, 2, 0))
    with pytest.raises(memkit.ShapeError, match=r"dimension h \(heads\) of query.q should be 2, got 3"):
        mem.read(state, memkit.Query(torch.randn(1, 3, T, D), torch.tensor([[0]]), T))
    with pytest.raises(memkit.ShapeError, match=r"dimension d \(head_dim\) of query.q should be 8, got 4"):
        mem.read(state, memkit.Query(torch.randn(1, H, T, 4), torch.tensor([[0]]), T))
    with pytest.raises(memkit.MemkitError, match="expected a RecurrentState, got NoState"):
        mem.read(memkit.NoMemory().init_state(1), make_query(gen, 1, 0))
    other = RecurrentMemory(DIM, H, slots=M + 1)
    with pytest.raises(memkit.StateError, match=r"state.latent: dimension m \(memory slots\) should be 4, got 5"):
        mem.write(other.init_state(1), c)
    with pytest.raises(memkit.StateError, match="truncation=None"):
        mem.write(make(truncation=3).init_state(1), c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slots": 0}, r"slots and write_heads must be positive, got 16, 2, 8, 0, 2"),
        ({"truncation": 0}, r"truncation must be None or a positive int, got 0"),
        ({"truncation": True}, r"truncation must be None or a positive int, got True"),
        ({"noise_std": -1.0}, r"noise_std and mlp_ratio must be >= 0, got -1.0"),
        ({"write_heads": 3}, r"dim \(16\) must be divisible by write_heads \(3\)"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RecurrentMemory(DIM, H, **kwargs)
    with pytest.raises(ValueError, match="divisible"):
        RecurrentMemory(15, 2)


def test_state_is_a_pytree_and_round_trips():
    mem = make(truncation=3)
    state = mem.write(mem.init_state(3), make_chunk(torch.Generator().manual_seed(0), 3, 0))
    flat, spec = pytree.tree_flatten(state)
    rebuilt = pytree.tree_unflatten(flat, spec)
    assert isinstance(rebuilt, RecurrentState)
    assert_trees_equal(rebuilt, state)
    assert len(flat) == 3 + 2 + 1  # latent, read_k, read_v, two partial copies, writes
    assert state.index_batch(1).batch_size == 1 and len(state.detach().partial) == 2


@pytest.mark.parametrize("truncation", [None, 2])
def test_passes_the_protocol_checks(truncation):
    from memkit.testing import check_memory

    check_memory(
        lambda: make(truncation=truncation, noise_std=0.1),
        heads=H,
        head_dim=D,
        tokens_per_frame=T,
        frames_per_segment=2,
        model_dim=DIM,
        examples=10,
    )


def test_save_and_resume_equals_never_stopping(tmp_path):
    mem = make(truncation=2).eval()
    gen = torch.Generator().manual_seed(0)
    chunks = [make_chunk(gen, 2, 2 * s) for s in range(4)]
    with torch.no_grad():
        state = mem.init_state(2)
        for c in chunks[:2]:
            state = mem.write(state, c)
        memkit.save_states(tmp_path / "state.safetensors", state, mem)
        loaded = memkit.load_states(tmp_path / "state.safetensors", mem.init_state(2), mem)
        assert_trees_equal(loaded, state)
        for c in chunks[2:]:
            state, loaded = mem.write(state, c), mem.write(loaded, c)
    assert_trees_equal(loaded, state)


@given(scale=st.floats(1e-3, 1e4), seed=st.integers(0, 100), gate_bias=st.floats(-4, 4))
@settings(max_examples=15)
def test_latent_stays_bounded_however_long_the_stream(scale, seed, gate_bias):
    mem = make(seed=seed, gate_bias=gate_bias).eval()
    with torch.no_grad():  # as after training: any norm parameters
        mem.norm_candidate.weight.normal_(0, 2)
        mem.norm_candidate.bias.normal_(0, 1)
        mem.gate.weight.normal_(0, 1)
    bound = torch.maximum(
        mem.init_latent.abs().max(), (DIM - 1) ** 0.5 * mem.norm_candidate.weight.abs() + mem.norm_candidate.bias.abs()
    )  # per channel
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = mem.init_state(2)
        for s in range(60):
            c = make_chunk(gen, 2, 2 * s)
            state = mem.write(state, memkit.Chunk(c.k, c.v, c.hidden * scale, c.frame_positions, T))
    assert (state.latent.abs() <= bound + 1e-4).all()
