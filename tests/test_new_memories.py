"""CompressedWindowMemory (MemRoPE) and PackedHistoryMemory (FramePack): protocol kit and naive references.

Each reference below is written from the published description with Python lists and
loops (no gathers, no masks): a list of frames that grows, the window cut, the averages
updated once per write. The memories must agree with it on random streams.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import memkit
from memkit.errors import StateError
from memkit.memories.packed_history import pool_tokens
from memkit.testing import check_memory
from memkit.typing import set_typecheck

H, D, T = 2, 4, 8


def _chunk(frames: list[int], seed: int) -> memkit.Chunk:
    g = torch.Generator().manual_seed(seed)
    n = len(frames) * T
    k, v = torch.randn(1, H, n, D, generator=g), torch.randn(1, H, n, D, generator=g)
    return memkit.Chunk(k, v, torch.randn(1, n, H * D, generator=g), torch.tensor([frames]), T)


def _query(position: int) -> memkit.Query:
    return memkit.Query(torch.randn(1, H, T, D), torch.tensor([[position]]), T)


def _frames(chunk: memkit.Chunk) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    k = chunk.k[0].reshape(H, -1, T, D)
    v = chunk.v[0].reshape(H, -1, T, D)
    return [(int(p), k[:, i], v[:, i]) for i, p in enumerate(chunk.frame_positions[0])]


def _valid_slots(ctx: memkit.Context) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    keep = ctx.mask[0, 0]
    return ctx.k[0][:, keep], ctx.v[0][:, keep], ctx.positions[0, 0][keep].tolist()


segment_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=8)


# ------------------------------------------------------------------------- CompressedWindowMemory
def _memrope_reference(chunks, sink, window, a_long, a_short, pool):
    """MemRoPE's cache as a list: sink, then window; per write, evicted frames averaged and folded in."""
    sink_frames, window_frames, long, short, mem_pos = [], [], None, None, None
    for chunk in chunks:
        evicted = []
        for frame in _frames(chunk):
            if len(sink_frames) < sink:
                sink_frames.append(frame)
                continue
            window_frames.append(frame)
            if len(window_frames) > window:
                evicted.append(window_frames.pop(0))
        if evicted:
            mk = sum(f[1] for f in evicted) / len(evicted)
            mv = sum(f[2] for f in evicted) / len(evicted)
            if pool == "frame_mean":
                mk, mv = mk.mean(dim=1, keepdim=True).expand_as(mk), mv.mean(dim=1, keepdim=True).expand_as(mv)
            if long is None:
                long, short = (mk, mv), (mk, mv)
            else:
                long = ((1 - a_long) * long[0] + a_long * mk, (1 - a_long) * long[1] + a_long * mv)
                short = ((1 - a_short) * short[0] + a_short * mk, (1 - a_short) * short[1] + a_short * mv)
            mem_pos = evicted[-1][0]
    slots = list(sink_frames)
    if long is not None:
        slots += [(mem_pos - 1, *long), (mem_pos, *short)]
    slots += window_frames
    return slots


@settings(max_examples=40, deadline=None)
@given(
    sizes=segment_sizes,
    sink=st.integers(0, 3),
    window=st.integers(1, 4),
    pool=st.sampled_from(["frame_mean", "token"]),
    seed=st.integers(0, 1000),
)
def test_compressed_window_equals_memrope_reference(sizes, sink, window, pool, seed) -> None:
    mem = memkit.CompressedWindowMemory(H, D, T, sink_frames=sink, window_frames=window, pool=pool)
    state, chunks, start = mem.init_state(1), [], 0
    for i, f in enumerate(sizes):
        chunks.append(_chunk(list(range(start, start + f)), seed + i))
        state = mem.write(state, chunks[-1])
        start += f
    want = _memrope_reference(chunks, sink, window, mem.alpha_long, mem.alpha_short, pool)
    k, v, positions = _valid_slots(mem.read(state, _query(start)))
    assert positions == [p for p, _, _ in want for _ in range(T)]
    torch.testing.assert_close(k, torch.cat([fk for _, fk, _ in want], dim=1) if want else k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, torch.cat([fv for _, _, fv in want], dim=1) if want else v, atol=1e-5, rtol=1e-5)


def test_compressed_window_remembers_what_sink_window_forgets() -> None:
    """Change a frame evicted 10 writes ago: the plain window's context is unchanged, the averages are not."""
    plain = memkit.SinkWindowMemory(H, D, T, sink_frames=0, window_frames=2)
    packed = memkit.CompressedWindowMemory(H, D, T, sink_frames=0, window_frames=2)
    contexts = []
    for first_seed in (0, 99):
        s_plain, s_packed = plain.init_state(1), packed.init_state(1)
        for i in range(12):
            c = _chunk([i], first_seed if i == 0 else i)
            s_plain, s_packed = plain.write(s_plain, c), packed.write(s_packed, c)
        contexts.append((plain.read(s_plain, _query(12)), packed.read(s_packed, _query(12))))
    (plain_a, packed_a), (plain_b, packed_b) = contexts
    assert torch.equal(plain_a.k, plain_b.k)
    slow_a, slow_b = packed_a.k[0, :, :T], packed_b.k[0, :, :T]  # the slow average comes first
    assert (slow_a - slow_b).abs().max() > 1e-3


def test_compressed_window_protocol() -> None:
    check_memory(
        lambda: memkit.CompressedWindowMemory(2, 8, 4, sink_frames=1, window_frames=2, pool="token"),
        heads=2,
        head_dim=8,
        tokens_per_frame=4,
        frames_per_segment=2,
        examples=12,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha_long": 0.0}, "alpha_long must be in (0, 1]"),
        ({"alpha_short": 1.5}, "alpha_short must be in (0, 1]"),
        ({"pool": "max"}, "pool must be 'frame_mean' or 'token'"),
        ({"window_frames": 0}, "window_frames must be positive"),
    ],
)
def test_compressed_window_refuses_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        memkit.CompressedWindowMemory(2, 8, 4, **kwargs)


# ---------------------------------------------------------------------------- PackedHistoryMemory
def _framepack_reference(chunks, per_level, levels, frame_shape):
    """Lists of frames per level; a frame leaving level i is pooled from full resolution to level i + 1."""
    lists: list[list] = [[] for _ in range(levels)]
    for chunk in chunks:
        for pos, k, v in _frames(chunk):
            moving = [(pos, k, v)]
            for level in range(levels):
                lists[level].extend(moving)
                moving = []
                while len(lists[level]) > per_level:
                    moving.append(lists[level].pop(0))
    slots = []
    for level in reversed(range(levels)):
        for pos, k, v in lists[level]:
            pk = pool_tokens(k[None, :, None], frame_shape, level)[0, :, 0]
            pv = pool_tokens(v[None, :, None], frame_shape, level)[0, :, 0]
            slots.append((pos, pk, pv))
    return slots


@settings(max_examples=40, deadline=None)
@given(
    sizes=segment_sizes,
    per_level=st.integers(1, 3),
    levels=st.integers(1, 3),
    frame_shape=st.sampled_from([(2, 4), (1, 8), (4, 2)]),
    seed=st.integers(0, 1000),
)
def test_packed_history_equals_framepack_reference(sizes, per_level, levels, frame_shape, seed) -> None:
    mem = memkit.PackedHistoryMemory(H, D, T, frames_per_level=per_level, levels=levels, frame_shape=frame_shape)
    state, chunks, start = mem.init_state(1), [], 0
    for i, f in enumerate(sizes):
        chunks.append(_chunk(list(range(start, start + f)), seed + i))
        state = mem.write(state, chunks[-1])
        start += f
    want = _framepack_reference(chunks, per_level, levels, frame_shape)
    k, v, positions = _valid_slots(mem.read(state, _query(start)))
    assert positions == [p for p, fk, _ in want for _ in range(fk.shape[1])]
    torch.testing.assert_close(k, torch.cat([fk for _, fk, _ in want], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, torch.cat([fv for _, _, fv in want], dim=1), atol=1e-5, rtol=1e-5)


@given(per_level=st.integers(1, 4), levels=st.integers(1, 5))
@settings(max_examples=20, deadline=None)
def test_packed_history_context_is_bounded(per_level: int, levels: int) -> None:
    """Slots = F t (2 - 2^(1-L)) < 2 F t, whatever the number of levels; history covered = L F frames."""
    t = 2 ** (levels - 1) * 2
    mem = memkit.PackedHistoryMemory(1, 2, t, frames_per_level=per_level, levels=levels)
    slots = mem.read(mem.init_state(1), memkit.Query(torch.randn(1, 1, t, 2), torch.tensor([[0]]), t)).num_slots
    assert slots == per_level * t * (2 - 2 ** (1 - levels))
    assert slots < 2 * per_level * t


def test_packed_history_protocol() -> None:
    check_memory(
        lambda: memkit.PackedHistoryMemory(2, 8, 4, frames_per_level=2, levels=2, frame_shape=(2, 2)),
        heads=2,
        head_dim=8,
        tokens_per_frame=4,
        frames_per_segment=2,
        examples=12,
    )


def test_packed_history_refuses_bad_config_and_foreign_state() -> None:
    with pytest.raises(ValueError, match=r"frame_shape \(3, 3\) should be \(H, W\) with H \* W = tokens_per_frame = 8"):
        memkit.PackedHistoryMemory(2, 8, 8, frame_shape=(3, 3))
    with pytest.raises(ValueError, match="5 levels pool the last level.s frames by 4x4"):
        memkit.PackedHistoryMemory(2, 8, 8, levels=5, frame_shape=(2, 4))
    small = memkit.PackedHistoryMemory(2, 8, 8, levels=2)
    with pytest.raises(StateError, match="PackedHistoryMemory.read"):
        small.read(
            memkit.PackedHistoryMemory(2, 8, 8, levels=3).init_state(1),
            memkit.Query(torch.randn(1, 2, 8, 8), torch.tensor([[0]]), 8),
        )


# -------------------------------------------------------------------------------- QuantizedMemory
FRAME_MEMORIES = {
    "fifo": lambda: memkit.FIFOMemory(2, 8, 4, frames=3),
    "sink_window": lambda: memkit.SinkWindowMemory(2, 8, 4, sink_frames=1, window_frames=2),
    "sparse_kv": lambda: memkit.SparseKVMemory(2, 8, 4, capacity=3, top_k=2, always_frames=1),
    "prompt_bank": lambda: memkit.PromptBankMemory(2, 8, 4, bank_frames=2, prompt_dim=6),
    "compressed_window": lambda: memkit.CompressedWindowMemory(2, 8, 4, sink_frames=1, window_frames=2),
}


@pytest.mark.parametrize("name", sorted(FRAME_MEMORIES))
def test_quantized_frame_memories_keep_the_protocol(name: str) -> None:
    torch.manual_seed(0)  # prompt_bank's projection
    check_memory(
        lambda: memkit.quantized(FRAME_MEMORIES[name]()),
        heads=2,
        head_dim=8,
        tokens_per_frame=4,
        frames_per_segment=2,
        examples=6,
        prompt_dim=6 if name == "prompt_bank" else None,
        other_config=False,
    )


@settings(max_examples=30, deadline=None)
@given(sizes=segment_sizes, seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_quantized_reads_within_half_a_step_of_float(sizes: list[int], seed: int, scale: float) -> None:
    """Every slot the float memory returns, the int8 one returns within max|frame| / 254 (same positions, mask)."""
    exact = memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=3)
    q8 = memkit.quantized(exact)
    s_exact, s_q8, start = exact.init_state(1), q8.init_state(1), 0
    for i, f in enumerate(sizes):
        c = _chunk(list(range(start, start + f)), seed + i)
        c = memkit.Chunk(c.k * scale, c.v * scale, c.hidden, c.frame_positions, T)
        s_exact, s_q8 = exact.write(s_exact, c), q8.write(s_q8, c)
        start += f
    want, got = exact.read(s_exact, _query(start)), q8.read(s_q8, _query(start))
    assert torch.equal(want.mask, got.mask) and torch.equal(want.positions, got.positions)
    for a, b in ((want.k, got.k), (want.v, got.v)):
        frames_a = a.reshape(1, H, -1, T, D)
        bound = frames_a.abs().amax(dim=(-2, -1), keepdim=True) / 254 * (1 + 1e-5) + 1e-12
        assert bool(((frames_a - b.reshape(frames_a.shape)).abs() <= bound).all())


def test_quantized_codes_do_not_drift_across_writes() -> None:
    """A frame that stays in the window keeps its codes exactly however many writes pass."""
    q8 = memkit.quantized(memkit.FIFOMemory(H, D, T, frames=8))
    state = q8.write(q8.init_state(1), _chunk([0], 0))
    first = state.codes.window.k[:, :, -1].clone()
    for i in range(1, 8):
        state = q8.write(state, _chunk([i], i))
    assert torch.equal(state.codes.window.k[:, :, 0], first)


def test_quantized_state_is_a_quarter_and_refuses_what_it_cannot_hold() -> None:
    inner = memkit.SparseKVMemory(4, 16, 8, capacity=16, top_k=4)
    state = inner.init_state(2)
    buffers = [state.ring.k, state.ring.v, state.sink.k, state.sink.v]  # the (b h F t d) frame buffers
    saved = sum(x.numel() * 3 - x[..., 0, 0].numel() * 4 for x in buffers)  # 4 -> 1 byte, plus one scale a frame
    assert memkit.quantized(inner).init_state(2).nbytes == state.nbytes - saved
    assert memkit.quantized(inner).init_state(2).nbytes < 0.31 * state.nbytes
    with pytest.raises(ValueError, match="RecurrentMemory declares no frame buffers"):
        memkit.quantized(memkit.RecurrentMemory(16, 2, 8, slots=4))
    with pytest.raises(TypeError, match="expected a memkit.Memory, got int"):
        memkit.quantized(3)  # type: ignore[arg-type]
    fifo = memkit.FIFOMemory(H, D, T, frames=2)
    # the type checker (on in tests) refuses it first; without it, the memory's own check does
    with pytest.raises(memkit.MemkitError, match="QuantizedState"):
        memkit.quantized(fifo).read(fifo.init_state(1), _query(0))
    old = set_typecheck(False)
    try:
        with pytest.raises(StateError, match="QuantizedMemory.read: expected a QuantizedState, got SinkWindowState"):
            memkit.quantized(fifo).read(fifo.init_state(1), _query(0))
    finally:
        set_typecheck(old)


def test_quantized_builds_from_a_config() -> None:
    from memkit.memories import build_from_spec

    geometry = {"heads": 2, "head_dim": 8, "tokens_per_frame": 4, "dim": 16}
    mem = build_from_spec("quantized", {"memory": {"name": "fifo", "kwargs": {"frames": 2}}}, geometry)
    assert repr(mem) == "quantized(FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=2))"
    with pytest.raises(ValueError, match="kwargs.memory should be the wrapped memory's spec"):
        build_from_spec("quantized", {"memory": "fifo"}, geometry)


# ---------------------------------------------------------------------------- PoseRetrievalMemory
def _pose_chunk(frames: list[int], poses: list[list[float]], seed: int) -> memkit.Chunk:
    c = _chunk(frames, seed)
    return memkit.Chunk(c.k, c.v, c.hidden, c.frame_positions, T, frame_meta=torch.tensor([poses]))


@settings(max_examples=40, deadline=None)
@given(
    poses=st.lists(st.lists(st.integers(-20, 20), min_size=2, max_size=2), min_size=1, max_size=12),
    here=st.lists(st.integers(-20, 20), min_size=2, max_size=2),
    capacity=st.integers(1, 8),
    top_k=st.integers(1, 8),
    metric=st.sampled_from(["l2", "cosine"]),
)
def test_pose_retrieval_equals_a_sorted_list(poses, here, capacity, top_k, metric) -> None:
    """Reference: keep the newest C frames; sort them by (similarity, newness); read the first K."""
    top_k = min(top_k, capacity)
    mem = memkit.PoseRetrievalMemory(H, D, T, meta_dim=2, capacity=capacity, top_k=top_k, metric=metric)
    state, kept = mem.init_state(1), []
    for i, pose in enumerate(poses):
        state = mem.write(state, _pose_chunk([i], [[float(x) for x in pose]], i))
        kept = [*kept, (i, torch.tensor(pose, dtype=torch.float32))][-capacity:]
    want = torch.tensor(here, dtype=torch.float32)

    def similarity(p: torch.Tensor) -> float:
        if metric == "l2":
            return -float((p - want).square().sum())
        return float(torch.nn.functional.cosine_similarity(p[None], want[None]))

    best = sorted(kept, key=lambda e: (similarity(e[1]), e[0]), reverse=True)[:top_k]
    query = memkit.Query(torch.randn(1, H, T, D), torch.tensor([[99]]), T, frame_meta=want[None, None])
    ctx = mem.read(state, query)
    assert ctx.positions[0, 0, ::T][ctx.mask[0, 0, ::T]].tolist() == [i for i, _ in best]


def test_pose_retrieval_protocol() -> None:
    check_memory(
        lambda: memkit.PoseRetrievalMemory(2, 8, 4, meta_dim=3, capacity=4, top_k=2),
        heads=2,
        head_dim=8,
        tokens_per_frame=4,
        frames_per_segment=2,
        examples=12,
        meta_dim=3,
    )


def test_pose_retrieval_without_poses_says_what_the_host_must_pass() -> None:
    mem = memkit.PoseRetrievalMemory(H, D, T, meta_dim=2, capacity=4, top_k=2)
    with pytest.raises(
        memkit.ShapeError, match=r"chunk.frame_meta is None; .* must pass frame_meta \(b f c\) with c = 2"
    ):
        mem.write(mem.init_state(1), _chunk([0], 0))
    with pytest.raises(memkit.ShapeError, match=r"query.frame_meta is None"):
        mem.read(mem.init_state(1), _query(0))
    with pytest.raises(memkit.ShapeError, match=r"dimension c \(metadata channels\) of frame_meta should be 2, got 3"):
        mem.write(mem.init_state(1), _pose_chunk([0], [[0.0, 1.0, 2.0]], 0))
    with pytest.raises(memkit.ShapeError, match=r"chunk.frame_meta"):  # one metadata row per frame
        _pose_chunk([0, 1], [[0.0, 1.0]], 0)


def test_memories_that_do_not_use_frame_meta_ignore_it() -> None:
    """The same stream with and without poses gives the same context for a memory that never looks at them."""
    mem = memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2)
    a, b = mem.init_state(1), mem.init_state(1)
    for i in range(6):
        a = mem.write(a, _chunk([i], i))
        b = mem.write(b, _pose_chunk([i], [[float(i), 0.0]], i))
    q = _query(6)
    with_meta = memkit.Query(q.q, q.frame_positions, T, frame_meta=torch.zeros(1, 1, 2))
    assert torch.equal(mem.read(a, q).k, mem.read(b, with_meta).k)


def test_malt_backbone_hands_the_camera_pose_to_pose_retrieval() -> None:
    """With positions='pose' the backbone passes each frame's pose as frame_meta; the memory stores it and
    reads back the frame taken where the camera now is. Without poses the memory says what is missing."""
    from memkit.models.malt import MALTConfig, MALTNetwork

    spec = {"name": "pose_retrieval", "kwargs": {"meta_dim": 1, "capacity": 8, "top_k": 1}}
    net = MALTNetwork(MALTConfig.preset("tiny", memory=spec, action_dim=4, positions="pose")).eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 2, 3, 8, 8, generator=g)
    states = net.init_states(1)
    for i, place in enumerate((0.1, 0.5, 0.9)):
        acts = torch.rand(1, 2, 4, generator=g)
        acts[..., -1] = place
        states = net.write(clean, states, net.segment_positions(i, 1), actions=acts)
    layer = next(i for i, b in enumerate(net.block_list) if b.attn.has_memory)
    stored = states[layer].meta[0, :, 0]
    f = net.config.token_frames  # every token-frame of a segment is stored with its pose
    assert torch.allclose(stored[states[layer].frames.valid[0]], torch.tensor([0.1, 0.5, 0.9]).repeat_interleave(f))
    c = net.config
    query = memkit.Query(torch.randn(1, c.heads, c.tokens_per_frame * f, c.dim // c.heads), torch.arange(f)[None],
                         c.tokens_per_frame, frame_meta=torch.full((1, f, 1), 0.52))  # fmt: skip
    ctx = net.block_list[layer].attn.memory.read(states[layer], query)
    assert ctx.positions[0, 0, 0].item() == net.pose_positions(torch.full((1, 2, 4), 0.5))[0, 0].item()

    timed = MALTNetwork(MALTConfig.preset("tiny", memory=spec, action_dim=4))
    with pytest.raises(memkit.ShapeError, match="query.frame_meta is None"):  # the clean pass reads first
        timed.write(clean, timed.init_states(1), timed.segment_positions(0, 1), actions=torch.rand(1, 2, 4))


def test_pose_retrieval_reads_through_a_plan_as_it_reads_the_state() -> None:
    """The choice depends on the segment's poses (its layout), not on a step's queries: planned once, equal."""
    from memkit.protocol import plan_read, read_planned

    mem = memkit.PoseRetrievalMemory(H, D, T, meta_dim=2, capacity=6, top_k=2)
    state = mem.init_state(1)
    for i in range(8):
        state = mem.write(state, _pose_chunk([i], [[float(i % 3), float(i)]], i))
    meta = torch.tensor([[[1.0, 4.0]]])
    plan = plan_read(mem, state, memkit.ReadLayout(torch.tensor([[8]]), T, frame_meta=meta))
    for _ in range(3):
        query = memkit.Query(torch.randn(1, H, T, D), torch.tensor([[8]]), T, frame_meta=meta)
        planned, plain = read_planned(mem, plan, query), mem.read(state, query)
        assert all(torch.equal(getattr(planned, f), getattr(plain, f)) for f in ("k", "v", "mask", "positions"))
    with pytest.raises(memkit.ShapeError, match="query.frame_meta is None"):
        plan_read(mem, state, memkit.ReadLayout(torch.tensor([[8]]), T))


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("compressed_window", {}, "CompressedWindowMemory"),
        ("packed_history", {"levels": 2}, "PackedHistoryMemory"),
        ("pose_retrieval", {"meta_dim": 2}, "PoseRetrievalMemory"),
        ("memflow", {"top_k": None}, "MemFlowMemory"),
    ],
)
def test_a_config_can_name_every_new_memory(name: str, kwargs: dict, cls: str) -> None:
    """A checkpoint's config builds them by name (no trust_remote_code): each registers itself in its file."""
    from memkit.memories import build_memory

    built = build_memory(name, heads=2, head_dim=8, tokens_per_frame=4, dim=16, **kwargs)
    assert type(built).__name__ == cls
