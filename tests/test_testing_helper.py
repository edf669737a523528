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
    ("factory", "other"),
    [
        (memkit.NoMemory, None),
        (lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=3), None),
        (lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=3, window_frames=0), None),
        (lambda: memkit.FIFOMemory(H, D, T, frames=3), lambda: memkit.FIFOMemory(H, D, T, frames=2)),
        (lambda: memkit.SparseKVMemory(H, D, T, capacity=4, top_k=2, always_frames=1), None),
        (lambda: memkit.RecurrentMemory(dim=H * D, heads=H, slots=3, truncation=2), None),
        (
            lambda: memkit.compose(memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=1), memkit.NoMemory()),
            lambda: memkit.compose(memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=2), memkit.NoMemory()),
        ),
    ],
    ids=["none", "sink_window", "sink_only", "fifo", "sparse_kv", "recurrent", "compose"],
)
def test_memkit_memories_pass(factory: Any, other: Any) -> None:
    check_memory(factory, **SIZES, examples=15, other_config=other)


def test_a_prompt_reading_memory_passes() -> None:
    check_memory(lambda: memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=6), **SIZES, prompt_dim=6)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=6, rule="memflow", record_interval=2),
        lambda: memkit.PromptBankMemory(H, D, T, bank_frames=2, prompt_dim=6, score="release"),
        lambda: memkit.MemFlowMemory(H, D, T, sink_frames=1, window_frames=2, bank_frames=2, top_k=2, prompt_dim=6),
        lambda: memkit.MemFlowMemory(H, D, T, sink_frames=1, window_frames=1, bank_frames=1, top_k=None, prompt_dim=6),
    ],
    ids=["bank_memflow_rule", "bank_release_score", "memflow_sma", "memflow_nam"],
)
def test_memflow_variants_pass(factory: Any) -> None:
    check_memory(factory, **SIZES, examples=10, prompt_dim=6)


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


class MutatingRead(memkit.SinkWindowMemory):
    """Counts reads in the state it is given."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        state.frames_seen.add_(1)
        return super().read(state, query)


class CastingWrite(memkit.SinkWindowMemory):
    """Returns its counter as float64: the same bytes, another dtype (a compiled graph would recompile)."""

    def write(self, state: SinkWindowState, chunk: memkit.Chunk) -> SinkWindowState:
        fixed = state.replace(frames_seen=state.frames_seen.long()) if state.frames_seen.is_floating_point() else state
        new = super().write(fixed, chunk)
        return new.replace(frames_seen=new.frames_seen.double())


class ScratchRead(memkit.SinkWindowMemory):
    """Reads into one buffer it reuses, so a context handed out earlier changes under its holder."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        if getattr(self, "scratch", None) is None or self.scratch.shape != ctx.k.shape:
            self.scratch = torch.empty_like(ctx.k)
        self.scratch.copy_(ctx.k)
        return dataclasses.replace(ctx, k=self.scratch)


class HiddenCounter(memkit.SinkWindowMemory):
    """Keeps a write count outside the state, so reading an old state later gives something else."""

    writes = 0

    def write(self, state: SinkWindowState, chunk: memkit.Chunk) -> SinkWindowState:
        self.writes += 1
        return super().write(state, chunk)

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, k=ctx.k + self.writes)


class HugeKeys(memkit.SinkWindowMemory):
    """Finite keys (1e38) that overflow attention's logits: every output NaN."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, k=torch.where(ctx.mask[..., None], ctx.k.sign() * 1e38, ctx.k))


class NaNInUnusedSlots(memkit.SinkWindowMemory):
    """Garbage where the mask is False: allowed, since attention must ignore unused slots."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        unused = ~ctx.mask[..., None]
        return dataclasses.replace(ctx, k=ctx.k.masked_fill(unused, float("nan")), v=ctx.v.masked_fill(unused, 3e38))


class SmallLeak(memkit.SinkWindowMemory):
    """Mixes 1e-5 of the batch mean into every stream's keys."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, k=ctx.k + 1e-5 * ctx.k.mean(0, keepdim=True))


class BatchSizeRead(memkit.SinkWindowMemory):
    """Scales keys by the batch size: each stream is independent, but reading one alone differs."""

    def read(self, state: SinkWindowState, query: memkit.Query) -> memkit.Context:
        ctx = super().read(state, query)
        return dataclasses.replace(ctx, k=ctx.k * query.batch_size)


class FirstStreamCounter(memkit.SinkWindowMemory):
    """Decides what goes to the sink by stream 0's frame count: right only while streams move together."""

    def write(self, state: SinkWindowState, chunk: memkit.Chunk) -> SinkWindowState:
        shared = state.frames_seen[:1].expand_as(state.frames_seen)
        new = super().write(state.replace(frames_seen=shared), chunk)
        return new.replace(frames_seen=state.frames_seen + chunk.num_frames)


class SharedStorage(memkit.SinkWindowMemory):
    """Stores values in the keys' tensor: two fields, one storage (safetensors refuses to save it)."""

    def write(self, state: SinkWindowState, chunk: memkit.Chunk) -> SinkWindowState:
        new = super().write(state, memkit.Chunk(chunk.k, chunk.k, chunk.hidden, chunk.frame_positions, T))
        return new.replace(window=new.window.replace(v=new.window.k), sink=new.sink.replace(v=new.sink.k))


@memkit.memory_state
class LastState(memkit.MemoryState):
    k: Tensor  # (b h frames*t d)
    v: Tensor
    positions: Tensor  # (b frames*t)
    valid: Tensor  # (b frames*t)


class KeepLast:
    """The last ``frames`` frames, concatenated and cut; ``checked=False`` reads any state it is given."""

    def __init__(self, heads: int, head_dim: int, tokens_per_frame: int, *, frames: int = 2, checked: bool = True):
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.frames, self.checked = frames, checked

    def init_state(self, batch_size: int, *, device: Any = None, dtype: Any = None) -> LastState:
        m = self.frames * self.tokens_per_frame
        z = torch.zeros(batch_size, self.heads, m, self.head_dim, device=device, dtype=dtype)
        flat = torch.zeros(batch_size, m, dtype=torch.long, device=device)
        return LastState(z, z.clone(), flat, flat.bool())

    def _check(self, state: LastState) -> None:
        if self.checked and state.k.shape[2] != self.frames * self.tokens_per_frame:
            raise memkit.StateError(f"KeepLast: state holds {state.k.shape[2]} tokens, expected {self.frames}")

    def read(self, state: LastState, query: memkit.Query) -> memkit.Context:
        self._check(state)
        b, h, m, _ = state.k.shape
        return memkit.Context(
            state.k, state.v, state.valid[:, None].expand(b, h, m), state.positions[:, None].expand(b, h, m)
        )

    def write(self, state: LastState, chunk: memkit.Chunk) -> LastState:
        self._check(state)
        m = state.k.shape[2]
        pos = memkit.protocol.token_positions(chunk.frame_positions, chunk.tokens_per_frame)
        return LastState(
            torch.cat([state.k, chunk.k.to(state.k.dtype)], 2)[:, :, -m:],
            torch.cat([state.v, chunk.v.to(state.v.dtype)], 2)[:, :, -m:],
            torch.cat([state.positions, pos], 1)[:, -m:],
            torch.cat([state.valid, torch.ones_like(pos, dtype=torch.bool)], 1)[:, -m:],
        )


def _window(cls: type) -> Any:
    return lambda: cls(H, D, T, sink_frames=1, window_frames=2)


#: one deliberately broken memory per property; each must fail by that property's name
BROKEN = [
    (NoWrite, "is a Memory", "lacks one of"),
    (IntCounter, "state is a pytree of tensors", "count is a int, not a tensor"),
    (UnregisteredState, "state is a pytree of tensors", "@memkit.memory_state"),
    (SharedCounter, "state tensors have the batch first", "count has shape ()"),
    (GrowingMemory, "state bytes never change", "0 bytes became"),
    (_window(CastingWrite), "state shapes never change", "torch.int64, device(type='cpu')) -> ((2,), torch.float64"),
    (_window(MutatingRead), "read never mutates the state", "frames_seen changed"),
    (_window(InPlaceWrite), "write never mutates the old state", "frames_seen changed"),
    (_window(NoisyRead), "reads are pure", "context.k differs"),
    (_window(OneHead), "context is valid", "expected (b h m d) with (b, h, d) = (2, 2, 8)"),
    (_window(NonFiniteSlots), "context is valid", "context.v holds non-finite values in valid slots"),
    (_window(CompactingRead), "context shape never changes", "preallocate"),
    (_window(HugeKeys), "attention over the context", "non-finite output"),
    (_window(ScratchRead), "causality", "changed in place"),
    (_window(HiddenCounter), "causality", "reading the state of segment"),
    (_window(BatchMixing), "batch independence", "changed stream(s)"),
    (_window(SmallLeak), "batch independence", "changed stream(s)"),
    (_window(BatchSizeRead), "batch selection", "alone differs"),
    (_window(FirstStreamCounter), "streams advance independently", "stacked into one batch"),
    (_window(SharedStorage), "save/load round trip", "share memory"),
    (lambda: KeepLast(H, D, T, checked=False), "refuses another configuration's state", "frames=3 instead of 2"),
]


@pytest.mark.parametrize(("factory", "prop", "detail"), BROKEN, ids=lambda x: x if isinstance(x, str) else "")
def test_broken_memories_fail_naming_the_property(factory: Any, prop: str, detail: str) -> None:
    assert prop in PROPERTIES
    with pytest.raises(AssertionError, match=rf"fails property '{prop}'") as info:
        check_memory(factory, **SIZES, examples=10, shrink=False)
    assert detail in str(info.value)


def test_every_property_has_a_broken_memory() -> None:
    """Removing any check makes its broken memory pass (or fail under another name): a test fails."""
    assert {prop for _, prop, _ in BROKEN} == set(PROPERTIES)


def test_a_checked_memory_passes_and_its_refusal_counts() -> None:
    check_memory(lambda: KeepLast(H, D, T), **SIZES, examples=5)
    check_memory(lambda: KeepLast(H, D, T, checked=False), **SIZES, examples=5, other_config=False)


def test_garbage_in_unused_slots_is_harmless() -> None:
    """memkit's attention ignores unused slots, whatever they hold (NaN keys, 3e38 values)."""
    check_memory(_window(NaNInUnusedSlots), **SIZES, examples=5)


def _leaky_sdpa(q: Tensor, k: Tensor, v: Tensor, contexts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """sdpa over the concatenation with a boolean mask only: 0 x NaN in an unused slot is NaN."""
    keys = torch.cat([k, *(c[0] for c in contexts)], 2)
    values = torch.cat([v, *(c[1] for c in contexts)], 2)
    mask = torch.cat([torch.ones(k.shape[:3], dtype=torch.bool), *(c[2] for c in contexts)], 2)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, :, None])


def test_an_attention_that_lets_unused_slots_leak_is_caught() -> None:
    memkit.attention.register_backend(memkit.attention.Backend("leaky-test", _leaky_sdpa, lambda q: None))
    try:
        with pytest.raises(AssertionError, match="fails property 'attention over the context'.*unused slots"):
            check_memory(_window(memkit.SinkWindowMemory), **SIZES, examples=5, backend="leaky-test")
    finally:
        memkit.attention.backends._REGISTRY.pop("leaky-test")


def test_a_shrunk_failure_names_the_same_property() -> None:
    with pytest.raises(AssertionError, match="fails property 'write never mutates the old state'"):
        check_memory(_window(InPlaceWrite), **SIZES, segments=2, examples=3)
