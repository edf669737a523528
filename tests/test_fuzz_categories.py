"""Fuzz by category: for every input, the outcome memkit promises, asserted.

Each category of the outside audit (issue 12) has its own test. An input is either
**refused**, with the specific ``memkit`` error class named here (accepting it fails the
test, and so does any other exception), or **accepted**, and then its result is checked
against what a correct implementation gives. Categories:

- poisoned slots: NaN / Inf / 3e38 in masked-out context slots, and in a memory's unused slots;
- other-configuration states: a state made by the same memory class with other settings;
- bad batch sizes for ``init_state``;
- empty segments (0 frames);
- dtype mismatches;
- malformed files for ``load_states`` / ``save_states``;
- bad ``set_segment`` positions.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import memkit
from memkit.attention import available_backends
from memkit.errors import AttachError, CheckpointError, MemkitError, ShapeError, StateError

H, D, T, DIM = 2, 8, 2, 16  # heads, head dim, tokens per frame, model dim

MEMORIES: dict[str, Callable[..., Any]] = {
    "sink_window": lambda **kw: memkit.SinkWindowMemory(
        kw.get("heads", H), kw.get("head_dim", D), kw.get("tpf", T), sink_frames=kw.get("a", 1),
        window_frames=kw.get("b", 2),
    ),
    "fifo": lambda **kw: memkit.FIFOMemory(kw.get("heads", H), kw.get("head_dim", D), kw.get("tpf", T),
                                           frames=kw.get("b", 3)),
    "sparse_kv": lambda **kw: memkit.SparseKVMemory(
        kw.get("heads", H), kw.get("head_dim", D), kw.get("tpf", T), capacity=kw.get("b", 4), top_k=2,
        always_frames=kw.get("a", 1),
    ),
    "prompt_bank": lambda **kw: memkit.PromptBankMemory(
        kw.get("heads", H), kw.get("head_dim", D), kw.get("tpf", T), bank_frames=kw.get("b", 2)
    ),
    "recurrent": lambda **kw: memkit.RecurrentMemory(
        DIM, kw.get("heads", H), head_dim=kw.get("head_dim", D), slots=kw.get("b", 3)
    ).eval(),
    "compose": lambda **kw: memkit.compose(
        memkit.FIFOMemory(kw.get("heads", H), kw.get("head_dim", D), kw.get("tpf", T), frames=kw.get("b", 2)),
        memkit.SparseKVMemory(kw.get("heads", H), kw.get("head_dim", D), kw.get("tpf", T), capacity=3, top_k=1),
    ),
}  # fmt: skip
# memories whose state depends on tokens per frame (the recurrent latent does not)
FRAME_MEMORIES = [name for name in MEMORIES if name != "recurrent"]


def expect(refused: type[MemkitError] | None, fn: Callable[[], Any]) -> Any:
    """Run ``fn``: it must raise exactly ``refused`` (a memkit error class), or succeed when ``refused`` is None."""
    if refused is None:
        return fn()
    try:
        fn()
    except refused:
        return None
    except Exception as err:  # any other outcome is the failure being tested for
        raise AssertionError(f"expected {refused.__name__}, got {type(err).__name__}: {err}") from err
    raise AssertionError(f"expected {refused.__name__}, but the input was accepted")


def query(b: int = 1, frames: int = 2, tpf: int = T, heads: int = H, start: int = 10, prompt: bool = False):
    g = torch.Generator().manual_seed(100 + b + frames + start)
    p = torch.randn(b, 3, heads * D, generator=g) if prompt else None
    pos = torch.arange(start, start + frames).expand(b, -1)
    return memkit.Query(torch.randn(b, heads, frames * tpf, D, generator=g), pos, tpf, prompt=p)


def chunk(b: int = 1, frames: int = 2, tpf: int = T, start: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = frames * tpf
    k, v = torch.randn(b, H, n, D, generator=g), torch.randn(b, H, n, D, generator=g)
    pos = torch.arange(start, start + frames).expand(b, -1)
    return memkit.Chunk(k, v, torch.randn(b, n, DIM, generator=g), pos, tpf)


def same_context(a: memkit.Context, b: memkit.Context) -> None:
    for name in ("k", "v", "mask", "positions"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------------- poisoned slots

POISONS = [float("nan"), float("inf"), float("-inf"), 3e38, -3e38]


@pytest.mark.parametrize("backend", available_backends())
@settings(max_examples=40)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(1, 9),
    valid_p=st.sampled_from([0.0, 0.3, 0.7]),
    poison=st.sampled_from(POISONS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_poisoned_masked_slots_contribute_nothing(backend, seed, m, valid_p, poison, dtype):
    """Accepted: whatever a masked-out slot holds, the output is bit-identical to that slot holding zeros."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, H, 3, D, generator=g).to(dtype) for _ in range(3))
    ck, cv = torch.randn(2, H, m, D, generator=g), torch.randn(2, H, m, D, generator=g)
    mask = torch.rand(2, H, m, generator=g) < valid_p
    pos = torch.zeros(2, H, m, dtype=torch.long)
    clean = memkit.Context(ck.masked_fill(~mask[..., None], 0), cv.masked_fill(~mask[..., None], 0), mask, pos)
    bad = memkit.Context(ck.masked_fill(~mask[..., None], poison), cv.masked_fill(~mask[..., None], poison), mask, pos)
    want = memkit.attend(q, k, v, clean, backend=backend)
    got = memkit.attend(q, k, v, bad, backend=backend)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    if not mask.any():  # nothing valid: attention over the segment alone (another kernel path: rounding)
        eps = 4 * torch.finfo(dtype).eps  # a few units in the last place
        torch.testing.assert_close(got, memkit.attend(q, k, v, backend=backend), atol=eps, rtol=eps)


def _poison_unused(state: Any, value: float) -> Any:
    """The state with every unused slot's keys and values set to ``value`` (frame memories)."""

    from memkit.memories.frames import FrameBuffer

    def fill(buffer: FrameBuffer) -> FrameBuffer:
        empty = ~buffer.valid[:, None, :, None, None]
        return buffer.replace(k=buffer.k.masked_fill(empty, value), v=buffer.v.masked_fill(empty, value))

    if isinstance(state, memkit.memories.SinkWindowState):
        return state.replace(sink=fill(state.sink), window=fill(state.window))
    if isinstance(state, memkit.memories.SparseKVState):
        desc = state.desc.masked_fill(~state.ring.valid[:, None, :, None], value)
        return state.replace(ring=fill(state.ring), desc=desc, sink=fill(state.sink))
    if isinstance(state, memkit.memories.PromptBankState):
        return state.replace(pool=fill(state.pool))
    if isinstance(state, memkit.memories.ComposeState):
        return memkit.memories.ComposeState(tuple(_poison_unused(s, value) for s in state.states))
    raise AssertionError(type(state))


@pytest.mark.parametrize("name", FRAME_MEMORIES)
@settings(max_examples=10)
@given(poison=st.sampled_from(POISONS), frames=st.integers(1, 3))
def test_memory_attention_ignores_poisoned_unused_slots(name, poison, frames):
    """Accepted: MemoryAttention over a memory whose empty slots hold NaN/Inf equals it over zeroed slots."""
    torch.manual_seed(0)
    attn = memkit.MemoryAttention(DIM, H, MEMORIES[name]()).eval()
    state = attn.init_state(2)
    x = torch.randn(2, frames * T, DIM)
    pos = torch.arange(frames).expand(2, -1)
    _, state = attn.forward_and_write(x, state, pos)  # a few slots used, the rest empty
    later = torch.randn(2, 2 * T, DIM)
    prompt = torch.randn(2, 3, H * D) if name == "prompt_bank" else None
    want = attn(later, state, pos[:, :1] + torch.tensor([[10, 11]]), prompt)
    got = attn(later, _poison_unused(state, poison), pos[:, :1] + torch.tensor([[10, 11]]), prompt)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


# -------------------------------------------------------------------------- other-configuration states

# settings that change a state's shapes, per memory; (a, b) are each memory's two frame counts
OTHER_CONFIGS: dict[str, list[dict[str, int]]] = {
    "sink_window": [{"b": 5}, {"a": 2}, {"heads": 4}, {"head_dim": 4}, {"tpf": 1}],
    "fifo": [{"b": 5}, {"heads": 1}, {"tpf": 4}],
    "sparse_kv": [{"b": 6}, {"a": 0}, {"heads": 4}, {"tpf": 1}],
    "prompt_bank": [{"b": 3}, {"heads": 1}, {"head_dim": 4}, {"tpf": 4}],
    "recurrent": [{"b": 5}, {"heads": 4}, {"head_dim": 4}],
    "compose": [{"b": 3}, {"heads": 1}, {"tpf": 1}],
}


@pytest.mark.parametrize("name", MEMORIES)
@settings(max_examples=12)
@given(data=st.data())
def test_a_state_of_another_configuration_is_refused(name, data):
    """Refused (StateError): another configuration's state, in read and in write. Accepted: a twin's state."""
    mem = MEMORIES[name]()
    other = MEMORIES[name](**data.draw(st.sampled_from(OTHER_CONFIGS[name])))
    batch = data.draw(st.integers(1, 2))
    foreign = other.init_state(batch)
    q, c = query(batch, prompt=name == "prompt_bank"), chunk(batch)
    expect(StateError, lambda: mem.read(foreign, q))
    expect(StateError, lambda: mem.write(foreign, c))
    # a memory of the same configuration made the state: accepted, and the same result
    torch.manual_seed(0)
    twin = MEMORIES[name]()
    if isinstance(twin, nn.Module):
        twin.load_state_dict(mem.state_dict())
    own = expect(None, lambda: mem.write(mem.init_state(batch), c))
    same_context(expect(None, lambda: mem.read(twin.write(twin.init_state(batch), c), q)), mem.read(own, q))


@pytest.mark.parametrize("name", ["sink_window", "sparse_kv", "prompt_bank"])
def test_a_state_with_mixed_batches_dtypes_or_counters_is_refused(name):
    mem = MEMORIES[name]()
    state = mem.write(mem.init_state(2), chunk(2))
    from memkit.state import map_tensor_paths, tensor_paths

    tensors = dict(tensor_paths(state))  # sub-states' tensors too (a FrameBuffer's)
    counter = next(p for p, x in tensors.items() if x.dtype == torch.long)
    buffer = next(p for p, x in tensors.items() if x.is_floating_point())

    def changed(path, fn):
        return map_tensor_paths(lambda p, x: fn(x) if p == path else x, state)

    q = query(2, prompt=name == "prompt_bank")
    for bad in (
        changed(counter, lambda x: x.int()),  # counters are int64
        changed(buffer, lambda x: x.half()),  # one floating dtype
        changed(buffer, lambda x: x[:1]),  # one batch
    ):
        expect(StateError, lambda bad=bad: mem.read(bad, q))
        expect(StateError, lambda bad=bad: mem.write(bad, chunk(2)))
    # the whole state in another floating dtype is fine
    expect(None, lambda: mem.read(mem.init_state(2, dtype=torch.float64), query(2, prompt=name == "prompt_bank")))


# --------------------------------------------------------------------------------- bad batch sizes

BAD_BATCHES = [-1, 0, 2.5, True, False, "2", None, 1.0, torch.tensor([2])]
GOOD_BATCHES = [1, 3, np.int64(2), torch.tensor(2)]


@pytest.mark.parametrize("name", [*MEMORIES, "none"])
@pytest.mark.parametrize("batch", BAD_BATCHES, ids=repr)
def test_bad_batch_sizes_are_refused(name, batch):
    mem = memkit.NoMemory() if name == "none" else MEMORIES[name]()
    expect(ShapeError, lambda: mem.init_state(batch))
    expect(ShapeError, lambda: memkit.MemoryAttention(DIM, H, mem).init_state(batch))


@pytest.mark.parametrize("name", [*MEMORIES, "none"])
@pytest.mark.parametrize("batch", GOOD_BATCHES, ids=repr)
def test_good_batch_sizes_are_accepted(name, batch):
    mem = memkit.NoMemory() if name == "none" else MEMORIES[name]()
    state = expect(None, lambda: mem.init_state(batch))
    assert all(x.shape[0] == int(batch) for x in torch.utils._pytree.tree_leaves(state))


@pytest.mark.parametrize("kwargs", [{"dtype": torch.int64}, {"dtype": "float32"}, {"device": "gpu0"}])
def test_bad_init_state_dtype_or_device_is_refused(kwargs):
    for make in MEMORIES.values():
        expect(ShapeError, lambda make=make: make().init_state(1, **kwargs))


# ---------------------------------------------------------------------------------- empty segments


@pytest.mark.parametrize("name", [*MEMORIES, "none"])
def test_empty_segments_are_refused_at_the_door(name):
    mem = memkit.NoMemory() if name == "none" else MEMORIES[name]()
    expect(ShapeError, lambda: memkit.Query(torch.randn(1, H, 0, D), torch.zeros(1, 0, dtype=torch.long), T))
    expect(
        ShapeError,
        lambda: memkit.Chunk(torch.randn(1, H, 0, D), torch.randn(1, H, 0, D), torch.randn(1, 0, DIM),
                             torch.zeros(1, 0, dtype=torch.long), T),
    )  # fmt: skip
    attn = memkit.MemoryAttention(DIM, H, mem)
    state = attn.init_state(1)
    expect(ShapeError, lambda: attn(torch.randn(1, 0, DIM), state, torch.zeros(1, 0, dtype=torch.long)))
    # one frame is the smallest segment: accepted, read and written
    y, state = expect(None, lambda: attn.forward_and_write(torch.randn(1, T, DIM), state, torch.tensor([[0]])))
    assert y.shape == (1, T, DIM) and torch.isfinite(y).all()


# -------------------------------------------------------------------------------- dtype mismatches


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_memory_attention_refuses_input_of_another_dtype(x_dtype):
    attn = memkit.MemoryAttention(DIM, H, MEMORIES["fifo"]())
    state, pos = attn.init_state(1), torch.tensor([[0, 1]])
    expect(ShapeError, lambda: attn(torch.randn(1, 2 * T, DIM, dtype=x_dtype), state, pos))
    expect(ShapeError, lambda: attn.forward_and_write(torch.randn(1, 2 * T, DIM, dtype=x_dtype), state, pos))
    # the layer in that dtype accepts it, and under autocast a float32 layer takes low-precision input
    attn64 = memkit.MemoryAttention(DIM, H, MEMORIES["fifo"]()).to(x_dtype)
    y = expect(None, lambda: attn64(torch.randn(1, 2 * T, DIM, dtype=x_dtype), attn64.init_state(1), pos))
    assert y.dtype == x_dtype
    if x_dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expect(None, lambda: attn(torch.randn(1, 2 * T, DIM, dtype=x_dtype), state, pos))


# --------------------------------------------------------------------------------- malformed files


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Any, Any]:
    mem = MEMORIES["sink_window"]()
    state = mem.write(mem.init_state(1), chunk(1))
    path = tmp_path / "stream.safetensors"
    memkit.save_states(path, state, mem)
    return path, state, mem


_KEEP = object()


def _rewrite(path: Path, header: Any = _KEEP, rename: tuple[str, str] | None = None) -> None:
    """Rewrite a saved file with another memkit header (any JSON value) and/or one tensor renamed."""
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    if header is not _KEEP:
        metadata["memkit"] = json.dumps(header)
    if rename is not None:
        tensors[rename[1]] = tensors.pop(rename[0])
    save_file(tensors, path, metadata=metadata)


def _header(path: Path) -> dict[str, Any]:
    return dict(memkit.io.read_header(path))


HEADER_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("a list", lambda h: [h]),
    ("a string", lambda h: "memkit"),
    ("null", lambda h: None),
    ("a number", lambda h: 3),
    ("keys not a list", lambda h: {**h, "keys": "x"}),
    ("keys repeated", lambda h: {**h, "keys": [h["keys"][0]] * len(h["keys"])}),
    ("tensors missing", lambda h: {k: v for k, v in h.items() if k != "tensors"}),
    ("a shape not a list", lambda h: {**h, "tensors": {k: {"shape": "?", "dtype": "x"} for k in h["tensors"]}}),
    ("memories not objects", lambda h: {**h, "memories": [1]}),
    ("no checksum", lambda h: {**h, "sha256": None}),
    ("another format", lambda h: {**h, "format": "other"}),
    ("another version", lambda h: {**h, "format_version": 99}),
]


@pytest.mark.parametrize("edit", HEADER_EDITS, ids=[e[0] for e in HEADER_EDITS])
def test_a_malformed_header_is_refused(saved, edit):
    path, _, mem = saved
    _rewrite(path, header=edit[1](_header(path)))
    expect(CheckpointError, lambda: memkit.load_states(path, mem.init_state(1), mem))
    expect(CheckpointError, lambda: memkit.io.read_header(path))


def test_a_renamed_tensor_is_refused_naming_it(saved):
    path, _, mem = saved
    _rewrite(path, rename=("t00003", "t99999"))
    with pytest.raises(CheckpointError, match=r"missing \['t00003'\], unexpected \['t99999'\]"):
        memkit.load_states(path, mem.init_state(1), mem)


@pytest.mark.parametrize("bad", [None, 3, b"stream.safetensors", ["a"]], ids=repr)
def test_a_path_that_is_not_a_path_is_refused(saved, bad):
    _, state, mem = saved
    expect(CheckpointError, lambda: memkit.load_states(bad, mem.init_state(1), mem))
    expect(CheckpointError, lambda: memkit.save_states(bad, state, mem))


def test_directories_are_refused_for_loading_and_saving(saved, tmp_path):
    _, state, mem = saved
    with pytest.raises(CheckpointError, match="is a directory"):
        memkit.load_states(tmp_path, mem.init_state(1), mem)
    with pytest.raises(CheckpointError, match="is a directory"):
        memkit.save_states(tmp_path, state, mem)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing left behind


@pytest.mark.parametrize("memories", [5, "sink", [MEMORIES["fifo"](), 3], {"a": 1}], ids=repr)
def test_memories_of_the_wrong_type_are_refused(saved, memories):
    path, state, _ = saved
    expect(CheckpointError, lambda: memkit.save_states(path.with_name("x.safetensors"), state, memories))
    expect(CheckpointError, lambda: memkit.load_states(path, state, memories))


def test_a_valid_file_is_accepted_and_round_trips(saved):
    path, state, mem = saved
    loaded = expect(None, lambda: memkit.load_states(path, mem.init_state(1), mem))
    for a, b in zip(torch.utils._pytree.tree_leaves(loaded), torch.utils._pytree.tree_leaves(state), strict=True):
        assert torch.equal(a, b)


# -------------------------------------------------------------------- bad set_segment positions


class _Attn(nn.Module):  # the smallest host: one attention layer, no memkit inside
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(DIM, 3 * DIM), H

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def _adapter(attn, attend, x):
    q, k, v = attn.qkv(x).unflatten(-1, (3, attn.heads, -1)).permute(2, 0, 3, 1, 4)
    return attend(q, k, v).transpose(1, 2).flatten(2)


BAD_POSITIONS = [["a", "b"], "01", None, [0.5, 1.5], [0.0, 1.0], [True, False], [[0, 1], [2]], [], [[]],
                 [2**70, 1], torch.tensor([0.0, 1.0]), torch.zeros(1, 2, 2, dtype=torch.long), 3]  # fmt: skip
GOOD_POSITIONS = [[0, 1], (0, 1), np.array([0, 1]), torch.tensor([0, 1]), torch.tensor([[0, 1]]), range(2)]


@pytest.mark.parametrize("positions", BAD_POSITIONS, ids=repr)
def test_bad_segment_positions_are_refused(positions):
    with memkit.attach(_Attn(), MEMORIES["fifo"](head_dim=DIM // H), layers="", adapter=_adapter) as session:
        expect(ShapeError, lambda: session.set_segment(positions))


@pytest.mark.parametrize("positions", GOOD_POSITIONS, ids=repr)
def test_good_segment_positions_are_accepted(positions):
    torch.manual_seed(0)
    host, x = _Attn(), torch.randn(1, 2 * T, DIM)
    with memkit.attach(host, MEMORIES["fifo"](head_dim=DIM // H), layers="", adapter=_adapter) as session:
        expect(None, lambda: session.set_segment(positions))
        got = host(x)
        session.set_segment(torch.tensor([[0, 1]]))
        assert torch.equal(got, host(x))


# ------------------------------------------------------------------------- sessions and states


@pytest.mark.parametrize("other", OTHER_CONFIGS["sink_window"], ids=repr)
def test_set_states_refuses_another_configurations_states(other):
    host = _Attn()
    mem = memkit.SinkWindowMemory(H, DIM // H, T, sink_frames=1, window_frames=2)
    foreign = memkit.SinkWindowMemory(
        other.get("heads", H), other.get("head_dim", DIM // H), other.get("tpf", T),
        sink_frames=other.get("a", 1), window_frames=other.get("b", 2),
    )  # fmt: skip
    with memkit.attach(host, mem, layers="", adapter=_adapter) as session:
        expect(StateError, lambda: session.set_states({"": foreign.init_state(1)}))
        expect(StateError, lambda: session.set_states({"": memkit.NoMemory().init_state(1)}))
        expect(AttachError, lambda: session.set_states({"nope": mem.init_state(1)}))
        expect(None, lambda: session.set_states({"": mem.init_state(1)}))
        expect(None, lambda: session.set_states({"": None}))  # not created yet: made at first use
