"""A MemorySession's states: the one per-layer container (issue 13, item 5).

``tests/data/session_states_named*.safetensors`` were saved by ``MemorySession.save_states``
as it was before the session moved onto :class:`memkit.state.LayerStates` (commit 89fe1e1),
when a session's file named its tensors by layer name (``['blocks.0'].window.k``). They must
keep loading bit-identically. Do not re-record them: ``python tests/test_session_states.py
--record`` exists to show how they were made, with the code of that commit.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import memkit
from memkit.errors import AttachError, CheckpointError, StateError
from memkit.integrations import multihead_attention_adapter
from memkit.io import read_header
from memkit.layers import load_memory_states, save_memory_states
from memkit.state import LayerStates, tensor_paths

DATA = Path(__file__).parent / "data"
NAMED = DATA / "session_states_named.safetensors"  # both layers written
NAMED_PARTIAL = DATA / "session_states_named_partial.safetensors"  # blocks.1 had no state yet (None)
EMBED, HEADS, TOKENS = 16, 2, 4


class Host(nn.Module):
    """Two self-attention layers, ``blocks.0`` and ``blocks.1``; no memkit inside."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.MultiheadAttention(EMBED, HEADS, batch_first=True) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x, x, x, need_weights=False)[0]
        return x


def memories() -> dict[str, memkit.Memory]:
    head_dim = EMBED // HEADS
    return {
        "blocks.0": memkit.FIFOMemory(HEADS, head_dim, TOKENS, frames=2),
        "blocks.1": memkit.SinkWindowMemory(HEADS, head_dim, TOKENS, sink_frames=1, window_frames=2),
    }


def attach(host: nn.Module, **kw):
    return memkit.attach(host, memories(), adapter=multihead_attention_adapter, **kw)


def stream(segments: int = 3, batch: int = 2):
    """A seeded host and a session that committed ``segments`` segments of 2 frames."""
    torch.manual_seed(0)
    host = Host().eval()
    session = attach(host)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(segments):
            session.set_segment([2 * i, 2 * i + 1])
            session.commit(torch.randn(batch, 2 * TOKENS, EMBED, generator=g))
    return host, session


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state file under their names in the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = json.loads(f.metadata()["memkit"])["keys"]
        return {name: f.get_tensor(f"t{i:05d}") for i, name in enumerate(keys)}


def test_session_files_that_name_layers_load_bit_identically() -> None:
    for path, present in ((NAMED, {"blocks.0", "blocks.1"}), (NAMED_PARTIAL, {"blocks.0"})):
        saved = file_tensors(path)
        session = attach(Host().eval())
        session.load_states(path)
        loaded = {}
        for name in ("blocks.0", "blocks.1"):
            state = session.states[name]
            assert (state is not None) == (name in present), (path.name, name)
            if state is not None:
                loaded.update({f"[{name!r}]{p}": x for p, x in tensor_paths(state)})
        assert list(loaded) == list(saved)
        assert all(torch.equal(loaded[n], saved[n]) and loaded[n].dtype == saved[n].dtype for n in saved)
        assert saved["['blocks.0'].window.valid"].any()  # real stream contents, not an empty state
        session.detach()


def memory_model() -> nn.Module:
    """The same memories on MemoryAttention layers under the same names: a model's container."""
    model = nn.Module()
    model.blocks = nn.ModuleList(memkit.MemoryAttention(EMBED, HEADS, m) for m in memories().values())
    return model


def same(a: LayerStates, b: LayerStates) -> bool:
    """Equal names, ``None`` in the same places, every tensor equal (dtype and values)."""
    pa, pb = tensor_paths(a), tensor_paths(b)
    return (
        a.names == b.names
        and [s is None for s in a] == [s is None for s in b]
        and [p for p, _ in pa] == [p for p, _ in pb]
        and all(x.dtype == y.dtype and torch.equal(x, y) for (_, x), (_, y) in zip(pa, pb, strict=True))
    )


def test_the_session_keeps_a_layer_states_made_at_first_use_or_at_attach() -> None:
    host = Host().eval()
    with attach(host) as session:
        assert isinstance(session.states, LayerStates) and session.states.names == ("blocks.0", "blocks.1")
        assert list(session.states) == [None, None] and session.nbytes == 0  # batch size not known yet
        session.set_segment([0, 1])
        with torch.no_grad():
            host(torch.randn(3, 2 * TOKENS, EMBED))  # a read makes every layer's state, from its queries
        assert [s.batch_size for s in session.states] == [3, 3] and session.nbytes > 0
        session.reset()
        assert list(session.states) == [None, None]
    with attach(Host().eval(), batch_size=2, dtype=torch.float64) as eager:
        assert [s.window.k.dtype for s in eager.states] == [torch.float64] * 2
        assert [s.batch_size for s in eager.states] == [2, 2]
        moved = eager.to(torch.float32).states
        assert isinstance(moved, LayerStates) and [s.window.k.dtype for s in moved] == [torch.float32] * 2


@settings(max_examples=12, deadline=None)
@given(
    segments=st.integers(0, 3),
    batch=st.integers(1, 3),
    present=st.lists(st.booleans(), min_size=2, max_size=2),
    reverse=st.booleans(),
)
def test_session_files_are_per_layer_files_and_set_states_takes_either_container(
    tmp_path_factory: pytest.TempPathFactory, segments: int, batch: int, present: list[bool], reverse: bool
) -> None:
    tmp = tmp_path_factory.mktemp("session")
    host, session = stream(segments, batch)
    if segments == 0:  # nothing ran: make the states as a read would
        session.set_states({name: m.init_state(batch) for name, m in session.memories.items()})
    kept = session.states.with_states(s if keep else None for s, keep in zip(session.states, present, strict=True))
    session.set_states(kept)
    session.save_states(tmp / "session.safetensors")
    model = memory_model()
    save_memory_states(tmp / "model.safetensors", model, kept)
    # one writer: the session's file and the model's name the same tensors, with the same shapes
    assert read_header(tmp / "session.safetensors")["tensors"] == read_header(tmp / "model.safetensors")["tensors"]

    fresh = attach(host)  # a second stream on the same host
    fresh.load_states(tmp / "session.safetensors")
    assert same(fresh.states, kept)
    if all(present):  # a session's file is a model's file: the model loads it
        assert same(load_memory_states(tmp / "session.safetensors", model), kept)

    # set_states with a LayerStates and with a {name: state} dict (any order) give equal sessions
    by_dict = attach(host)
    by_dict.set_states(dict(reversed(kept.items())) if reverse else dict(kept))
    fresh.set_states(kept)
    assert same(by_dict.states, fresh.states) and all(a is b for a, b in zip(by_dict.states, fresh.states, strict=True))
    outs = []
    x = torch.randn(batch, 2 * TOKENS, EMBED, generator=torch.Generator().manual_seed(7))
    for s in (by_dict, fresh):
        with s.active(), torch.no_grad():
            s.set_segment([2 * segments, 2 * segments + 1])
            outs.append(s.commit(x))
    assert torch.equal(outs[0], outs[1]) and same(by_dict.states, fresh.states)
    for s in (session, fresh, by_dict):
        s.detach()


def test_set_states_refuses_bad_input_clearly() -> None:
    _, session = stream(segments=1, batch=1)
    states = session.states
    with pytest.raises(AttachError, match=r"set_states: 'blocks.9' is not an attached layer \(layers: \('blocks.0'"):
        session.set_states(LayerStates(states, ["blocks.0", "blocks.9"]))
    with pytest.raises(AttachError, match=r"set_states: 'nope' is not an attached layer"):
        session.set_states({**dict(states), "nope": None})
    with pytest.raises(AttachError, match=r"set_states: no state for layer 'blocks.1'"):
        session.set_states({"blocks.0": states[0]})
    for wrong in (tuple(states), list(states), states[0], None):
        with pytest.raises(AttachError, match=r"expected a LayerStates or a \{layer name: state\} dict, got"):
            session.set_states(wrong)
    recurrent = memkit.RecurrentMemory(EMBED, HEADS, slots=2).init_state(1)
    with pytest.raises(StateError, match=r"set_states: layer 'blocks.1': the state's structure differs"):
        session.set_states({"blocks.0": states[0], "blocks.1": recurrent})
    longer = memkit.FIFOMemory(HEADS, EMBED // HEADS, TOKENS, frames=3).init_state(1)
    with pytest.raises(StateError, match=r"layer 'blocks.0': state.window.k: dimension W \(window frames\) should"):
        session.set_states({"blocks.0": longer, "blocks.1": states[1]})
    assert session.states is states  # every refusal left the states as they were
    session.set_states({**states, "blocks.1": None})  # one layer changed: a dict of the rest
    assert session.states[0] is states[0] and session.states["blocks.1"] is None
    session.detach()


def test_load_states_refuses_bad_files_clearly(tmp_path: Path) -> None:
    _, session = stream(segments=1, batch=1)
    session.save_states(tmp_path / "stream.safetensors")
    before = session.states
    other = memkit.attach(
        Host().eval(),
        {"blocks.0": memkit.FIFOMemory(HEADS, EMBED // HEADS, TOKENS, frames=3)},
        adapter=multihead_attention_adapter,
    )
    with pytest.raises(CheckpointError, match="saved with 2 memories, expected 1"):
        other.load_states(tmp_path / "stream.safetensors")
    twin = memories()
    twin["blocks.1"] = memkit.SinkWindowMemory(HEADS, EMBED // HEADS, TOKENS, sink_frames=2, window_frames=2)
    twin_session = memkit.attach(Host().eval(), twin, adapter=multihead_attention_adapter)
    with pytest.raises(CheckpointError, match=r"memory 1 \(SinkWindowMemory\) has another configuration: sink_frames"):
        twin_session.load_states(tmp_path / "stream.safetensors")
    renamed = memkit.attach(
        nn.ModuleDict({"a": Host(), "b": Host()}),
        {"a.blocks.0": memories()["blocks.0"], "b.blocks.1": memories()["blocks.1"]},
        adapter=multihead_attention_adapter,
    )
    with pytest.raises(
        CheckpointError, match=r"holds tensors of layers other than 'a.blocks.0', 'b.blocks.1': \['blocks.0'\]"
    ):
        renamed.load_states(NAMED)  # a file naming layers blocks.0 and blocks.1
    data = (tmp_path / "stream.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        session.load_states(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        session.load_states(tmp_path / "missing.safetensors")
    assert session.states is before  # a refused file changed nothing
    for s in (session, other, twin_session, renamed):
        s.detach()


def test_an_eager_session_fills_layers_a_file_holds_nothing_of() -> None:
    with attach(Host().eval(), batch_size=1) as eager:
        eager.load_states(NAMED_PARTIAL)  # blocks.1 had no state yet
        assert eager.states[0].batch_size == 2 and eager.states[0].window.valid.any()
        assert eager.states[1].batch_size == 1 and not eager.states[1].window.valid.any()  # fresh, as reset makes


def record() -> None:  # pragma: no cover - run by hand, once, with the code of commit 89fe1e1
    _, session = stream()
    session.save_states(NAMED)
    states = session.states
    session.set_states({"blocks.0": states["blocks.0"], "blocks.1": None})
    session.save_states(NAMED_PARTIAL)


if __name__ == "__main__" and "--record" in sys.argv:
    record()
