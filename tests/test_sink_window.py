"""SinkWindowMemory and FIFOMemory keep exactly what they promise, for any write sequence."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memkit

H, D, T = 2, 4, 3


def chunk_for(frames: list[int], batch: int = 1, seed: int = 0) -> memkit.Chunk:
    """A chunk whose key values encode their frame position (so contents can be checked)."""
    f = len(frames)
    pos = torch.tensor([frames] * batch)
    k = pos.repeat_interleave(T, dim=1)[:, None, :, None].expand(batch, H, f * T, D).float()
    gen = torch.Generator().manual_seed(seed)
    return memkit.Chunk(k, k + 0.5, torch.randn(batch, f * T, 8, generator=gen), pos, T)


@given(
    sink=st.integers(0, 3),
    window=st.integers(0, 5),
    segments=st.lists(st.integers(1, 4), min_size=1, max_size=8),
)
def test_keeps_sink_plus_last_window_in_order(sink, window, segments):
    mem = memkit.SinkWindowMemory(H, D, T, sink_frames=sink, window_frames=window)
    state = mem.init_state(1)
    first = mem.init_state(1)
    written: list[int] = []
    for f in segments:
        frames = list(range(len(written), len(written) + f))
        state = mem.write(state, chunk_for(frames))
        written += frames
    expected_sink = written[:sink]
    rest = written[sink:]
    expected_window = rest[-window:] if window else []

    assert state.sink.pos[0, state.sink.valid[0]].tolist() == expected_sink
    assert state.window.pos[0, state.window.valid[0]].tolist() == expected_window
    # contents follow their positions: keys encode the frame index
    ctx = mem.read(state, memkit.Query(torch.randn(1, H, T, D), torch.tensor([[99]]), T))
    valid = ctx.mask[0, 0]
    assert ctx.positions[0, 0, valid].tolist() == [p for p in expected_sink + expected_window for _ in range(T)]
    assert torch.equal(ctx.k[0, 0, valid, 0], ctx.positions[0, 0, valid].float())
    # shapes fixed by init_state
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(first), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert state.nbytes == first.nbytes


def test_fifo_is_window_without_sink():
    mem = memkit.FIFOMemory(H, D, T, frames=2)
    state = mem.init_state(1)
    for s in range(4):
        state = mem.write(state, chunk_for([2 * s, 2 * s + 1]))
    assert state.window.pos.tolist() == [[6, 7]] and state.sink.k.shape[2] == 0


def test_wrong_frame_size_is_refused():
    mem = memkit.SinkWindowMemory(H, D, T + 1)
    with pytest.raises(memkit.ShapeError, match="tokens_per_frame should be 4.*got 3"):
        mem.write(mem.init_state(1), chunk_for([0]))


def test_wrong_batch_is_refused():
    mem = memkit.SinkWindowMemory(H, D, T)
    with pytest.raises(memkit.ShapeError, match=r"dimension b \(batch\) of chunk.k should be 1.*got 2"):
        mem.write(mem.init_state(1), chunk_for([0], batch=2))
    with pytest.raises(memkit.ShapeError, match=r"dimension h \(heads\) of query.q should be 2, got 5"):
        mem.read(mem.init_state(1), memkit.Query(torch.randn(1, 5, T, D), torch.tensor([[0]]), T))


def test_state_of_another_memory_is_refused():
    with pytest.raises(memkit.MemkitError, match="expected a SinkWindowState, got NoState"):
        memkit.SinkWindowMemory(H, D, T).read(memkit.NoMemory().init_state(1), memkit.Query(
            torch.randn(1, H, T, D), torch.tensor([[0]]), T))  # fmt: skip


def test_compiles_fullgraph():
    mem = memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=3)
    state = mem.init_state(2)
    chunk = chunk_for([0, 1], batch=2)
    write = torch.compile(mem.write, fullgraph=True, backend="eager")
    read = torch.compile(mem.read, fullgraph=True, backend="eager")
    compiled = write(state, chunk)
    eager = mem.write(state, chunk)
    for a, b in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager), strict=True):
        assert torch.equal(a, b)
    query = memkit.Query(torch.randn(2, H, 2 * T, D), torch.tensor([[2, 3]] * 2), T)
    assert torch.equal(read(compiled, query).k, mem.read(eager, query).k)
