"""PromptBankMemory: a bank of frames retrieved by the prompt (MemFlow NAM), with its flaws fixed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit
from memkit import Chunk, PromptBankMemory, Query, ShapeError
from memkit.memories import PromptBankState


def chunk_of(keys: torch.Tensor, positions: list[int], t: int, prompt=None, mask=None) -> Chunk:  # type: ignore[no-untyped-def]
    b = keys.shape[0]
    pos = torch.tensor(positions).expand(b, len(positions)).clone()
    return Chunk(keys, keys * 2, torch.zeros(b, keys.shape[2], 3), pos, t, prompt, mask)


def random_chunk(b: int, h: int, d: int, t: int, positions: list[int], seed: int, prompt=None, mask=None) -> Chunk:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return chunk_of(torch.randn(b, h, len(positions) * t, d, generator=g), positions, t, prompt, mask)


def query_of(b: int, h: int, d: int, t: int, prompt=None, mask=None, seed: int = 0) -> Query:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return Query(torch.randn(b, h, t, d, generator=g), torch.full((b, 1), 1000), t, prompt, mask)


def selected_positions(ctx: memkit.Context, t: int) -> list[set[int]]:
    """The frame positions a context returns, per batch item (same for every head)."""
    return [set(ctx.positions[i, 0, ::t][ctx.mask[i, 0, ::t]].tolist()) for i in range(ctx.k.shape[0])]


streams = st.fixed_dictionaries(
    {
        "b": st.integers(1, 2),
        "h": st.integers(1, 2),
        "d": st.sampled_from([2, 4]),
        "t": st.integers(1, 3),
        "bank": st.integers(1, 4),
        "prototype": st.sampled_from(["first", "best"]),
        # each write: (first position, frames, prompt seed or None); positions repeat on purpose
        "writes": st.lists(
            st.tuples(st.integers(0, 6), st.integers(1, 3), st.one_of(st.none(), st.integers(0, 50))),
            max_size=8,
        ),
        "seed": st.integers(0, 1000),
    }
)


def play(cfg: dict) -> tuple[PromptBankMemory, list[PromptBankState], list[Chunk]]:
    b, h, d, t = cfg["b"], cfg["h"], cfg["d"], cfg["t"]
    mem = PromptBankMemory(h, d, t, bank_frames=cfg["bank"], prototype=cfg["prototype"])
    states, chunks = [mem.init_state(b)], []
    for i, (start, frames, pseed) in enumerate(cfg["writes"]):
        prompt = None if pseed is None else torch.randn(b, 3, h * d, generator=torch.Generator().manual_seed(pseed))
        chunk = random_chunk(b, h, d, t, list(range(start, start + frames)), cfg["seed"] + i, prompt)
        chunks.append(chunk)
        states.append(mem.write(states[-1], chunk))
    return mem, states, chunks


@settings(max_examples=40, deadline=None)
@given(cfg=streams)
def test_bank_bounded_no_duplicates_shapes_constant_and_pure(cfg: dict) -> None:
    mem, states, chunks = play(cfg)
    shapes = [x.shape for x in torch.utils._pytree.tree_leaves(states[0])]
    b, h, d, t, bank = cfg["b"], cfg["h"], cfg["d"], cfg["t"], cfg["bank"]
    for state in states:
        assert [x.shape for x in torch.utils._pytree.tree_leaves(state)] == shapes
        assert state.nbytes == 2 * b * h * (bank + 1) * t * d * 4 + 17 * b * (bank + 1) + 8 * b
        for i in range(b):
            kept = state.pool.pos[i][state.pool.valid[i]].tolist()
            assert len(kept) == len(set(kept)) <= bank + 1  # no frame held twice
        ctx = mem.read(state, query_of(b, h, d, t, torch.randn(b, 2, h * d)))
        assert ctx.k.shape == (b, h, bank * t, d)
        assert (ctx.mask.sum(2) <= bank * t).all()
        for i, got in enumerate(selected_positions(ctx, t)):
            assert len(got) == min(bank, int(state.pool.valid[i].sum()))
    # a write never changes the state it was given: replaying from a copy gives the same
    for state, chunk, nxt in zip(states[:-1], chunks, states[1:], strict=True):
        copy = memkit.map_tensors(torch.clone, state)
        again = mem.write(copy, chunk)
        for x, y in zip(*(torch.utils._pytree.tree_leaves(s) for s in (state, copy)), strict=True):
            assert torch.equal(x, y)
        for x, z in zip(torch.utils._pytree.tree_leaves(again), torch.utils._pytree.tree_leaves(nxt), strict=True):
            assert torch.equal(x, z)


@settings(max_examples=40, deadline=None)
@given(cfg=streams, pseed=st.integers(0, 100))
def test_write_keeps_exactly_what_reads_with_the_same_prompt_returned(cfg: dict, pseed: int) -> None:
    mem, states, _ = play(cfg)
    b, h, d, t = cfg["b"], cfg["h"], cfg["d"], cfg["t"]
    state = states[-1]
    prompt = torch.randn(b, 4, h * d, generator=torch.Generator().manual_seed(pseed))
    read_set = selected_positions(mem.read(state, query_of(b, h, d, t, prompt)), t)
    new_pos = 99  # a frame not yet in the pool
    nxt = mem.write(state, random_chunk(b, h, d, t, [new_pos], 7, prompt))
    for i in range(b):
        assert set(nxt.pool.pos[i][nxt.pool.valid[i]].tolist()) == read_set[i] | {new_pos}


@settings(max_examples=40, deadline=None)
@given(cfg=streams, pad=st.integers(1, 5), real=st.integers(1, 4))
def test_retrieval_is_invariant_to_prompt_padding(cfg: dict, pad: int, real: int) -> None:
    mem, states, _ = play(cfg)
    b, h, d, t = cfg["b"], cfg["h"], cfg["d"], cfg["t"]
    g = torch.Generator().manual_seed(cfg["seed"])
    prompt = torch.randn(b, real, h * d, generator=g)
    padded = torch.cat([prompt, 1e4 * torch.randn(b, pad, h * d, generator=g)], dim=1)
    mask = torch.cat([torch.ones(b, real, dtype=torch.bool), torch.zeros(b, pad, dtype=torch.bool)], dim=1)
    for state in states:
        plain = mem.read(state, query_of(b, h, d, t, prompt))
        masked = mem.read(state, query_of(b, h, d, t, padded, mask))
        assert torch.equal(plain.k, masked.k) and torch.equal(plain.positions, masked.positions)
        assert torch.equal(plain.mask, masked.mask)
    last = states[-1]
    w1 = mem.write(last, random_chunk(b, h, d, t, [50, 51], 3, prompt))
    w2 = mem.write(last, random_chunk(b, h, d, t, [50, 51], 3, padded, mask))
    assert torch.equal(w1.pool.pos, w2.pool.pos) and torch.equal(w1.pool.valid, w2.pool.valid)
    assert torch.equal(w1.pool.k, w2.pool.k)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 3),
    d=st.sampled_from([4, 8]),
    t=st.integers(1, 3),
    order=st.permutations(["A", "A", "B"]),
    noise=st.floats(0.0, 0.3),
    seed=st.integers(0, 1000),
)
def test_prompt_aligned_with_a_scene_retrieves_its_frames(
    h: int, d: int, t: int, order: list[str], noise: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    # in every head, scene A's keys point along one direction and scene B's along an orthogonal one
    dirs = torch.linalg.qr(torch.randn(h, d, 2, generator=g)).Q.transpose(1, 2) * 3 * d**0.5  # (h 2 d)
    a, b_dir = dirs[:, 0].flatten(), dirs[:, 1].flatten()
    scene = {"A": a, "B": b_dir}
    mem = PromptBankMemory(h, d, t, bank_frames=2)
    state = mem.init_state(1)
    for s, name in enumerate(order):  # no prompt while writing: the pool keeps all three frames
        keys = scene[name].reshape(h, 1, d).expand(h, 2 * t, d) + noise * torch.randn(h, 2 * t, d, generator=g)
        state = mem.write(state, chunk_of(keys[None].contiguous(), [2 * s, 2 * s + 1], t))
    a_frames = {2 * s for s, name in enumerate(order) if name == "A"}
    b_frame = {2 * s for s, name in enumerate(order) if name == "B"}
    prompt_a = (a + 0.1 * torch.randn(4, h * d, generator=g))[None]
    prompt_b = (b_dir + 0.1 * torch.randn(4, h * d, generator=g))[None]
    assert selected_positions(mem.read(state, query_of(1, h, d, t, prompt_a)), t) == [a_frames]
    got_b = selected_positions(mem.read(state, query_of(1, h, d, t, prompt_b)), t)[0]
    assert b_frame <= got_b
    # the switch acts at the first read of the new segment, and the write agrees with it
    after = mem.write(state, chunk_of(torch.zeros(1, h, 2 * t, d), [10, 11], t, prompt_a))
    assert set(after.pool.pos[0][after.pool.valid[0]].tolist()) == a_frames | {10}


def test_without_prompt_recency_keeps_the_newest_frames() -> None:
    mem = PromptBankMemory(1, 2, 1, bank_frames=2)
    state = mem.init_state(1)
    for s in range(5):
        state = mem.write(state, random_chunk(1, 1, 2, 1, [3 * s, 3 * s + 1, 3 * s + 2], s))
    assert selected_positions(mem.read(state, query_of(1, 1, 2, 1)), 1) == [{9, 12}]
    assert sorted(state.pool.pos[0][state.pool.valid[0]].tolist()) == [6, 9, 12]
    all_padded = torch.zeros(1, 2, dtype=torch.bool)
    ctx = mem.read(state, query_of(1, 1, 2, 1, torch.randn(1, 2, 2), all_padded))
    assert selected_positions(ctx, 1) == [{9, 12}]


def test_rewritten_frame_replaces_its_entry() -> None:
    mem = PromptBankMemory(1, 2, 1, bank_frames=2)
    state = mem.init_state(1)
    state = mem.write(state, chunk_of(torch.ones(1, 1, 1, 2), [0], 1))
    state = mem.write(state, chunk_of(torch.ones(1, 1, 1, 2) * 3, [0], 1))  # frame 0 regenerated
    assert state.pool.valid.sum() == 1 and state.pool.pos[0][state.pool.valid[0]].tolist() == [0]
    assert state.pool.k[0, 0][state.pool.valid[0]].flatten().tolist() == [3.0, 3.0]


def test_best_prototype_picks_the_frame_matching_the_prompt() -> None:
    mem = PromptBankMemory(1, 2, 1, bank_frames=1, prototype="best")
    keys = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]).reshape(1, 1, 3, 2)
    state = mem.write(mem.init_state(1), chunk_of(keys, [0, 1, 2], 1, torch.tensor([[[0.0, 2.0]]])))
    assert state.pool.pos[0][state.pool.valid[0]].tolist() == [1]
    state = mem.write(mem.init_state(1), chunk_of(keys, [0, 1, 2], 1))  # no prompt: the first frame
    assert state.pool.pos[0][state.pool.valid[0]].tolist() == [0]


@settings(max_examples=25, deadline=None)
@given(cfg=streams)
def test_batch_items_are_independent(cfg: dict) -> None:
    cfg = {**cfg, "b": 2}
    mem, states, chunks = play(cfg)
    h, d, t = cfg["h"], cfg["d"], cfg["t"]
    q = query_of(2, h, d, t, torch.randn(2, 3, h * d, generator=torch.Generator().manual_seed(1)))
    ctx = mem.read(states[-1], q)
    for i in range(2):
        alone = mem.init_state(1)
        for c in chunks:
            sl = slice(i, i + 1)
            p = None if c.prompt is None else c.prompt[sl]
            alone = mem.write(alone, Chunk(c.k[sl], c.v[sl], c.hidden[sl], c.frame_positions[sl], t, p))
        one = mem.read(alone, Query(q.q[i : i + 1], q.frame_positions[i : i + 1], t, q.prompt[i : i + 1]))  # type: ignore[index]
        assert torch.equal(one.k, ctx.k[i : i + 1]) and torch.equal(one.positions, ctx.positions[i : i + 1])


def test_prompt_projection_for_other_prompt_sizes() -> None:
    torch.manual_seed(0)
    mem = PromptBankMemory(2, 4, 2, bank_frames=2, prompt_dim=5)
    assert mem.prompt_proj is not None and mem.prompt_proj.weight.shape == (8, 5)
    state = mem.write(mem.init_state(1), random_chunk(1, 2, 4, 2, [0, 1], 0, torch.randn(1, 3, 5)))
    ctx = mem.read(state, query_of(1, 2, 4, 2, torch.randn(1, 3, 5)))
    assert selected_positions(ctx, 2) == [{0}]
    # inside MemoryAttention the projection is a parameter of the layer
    attn = memkit.MemoryAttention(8, 2, memory=mem)
    assert any(p is mem.prompt_proj.weight for p in attn.parameters())


def test_torch_compile_traces_read_and_write() -> None:
    torch._dynamo.reset()
    mem = PromptBankMemory(2, 4, 2, bank_frames=2, prototype="best")
    read = torch.compile(mem.read, fullgraph=True, backend="eager")
    write = torch.compile(mem.write, fullgraph=True, backend="eager")
    state = eager = mem.init_state(2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for s in range(4):
        prompt = torch.randn(2, 3, 8)
        chunk = random_chunk(2, 2, 4, 2, [2 * s, 2 * s + 1], s, prompt, mask)
        state, eager = write(state, chunk), mem.write(eager, chunk)
        q = query_of(2, 2, 4, 2, prompt, mask, seed=s)
        got, want = read(state, q), mem.read(eager, q)
        assert torch.equal(got.k, want.k) and torch.equal(got.positions, want.positions)
        assert torch.equal(got.mask, want.mask)


def test_errors_name_the_dimension() -> None:
    mem = PromptBankMemory(2, 4, 2, bank_frames=2)
    state = mem.init_state(1)
    with pytest.raises(ShapeError, match=r"dimension e \(prompt dim\) of query.prompt should be 8 \(heads\*head_dim"):
        mem.read(state, query_of(1, 2, 4, 2, torch.randn(1, 3, 6)))
    with pytest.raises(ShapeError, match=r"dimension e \(prompt dim\) of chunk.prompt should be 8"):
        mem.write(state, random_chunk(1, 2, 4, 2, [0], 0, torch.randn(1, 3, 7)))
    with pytest.raises(ShapeError, match=r"dimension h \(heads\) of query.q should be 2, got 3"):
        mem.read(state, query_of(1, 3, 4, 2))
    with pytest.raises(ShapeError, match=r"chunk.tokens_per_frame should be 2 \(the memory's frame size\), got 1"):
        mem.write(state, random_chunk(1, 2, 4, 1, [0], 0))
    with pytest.raises(ValueError, match=r"prototype must be one of \('first', 'best'\), got 'mean'"):
        PromptBankMemory(2, 4, 2, prototype="mean")


def _frames(*vectors: list[float]) -> torch.Tensor:
    """Keys (1, 1, f, 2) from 2-d vectors: one head of dim 2, one token per frame."""
    return torch.tensor(vectors).reshape(1, 1, len(vectors), 2)


def test_next_prompt_decides_eviction_so_a_frame_for_the_next_prompt_survives_the_switch() -> None:
    # X matters only to the next prompt (along e2); A and C to the current one (along e1)
    p1, p2 = torch.tensor([[[3.0, 0.0]]]), torch.tensor([[[0.0, 3.0]]])
    mem = PromptBankMemory(1, 2, 1, bank_frames=2)

    def stream(next_prompt: torch.Tensor | None) -> PromptBankState:
        state = mem.init_state(1)
        for pos, key in ((0, [0.0, 5.0]), (1, [5.0, 0.0]), (2, [4.0, 1.0])):  # X, A, C: the pool fills
            state = mem.write(state, chunk_of(_frames(key), [pos], 1, p1))
        # the last segment under p1 is written; the host knows p2 comes next
        k = _frames([5.0, 0.5])
        last = Chunk(k, k, torch.zeros(1, 1, 3), torch.tensor([[3]]), 1, p1, next_prompt=next_prompt)
        return mem.write(state, last)

    read_p2 = query_of(1, 1, 2, 1, p2)
    assert 0 in selected_positions(mem.read(stream(p2), read_p2), 1)[0]  # the new prompt decided: X survives
    # without the next prompt the finished segment's prompt decides, as in MemFlow: X is gone
    assert 0 not in selected_positions(mem.read(stream(None), read_p2), 1)[0]


def test_release_score_is_the_mean_raw_logit_with_padding_and_can_rank_unlike_softmax() -> None:
    # frame 0: one token far along the prompt, one far against it (mean logit 0, but the top token);
    # frame 1: two tokens a little along it (mean logit 1)
    k = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [1.0, 0.0], [1.0, 0.0]]).reshape(1, 1, 2, 2, 2)
    prompt = torch.tensor([[[1.414, 0.0], [0.0, 7.0]]])
    mask = torch.tensor([[True, False]])  # the second token is padding
    valid = torch.ones(1, 2, dtype=torch.bool)
    soft = PromptBankMemory(1, 2, 2, score="softmax").relevance(k, valid, prompt, mask)
    release = PromptBankMemory(1, 2, 2, score="release").relevance(k, valid, prompt, mask)
    assert soft.argmax(1).item() == 0 and release.argmax(1).item() == 1  # the rankings differ
    naive = [sum(float(prompt[0, i] @ k[0, 0, c, j]) for i in range(2) for j in range(2)) / 4 / 2**0.5 for c in (0, 1)]
    torch.testing.assert_close(release[0], torch.tensor(naive))  # padding included, no softmax
    unmasked = PromptBankMemory(1, 2, 2, score="release").relevance(k, valid, prompt, None)
    torch.testing.assert_close(release, unmasked)  # the release ignores the padding mask


def test_record_interval_records_every_rth_write() -> None:
    mem = PromptBankMemory(1, 2, 1, bank_frames=3, record_interval=3)
    state = mem.init_state(1)
    for pos in range(7):
        state = mem.write(state, chunk_of(torch.randn(1, 1, 1, 2), [pos], 1))
    assert sorted(state.pool.pos[0][state.pool.valid[0]].tolist()) == [0, 3, 6]


def test_memflow_rule_keeps_top_b_minus_1_then_the_pending_prototype() -> None:
    p = torch.tensor([[[3.0, 0.0]]])
    mem = PromptBankMemory(1, 2, 1, bank_frames=2, rule="memflow", score="release")
    state = mem.init_state(1)
    for pos, key in ((0, [1.0, 0.0]), (1, [5.0, 0.0]), (2, [-5.0, 0.0])):
        state = mem.write(state, chunk_of(_frames(key), [pos], 1, p))
    # prototypes 0, 1 filled the bank; 2 is pending: a read keeps the best 1 of {0, 1} and appends 2
    assert selected_positions(mem.read(state, query_of(1, 1, 2, 1, p)), 1)[0] == {1, 2}
    # the pending prototype is appended however poorly it scores; the next read appends it again
    state = mem.write(state, chunk_of(_frames([0.0, 1.0]), [3], 1, p))
    assert sorted(state.pool.pos[0].tolist()) == [1, 2, 3]  # bank {1, 2}, pending 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "lru"}, "rule must be one of"),
        ({"score": "max"}, "score must be one of"),
        ({"record_interval": 0}, "record_interval must be a positive int"),
        ({"min_relevance": float("nan")}, "min_relevance must be finite"),
        ({"min_relevance": "0.2"}, "min_relevance must be a number"),
        ({"min_relevance": 0.2, "rule": "memflow"}, "min_relevance needs rule='memkit'"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptBankMemory(1, 2, 1, **kwargs)


# --------------------------------------------------------------------------- relevance cut-off (#14 item 5)


def _with_cutoff(mem: PromptBankMemory, cutoff: float | None) -> PromptBankMemory:
    return PromptBankMemory(
        mem.heads, mem.head_dim, mem.tokens_per_frame, bank_frames=mem.bank_frames, prototype=mem.prototype,
        score=mem.score, min_relevance=cutoff,
    )  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    cfg=streams, cutoff=st.floats(0.0, 0.8), pseed=st.integers(0, 100), score=st.sampled_from(["softmax", "release"])
)
def test_cutoff_masks_exactly_the_returned_frames_scoring_below_it(
    cfg: dict, cutoff: float, pseed: int, score: str
) -> None:
    mem, states, _ = play(cfg)
    mem = PromptBankMemory(mem.heads, mem.head_dim, mem.tokens_per_frame, bank_frames=mem.bank_frames, score=score)
    cut = PromptBankMemory(
        mem.heads, mem.head_dim, mem.tokens_per_frame, bank_frames=mem.bank_frames, score=score, min_relevance=cutoff
    )
    b, h, d, t = cfg["b"], cfg["h"], cfg["d"], cfg["t"]
    prompt = torch.randn(b, 3, h * d, generator=torch.Generator().manual_seed(pseed))
    for state in states:
        full = mem.read(state, query_of(b, h, d, t, prompt))
        got = cut.read(state, query_of(b, h, d, t, prompt))
        # the same frames in the same slots: only the mask changes
        assert torch.equal(full.k, got.k) and torch.equal(full.v, got.v) and torch.equal(full.positions, got.positions)
        scores = mem.relevance(state.pool.k, state.pool.valid, prompt, None)
        for i in range(b):
            pool = zip(state.pool.pos[i], scores[i], state.pool.valid[i], strict=True)
            by_pos = {int(p): float(s) for p, s, ok in pool if ok}
            want = {p for p in selected_positions(full, t)[i] if by_pos[p] >= cutoff}
            assert selected_positions(got, t)[i] == want
        assert not (got.mask & ~full.mask).any()  # the cut-off never adds a slot


@settings(max_examples=30, deadline=None)
@given(cfg=streams, cutoff=st.floats(0.05, 0.8), pseed=st.integers(0, 100))
def test_frames_below_the_cutoff_never_contribute_to_attention(cfg: dict, cutoff: float, pseed: int) -> None:
    mem, states, _ = play(cfg)
    cut = _with_cutoff(mem, cutoff)
    b, h, d, t = cfg["b"], cfg["h"], cfg["d"], cfg["t"]
    g = torch.Generator().manual_seed(pseed)
    prompt = torch.randn(b, 3, h * d, generator=g)
    q, k, v = (torch.randn(b, h, 2 * t, d, generator=g) for _ in range(3))
    for state in states:
        ctx = cut.read(state, query_of(b, h, d, t, prompt))
        garbage = 1e3 * torch.randn(ctx.k.shape, generator=g)
        spoiled = memkit.Context(
            torch.where(ctx.mask[..., None], ctx.k, garbage),
            torch.where(ctx.mask[..., None], ctx.v, garbage),
            mask=ctx.mask,
            positions=ctx.positions,
        )
        assert torch.equal(memkit.attend(q, k, v, ctx), memkit.attend(q, k, v, spoiled))


@settings(max_examples=30, deadline=None)
@given(cfg=streams, pseed=st.integers(0, 100))
def test_a_cutoff_that_cuts_nothing_is_bit_identical_to_none(cfg: dict, pseed: int) -> None:
    mem, states, _ = play(cfg)
    b, h, d, t = cfg["b"], cfg["h"], cfg["d"], cfg["t"]
    prompt = torch.randn(b, 3, h * d, generator=torch.Generator().manual_seed(pseed))
    zero = _with_cutoff(mem, 0.0)  # softmax shares are never negative
    for state in states:
        for p in (prompt, None):
            want = mem.read(state, query_of(b, h, d, t, p))
            got = zero.read(state, query_of(b, h, d, t, p))
            for x, y in zip(
                (want.k, want.v, want.positions, want.mask), (got.k, got.v, got.positions, got.mask), strict=True
            ):
                assert torch.equal(x, y)
        # the cut-off decides reads only: writes, and so the states, are those of a bank without it
        chunk = random_chunk(b, h, d, t, [40, 41], 5, prompt)
        for x, y in zip(
            torch.utils._pytree.tree_leaves(mem.write(state, chunk)),
            torch.utils._pytree.tree_leaves(_with_cutoff(mem, 0.5).write(state, chunk)),
            strict=True,
        ):
            assert torch.equal(x, y)


def test_cutoff_masks_nothing_without_a_prompt_or_with_only_padding() -> None:
    mem = PromptBankMemory(1, 2, 1, bank_frames=2, min_relevance=0.9)
    state = mem.init_state(1)
    for pos, key in ((0, [1.0, 0.0]), (1, [0.0, 1.0]), (2, [-1.0, 0.0])):
        state = mem.write(state, chunk_of(_frames(key), [pos], 1))
    assert selected_positions(mem.read(state, query_of(1, 1, 2, 1)), 1) == [{1, 2}]
    padded = query_of(1, 1, 2, 1, torch.tensor([[[5.0, 0.0]]]), torch.tensor([[False]]))
    assert selected_positions(mem.read(state, padded), 1) == [{1, 2}]
    # a prompt aligned with frame 0 keeps it and cuts the frames that get almost no share
    aligned = query_of(1, 1, 2, 1, torch.tensor([[[20.0, 0.0]]]))
    assert selected_positions(mem.read(state, aligned), 1) == [{0}]


def test_plan_applies_the_cutoff_as_read_does() -> None:
    plain = PromptBankMemory(2, 4, 2, bank_frames=3)
    state = plain.init_state(1)
    for s in range(5):
        state = plain.write(state, random_chunk(1, 2, 4, 2, [2 * s, 2 * s + 1], s))
    prompt = 3 * torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))
    scores = sorted(plain.relevance(state.pool.k, state.pool.valid, prompt, None)[0].tolist())
    mem = _with_cutoff(plain, (scores[1] + scores[2]) / 2)  # between the 2nd and 3rd of the 4 candidates
    q = query_of(1, 2, 4, 2, prompt)
    ctx = mem.read(state, q)
    (planned,) = mem.plan(state, memkit.ReadLayout(q.frame_positions, 2, prompt, None)).parts
    assert planned is not None
    assert torch.equal(ctx.mask, planned.mask) and torch.equal(ctx.k, planned.k)
    assert int(ctx.mask[0, 0, ::2].sum()) == 2  # the bank returns 3 frames; the cut-off keeps the best 2


def test_relevance_is_reused_only_for_the_very_same_unchanged_inputs():
    """A segment's plan and write score the same pool with the same prompt: the second is a lookup, never stale."""
    import pickle

    mem = memkit.PromptBankMemory(heads=2, head_dim=4, tokens_per_frame=3, bank_frames=2)
    k, valid = torch.randn(1, 2, 3, 3, 4), torch.tensor([[True, True, False]])
    prompt = torch.randn(1, 5, 8)
    with torch.no_grad():
        first = mem.relevance(k, valid, prompt, None)
        assert mem.relevance(k, valid, prompt, None) is first  # the same inputs: looked up
        assert mem.relevance(k.clone(), valid, prompt, None) is not first  # another tensor: computed
        again = mem.relevance(k, valid, prompt, None)
        k.mul_(2.0)  # edited in place: its version changes, so the next call computes
        fresh = mem.relevance(k, valid, prompt, None)
        assert fresh is not again and not torch.equal(fresh, again)
        assert torch.equal(fresh, mem._relevance(k, valid, prompt, None))
        fresh.zero_()  # the caller edits the returned scores: not handed back again
        assert not torch.equal(mem.relevance(k, valid, prompt, None), fresh)
    with torch.enable_grad():  # training: never looked up (the graph and the weights change)
        assert mem.relevance(k, valid, prompt, None) is not mem.relevance(k, valid, prompt, None)
    pickle.dumps(mem)  # the memory itself holds no reference to the memo
