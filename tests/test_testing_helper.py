"""memkit.testing.check_memory: memkit's memories pass it; broken memories fail it by name."""

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import memkit
from memkit.memories import SinkWindowState
from memkit.testing import PROPERTIES, check_memory

H, D, T, F = 2, 8, 4, 2
SIZES = dict(heads=H, head_dim=D, tokens_per_frame=T, frames_per_segment=F)


@pytest.mark.parametrize(
    "factory",
    [
        memkit.NoMemory,
        lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=3),
        lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=3, window_frames=0),
        lambda: memkit.FIFOMemory(H, D, T, frames=3),
        lambda: memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2, always_frames=1),
        lambda: memkit.RecurrentMemory(dim=H * D, heads=H, slots=3, truncation=2),
        lambda: memkit.compose(memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=1), memkit.NoMemory()),
    ],
    ids=["none", "sink_window", "sink_only", "fifo", "sparse_kv", "recurrent", "compose"],
)
def test_memkit_memories_pass(factory: Any) -> None:
    check_memory(factory, **SIZES, examples=15)


def test_a_prompt_reading_memory_passes() -> None:
    check_memory(lambda: memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=6), **SIZES, prompt_dim=6)


def test_passes_with_prompts_a_wider_batch_and_an_instance() -> None:
    mem = memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=2)
    check_memory(mem, **SIZES, batch_size=3, segments=5, prompt_dim=6, model_dim=24, examples=10)


def test_importing_memkit_does_not_import_hypothesis_or_pytest() -> None:
    code = "import sys, memkit, memkit.testing; assert not {'hypothesis', 'pytest'} & set(sys.modules), sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- deliberately broken memories ---------------------------------------------------------


class InPlaceWrite(memkit.SinkWindowMemory):
    """Advances the old state's counter in place, as a cache with ``update()`` would."""

    def write(self, state: SinkWindowState, chunk: memkit.Chunk) -> SinkWindowState:
        new = super().write(state, chunk)
        state.frames_seen.add_(chunk.num_frames)
        return new


@memkit.memory_state
class GrowingState(memkit.MemoryState):
    k: Tensor  # (b h m d), m grows by n at every write
    v: Tensor
    positions: Tensor  # (b m)


class GrowingMemory:
    """Concatenates every segment: the state grows with the video."""

    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> GrowingState:
        z = torch.zeros(batch_size, H, 0, D, device=device, dtype=dtype)
        return GrowingState(z, z, torch.zeros(batch_size, 0, dtype=torch.long, device=device))

    def read(self, state: GrowingState, query: memkit.Query) -> memkit.Context:
        b, h, m, _ = state.k.shape
        pos = state.positions[:, None].expand(b, h, m)
        return memkit.Context(state.k, state.v, torch.ones_like(pos, dtype=torch.bool), pos)

    def write(self, state: GrowingState, chunk: memkit.Chunk) -> GrowingState:
        pos = memkit.protocol.token_positions(chunk.frame_positions, chunk.tokens_per_frame)
        return GrowingState(
            torch.cat([state.k, chunk.k], 2), torch.cat([state.v, chunk.v], 2), torch.cat([state.positions, pos], 1)
        )


class NoisyRead(memkit.SinkWindowMemory):
    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, k=ctx.k + torch.randn_like(ctx.k))


class BatchMixing(memkit.SinkWindowMemory):
    """Averages keys over the batch: one stream leaks into the others."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, k=ctx.k.mean(0, keepdim=True).expand_as(ctx.k))


class CompactingRead(memkit.SinkWindowMemory):
    """Returns only the filled slots, so the context grows (and torch.compile recompiles)."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        keep = ctx.mask[0, 0]
        return memkit.Context(ctx.k[:, :, keep], ctx.v[:, :, keep], ctx.mask[:, :, keep], ctx.positions[:, :, keep])


class OneHead(memkit.SinkWindowMemory):
    """Returns only the first head's slots: a context the host cannot attend with."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return memkit.Context(ctx.k[:, :1], ctx.v[:, :1], ctx.mask[:, :1], ctx.positions[:, :1])


class NonFiniteSlots(memkit.SinkWindowMemory):
    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, v=ctx.v.masked_fill(ctx.mask[..., None], float("nan")))


@memkit.memory_state
class IntCounterState(memkit.MemoryState):
    count: int


class IntCounter(memkit.NoMemory):
    """Counts segments in a Python int: every new value would recompile a compiled graph."""

    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> Any:
        return IntCounterState(0)

    def read(self, state: Any, query: memkit.Query) -> memkit.Context:
        return memkit.protocol.empty_context(query)

    def write(self, state: Any, chunk: memkit.Chunk) -> Any:
        return IntCounterState(state.count + 1)


@dataclasses.dataclass(frozen=True)
class PlainState:
    k: Tensor


class UnregisteredState(IntCounter):
    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> Any:
        return PlainState(torch.zeros(batch_size, 3))

    def write(self, state: Any, chunk: memkit.Chunk) -> Any:
        return state


class SharedCounter(IntCounter):
    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> Any:
        return IntCounterState(torch.zeros((), dtype=torch.long))  # type: ignore[arg-type]

    def write(self, state: Any, chunk: memkit.Chunk) -> Any:
        return IntCounterState(state.count + 1)


class NoWrite:
    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> Any:
        return ()

    def read(self, state: Any, query: memkit.Query) -> memkit.Context:
        return memkit.protocol.empty_context(query)


def _window(cls: type) -> Any:
    return lambda: cls(H, D, T, sink_frames=1, window_frames=2)


@pytest.mark.parametrize(
    ("factory", "prop", "detail"),
    [
        (NoWrite, "is a Memory", "lacks one of"),
        (IntCounter, "state is a pytree of tensors", "count is a int, not a tensor"),
        (UnregisteredState, "state is a pytree of tensors", "@memkit.memory_state"),
        (SharedCounter, "state tensors have the batch first", "count has shape ()"),
        (_window(InPlaceWrite), "write never mutates the old state", "frames_seen changed"),
        (GrowingMemory, "state shapes never change", ".k: ((2, 2, 0, 8)"),
        (_window(NoisyRead), "reads are pure", "context.k differs"),
        (_window(OneHead), "context is valid", "expected (b h m d) with (b, h, d) = (2, 2, 8)"),
        (_window(NonFiniteSlots), "context is valid", "context.v holds non-finite values in valid slots"),
        (_window(CompactingRead), "context shape never changes", "preallocate"),
        (_window(BatchMixing), "batch independence", "changed stream(s)"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_broken_memories_fail_naming_the_property(factory: Any, prop: str, detail: str) -> None:
    assert prop in PROPERTIES
    with pytest.raises(AssertionError, match=rf"fails property '{prop}'") as info:
        check_memory(factory, **SIZES, examples=10, shrink=False)
    assert detail in str(info.value)


def test_a_shrunk_failure_names_the_same_property() -> None:
    with pytest.raises(AssertionError, match="fails property 'write never mutates the old state'"):
        check_memory(_window(InPlaceWrite), **SIZES, segments=2, examples=3)
