"""Per-segment read plans (issue 15 item 2): reading through a plan equals reading the state, bit for bit.

A plan is made once per segment from the state and the segment's layout; every denoising
step of the segment then reads through it with its own queries. For every memory (and for
one that has no ``plan`` of its own), at the memory and at the attention layer, the planned
read must equal the plain one exactly, whatever the queries of the step.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit
from memkit.protocol import plan_read, read_planned

H, D, T, E = 2, 8, 3, 16


class _Plain:
    """A memory without ``plan``: the generic plan reads it in full at every step."""

    def __init__(self) -> None:
        self.inner = memkit.FIFOMemory(H, D, T, frames=3)

    def init_state(self, batch_size: int, **kwargs: Any) -> Any:
        return self.inner.init_state(batch_size, **kwargs)

    def read(self, state: Any, query: memkit.Query) -> memkit.Context:
        return self.inner.read(state, query)

    def write(self, state: Any, chunk: memkit.Chunk) -> Any:
        return self.inner.write(state, chunk)


MEMORIES: dict[str, Callable[[], Any]] = {
    "none": lambda: memkit.NoMemory(),
    "fifo": lambda: memkit.FIFOMemory(H, D, T, frames=3),
    "sink_window": lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=2),
    "sparse_kv": lambda: memkit.SparseKVMemory(H, D, T, capacity=5, top_k=2),
    "sparse_kv_sink": lambda: memkit.SparseKVMemory(H, D, T, capacity=4, top_k=3, always_frames=2),
    "prompt_bank": lambda: memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=E),
    "prompt_bank_cutoff": lambda: memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=E, min_relevance=0.3),
    "recurrent": lambda: memkit.RecurrentMemory(H * D, H, D, slots=4),
    "composed": lambda: memkit.compose(
        memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=E),
        memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2, always_frames=1),
        memkit.NoMemory(),
    ),
    "plain": _Plain,
    "compressed_window": lambda: memkit.CompressedWindowMemory(H, D, T, sink_frames=1, window_frames=1),
    "packed_history": lambda: memkit.PackedHistoryMemory(H, D, T, frames_per_level=1, levels=1),
    "quantized": lambda: memkit.quantized(memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2, always_frames=1)),
}
if hasattr(memkit, "MemFlowMemory"):
    MEMORIES["memflow"] = lambda: memkit.MemFlowMemory(H, D, T, sink_frames=1, window_frames=2, prompt_dim=E)
    MEMORIES["memflow_nam"] = lambda: memkit.MemFlowMemory(H, D, T, window_frames=1, top_k=None, prompt_dim=E)


def _filled(mem: Any, writes: int, batch: int, g: torch.Generator) -> Any:
    state = mem.init_state(batch)
    for s in range(writes):
        f = 1 + s % 2
        k = torch.randn(batch, H, f * T, D, generator=g)
        prompt = torch.randn(batch, 4, E, generator=g)
        pos = (2 * s + torch.arange(f)).expand(batch, f).contiguous()
        state = mem.write(
            state, memkit.Chunk(k, k * 0.5, torch.randn(batch, f * T, H * D, generator=g), pos, T, prompt)
        )
    return state


@pytest.mark.parametrize("name", sorted(MEMORIES))
@settings(max_examples=12, deadline=None)
@given(writes=st.integers(0, 6), batch=st.integers(1, 2), seed=st.integers(0, 2**16), prompted=st.booleans())
def test_reading_through_a_plan_equals_reading_the_state(
    name: str, writes: int, batch: int, seed: int, prompted: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    mem = MEMORIES[name]()
    state = _filled(mem, writes, batch, g)
    f = 2
    pos = (20 + torch.arange(f)).expand(batch, f).contiguous()
    prompt = torch.randn(batch, 5, E, generator=g) if prompted else None
    mask = (torch.rand(batch, 5, generator=g) < 0.7) if prompted else None
    layout = memkit.ReadLayout(pos, T, prompt, mask)
    plan = plan_read(mem, state, layout)
    for _step in range(3):  # each denoising step brings new queries
        query = memkit.Query(torch.randn(batch, H, f * T, D, generator=g), pos, T, prompt, mask)
        planned, plain = read_planned(mem, plan, query), mem.read(state, query)
        for field in ("k", "v", "mask", "positions"):
            assert torch.equal(getattr(planned, field), getattr(plain, field)), field


@pytest.mark.parametrize("name", sorted(MEMORIES))
@settings(max_examples=8, deadline=None)
@given(writes=st.integers(0, 5), seed=st.integers(0, 2**16), max_distance=st.sampled_from([None, 0, 3]))
def test_a_layer_reading_through_its_plan_gives_the_same_output(
    name: str, writes: int, seed: int, max_distance: int | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    attn = memkit.MemoryAttention(H * D, H, MEMORIES[name](), max_distance=max_distance).eval()
    state = _filled(attn.memory, writes, 1, g)
    pos = torch.tensor([[20, 21]])
    prompt = torch.randn(1, 5, E, generator=g)
    plan = attn.plan(state, pos, T, prompt)
    with torch.no_grad():
        for _step in range(2):
            x = torch.randn(1, 2 * T, H * D, generator=g)
            assert torch.equal(attn(x, plan, pos, prompt), attn(x, state, pos, prompt))
        y_plan, s_plan = attn.forward_and_write(x, plan, pos, prompt)
        y, s = attn.forward_and_write(x, state, pos, prompt)
    assert torch.equal(y_plan, y)
    planned_leaves, leaves = torch.utils._pytree.tree_leaves(s_plan), torch.utils._pytree.tree_leaves(s)
    assert len(planned_leaves) == len(leaves)
    assert all(torch.equal(a, b) for a, b in zip(planned_leaves, leaves, strict=True))


def test_a_plan_refuses_a_layout_of_another_batch() -> None:
    mem = memkit.SinkWindowMemory(H, D, T)
    with pytest.raises(
        memkit.ShapeError, match=r"dimension b \(batch\) of layout.frame_positions should be 1 \(the state's\), got 2"
    ):
        plan_read(mem, mem.init_state(1), memkit.ReadLayout(torch.tensor([[0], [0]]), T))
