"""Every memory's read and write compile with fullgraph=True in one process, without resets."""

import torch

import memkit
from memkit.typing import typechecked

H, D, T, DIM = 2, 8, 2, 16


def test_each_typechecked_function_has_its_own_code_object():
    """torch.compile caches per code object: a shared wrapper would exhaust its recompile limit."""
    assert memkit.SinkWindowMemory.read.__code__ is not memkit.SparseKVMemory.read.__code__

    def one(x: torch.Tensor) -> torch.Tensor:
        return x

    def two(x: torch.Tensor) -> torch.Tensor:
        return x

    assert typechecked(one).__code__ is not typechecked(two).__code__


def test_reads_and_writes_of_every_memory_compile_in_one_process():
    memories = [
        memkit.NoMemory(),
        memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=2),
        memkit.FIFOMemory(H, D, T, frames=3),
        memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2),
        memkit.PromptBankMemory(H, D, T, bank_frames=2),
        memkit.PromptBankMemory(H, D, T, bank_frames=2, rule="memflow", record_interval=2, score="release"),
        memkit.MemFlowMemory(H, D, T, sink_frames=1, window_frames=2, bank_frames=2, top_k=2),
        memkit.RecurrentMemory(DIM, H, D, slots=4).eval(),
        memkit.compose(memkit.PromptBankMemory(H, D, T, bank_frames=2), memkit.SparseKVMemory(H, D, T, capacity=4)),
    ]
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, H, 2 * T, D, generator=gen)
    chunk = memkit.Chunk(k, k, torch.randn(1, 2 * T, DIM, generator=gen), torch.tensor([[0, 1]]), T)
    query = memkit.Query(torch.randn(1, H, 2 * T, D, generator=gen), torch.tensor([[2, 3]]), T)
    with torch.no_grad():
        for mem in memories:  # 14 compiled entry points: more than dynamo's default cache limit of 8
            state = mem.init_state(1)
            written = torch.compile(mem.write, fullgraph=True, backend="eager")(state, chunk)
            context = torch.compile(mem.read, fullgraph=True, backend="eager")(written, query)
            eager = mem.read(mem.write(state, chunk), query)
            assert torch.equal(context.k, eager.k) and torch.equal(context.mask, eager.mask)


def test_frame_buffer_memories_compile_fullgraph():
    """The memories made of FrameBuffer sub-states (issue 13), quantized ones included, trace whole."""
    memories = [
        memkit.CompressedWindowMemory(H, D, T, sink_frames=1, window_frames=2),
        memkit.PackedHistoryMemory(H, D, T, frames_per_level=2, levels=2),
        memkit.PoseRetrievalMemory(H, D, T, meta_dim=3, capacity=3, top_k=2),
        memkit.quantized(memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=2)),
        memkit.quantized(memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2, always_frames=1)),
    ]
    gen = torch.Generator().manual_seed(0)
    k, meta = torch.randn(1, H, 2 * T, D, generator=gen), torch.randn(1, 2, 3, generator=gen)
    hidden = torch.randn(1, 2 * T, DIM, generator=gen)
    chunk = memkit.Chunk(k, k, hidden, torch.tensor([[0, 1]]), T, frame_meta=meta)
    query = memkit.Query(torch.randn(1, H, 2 * T, D, generator=gen), torch.tensor([[2, 3]]), T, frame_meta=meta)
    with torch.no_grad():
        for mem in memories:
            state = mem.init_state(1)
            written = torch.compile(mem.write, fullgraph=True, backend="eager")(state, chunk)
            context = torch.compile(mem.read, fullgraph=True, backend="eager")(written, query)
            eager = mem.read(mem.write(state, chunk), query)
            assert torch.equal(context.k, eager.k) and torch.equal(context.mask, eager.mask), mem
