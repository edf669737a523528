"""RecurrentMemory(slot_positions="written", place_groups=...): slots read at the place they saw (issue 11)."""

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import memkit
from memkit.memories import RecurrentMemory

DIM, H, D, T, M = 16, 2, 8, 2, 8
PLACED = dict(slot_positions="written", place_groups=4, place_size=8.0)


def make(seed: int = 0, **kwargs) -> RecurrentMemory:
    torch.manual_seed(seed)
    return RecurrentMemory(DIM, H, slots=M, **kwargs)


def chunk_at(gen, b, positions, t=T) -> memkit.Chunk:
    """One segment of ``len(positions[0])`` frames of ``t`` tokens at the given frame positions."""
    pos = torch.tensor(positions)
    n = pos.shape[1] * t
    k = torch.randn(b, H, n, D, generator=gen)
    return memkit.Chunk(k, torch.randn(b, H, n, D, generator=gen), torch.randn(b, n, DIM, generator=gen), pos, t)


def query_at(gen, b, position) -> memkit.Query:
    return memkit.Query(torch.randn(b, H, T, D, generator=gen), torch.full((b, 1), position), T)


def test_default_state_is_unchanged():
    # the option adds no tensor to the default state: saved files and golden outputs stay as they were
    state = make().init_state(2)
    assert state.slot_pos is None and state.slot_mass is None
    assert len(pytree.tree_leaves(state)) == 4  # latent, read_k, read_v, writes


@given(place=st.integers(-20, 20), shift=st.integers(-3, 3), slots=st.sampled_from([4, 8]))
@settings(max_examples=25, deadline=None)
def test_a_slot_is_read_where_its_content_was_seen(place, shift, slots):
    mem = RecurrentMemory(DIM, H, slots=slots, **PLACED).eval()
    gen = torch.Generator().manual_seed(0)
    p = 8 * place
    with torch.no_grad():
        state = mem.write(mem.init_state(1), chunk_at(gen, 1, [[p]]))
        ctx = mem.read(state, query_at(gen, 1, p + 1000 * shift))  # the query's own position does not matter
    group = (place % 4) * (slots // 4) + torch.arange(slots // 4)
    assert ctx.mask[0, 0].tolist() == [i in group for i in range(slots)]  # only the place's group was written
    assert (ctx.positions[0, :, group] == p).all()


def test_a_slot_never_written_is_masked_and_an_empty_memory_adds_nothing():
    mem = make(**PLACED)
    ctx = mem.read(mem.init_state(2), query_at(torch.Generator().manual_seed(0), 2, 5))
    assert not ctx.mask.any()


@given(others=st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=6), seed=st.integers(0, 50))
@settings(max_examples=25, deadline=None)
def test_other_places_never_overwrite_a_place(others, seed):
    mem = make(seed, **PLACED)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        first = mem.write(mem.init_state(1), chunk_at(gen, 1, [[0]]))
        state = first
        for place in others:  # groups 1..3; place 0 is group 0
            state = mem.write(state, chunk_at(gen, 1, [[8 * place]]))
    kept = slice(0, M // 4)
    assert torch.equal(state.latent[:, kept], first.latent[:, kept])
    assert torch.equal(state.read_k[:, :, kept], first.read_k[:, :, kept])
    assert torch.equal(state.slot_pos[:, kept], first.slot_pos[:, kept])


def test_places_that_share_a_group_meet_in_between():
    # 5 places in 4 groups: places 0 and 4 share group 0, whose slots move toward the newer one
    mem = make(**PLACED).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state = mem.write(mem.init_state(1), chunk_at(gen, 1, [[0]]))
        state = mem.write(state, chunk_at(gen, 1, [[32]]))
    pos = state.slot_pos[0, : M // 4]
    assert ((pos > 0) & (pos < 32)).all()


@pytest.mark.parametrize("truncation", [None, 2])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("align_tokens", [False, True])
def test_two_places_in_one_segment_equal_two_writes(truncation, grad, align_tokens):
    # groups never see each other's frames, so one segment of two frames at two places (the masked
    # path over all slots) equals writing the frames one by one (the one-frame shortcut)
    mem = make(5, truncation=truncation, align_tokens=align_tokens, **PLACED)
    gen = torch.Generator().manual_seed(5)
    a = b = mem.init_state(2)
    with torch.set_grad_enabled(grad):
        for p in [0, 8, 40, 24]:
            two = chunk_at(gen, 2, [[p, p + 8], [p + 16, p]])
            a = mem.write(a, two)
            for i in range(2):
                sl = slice(i * T, (i + 1) * T)
                b = mem.write(b, memkit.Chunk(two.k[:, :, sl], two.v[:, :, sl], two.hidden[:, sl],
                                              two.frame_positions[:, i : i + 1], T))  # fmt: skip
    for f in ("latent", "read_k", "read_v", "slot_pos", "slot_mass"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("truncation", [None, 2])
@pytest.mark.parametrize("grad", [False, True])
def test_one_frame_shortcut_equals_the_masked_write(truncation, grad):
    # a one-frame segment updates its group alone; the same tokens given as two frames at one place
    # take the general path (masks over all slots): both must agree
    mem = make(3, truncation=truncation, **PLACED)
    gen = torch.Generator().manual_seed(3)
    a = b = mem.init_state(2)
    with torch.set_grad_enabled(grad):
        for p in [0, 8, 16, 8, 40, 24, 8]:
            one = chunk_at(gen, 2, [[p], [p + 8]], t=2 * T)
            two = memkit.Chunk(one.k, one.v, one.hidden, torch.tensor([[p, p], [p + 8, p + 8]]), T)
            a, b = mem.write(a, one), mem.write(b, two)
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_learned_positions_follow_what_the_slots_absorbed():
    # without groups every slot takes in some of every segment: its position lies between the
    # places written, nearer the ones it took in most
    mem = make(slot_positions="written").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state = mem.init_state(1)
        for p in [0, 0, 0, 80]:
            state = mem.write(state, chunk_at(gen, 1, [[p]]))
    assert state.slot_mass.gt(0).all() and state.slot_pos.gt(0).all() and state.slot_pos.lt(80).all()


def test_gradients_reach_the_write_and_the_read():
    mem = make(truncation=2, **PLACED)
    gen = torch.Generator().manual_seed(0)
    first = chunk_at(gen, 1, [[0]])
    first = memkit.Chunk(first.k, first.v, first.hidden.requires_grad_(True), first.frame_positions, T)
    state = mem.write(mem.init_state(1), first)
    ctx = mem.read(state, query_at(gen, 1, 0))
    (g,) = torch.autograd.grad((ctx.k.sum() + ctx.v.sum()), [first.hidden])
    assert g.abs().sum() > 0


def test_aligned_slots_read_only_their_own_token():
    # align_tokens: slot i of a group is written from token i alone (and itself): changing any
    # other token of the frame leaves it bit-identical
    mem = RecurrentMemory(DIM, H, slots=8, slot_positions="written", place_groups=2, place_size=8.0, align_tokens=True)
    gen = torch.Generator().manual_seed(0)
    c = chunk_at(gen, 1, [[0]], t=4)
    hidden = c.hidden.clone()
    hidden[:, 1:] += 1.0  # every token but token 0
    with torch.no_grad():
        a = mem.write(mem.init_state(1), c)
        b = mem.write(mem.init_state(1), memkit.Chunk(c.k, c.v, hidden, c.frame_positions, 4))
    assert torch.equal(a.latent[:, 0], b.latent[:, 0])  # slot 0 <- token 0
    assert not torch.equal(a.latent[:, 1], b.latent[:, 1])


@pytest.mark.parametrize(
    "kwargs", [PLACED, {**PLACED, "align_tokens": True}, dict(slot_positions="written", truncation=2)]
)
def test_passes_the_protocol_checks(kwargs):
    from memkit.testing import check_memory

    check_memory(
        lambda: make(noise_std=0.1, **kwargs),
        heads=H,
        head_dim=D,
        tokens_per_frame=T,
        frames_per_segment=2,
        model_dim=DIM,
        examples=10,
    )


def test_compiles_fullgraph():
    torch._dynamo.reset()
    counters.clear()
    mem = make(**PLACED).eval()
    gen = torch.Generator().manual_seed(0)
    write = torch.compile(mem.write, fullgraph=True, backend="eager")
    read = torch.compile(mem.read, fullgraph=True, backend="eager")
    with torch.no_grad():
        state = eager = mem.init_state(2)
        for p in [0, 8, 16]:
            c = chunk_at(gen, 2, [[p], [p + 8]])
            state, eager = write(state, c), mem.write(eager, c)
        q = query_at(gen, 2, 8)
        torch.testing.assert_close(read(state, q).k, mem.read(eager, q).k)
        assert torch.equal(read(state, q).positions, mem.read(eager, q).positions)
    assert counters["stats"]["unique_graphs"] == 2


def test_a_state_of_the_default_configuration_is_refused():
    with pytest.raises(memkit.StateError):
        make(**PLACED).read(make().init_state(1), query_at(torch.Generator().manual_seed(0), 1, 0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slot_positions": "here"}, r"slot_positions must be 'before' or 'written', got 'here'"),
        ({"place_groups": 2}, r"place_groups needs slot_positions='written'"),
        ({"slot_positions": "written", "place_groups": 3}, r"positive divisor of slots \(8\), got 3"),
        ({"slot_positions": "written", "place_groups": 2, "place_size": 0.0}, r"place_size must be > 0, got 0.0"),
        ({"slot_positions": "written", "align_tokens": True}, r"align_tokens needs place_groups"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
