"""Saved state files name tensors by memkit's own field paths (issue 17, item 4).

The names do not come from torch's private pytree key formatting (which differs between
torch versions), and files written before this change (tests/data/*_v1.safetensors, saved
with format version 1 when names came from ``torch.utils._pytree.keystr``) load unchanged.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree

import memkit
from memkit.io import legacy_names, read_header
from memkit.state import tensor_paths

DATA = Path(__file__).parent / "data"


def _memories() -> list:
    fifo = memkit.FIFOMemory(heads=2, head_dim=4, tokens_per_frame=2, frames=2)
    comp = memkit.compose(
        memkit.SinkWindowMemory(2, 4, 2, sink_frames=1, window_frames=1), memkit.FIFOMemory(2, 4, 2, frames=1)
    )
    rec = memkit.RecurrentMemory(8, 2, 4, slots=2)
    return [fifo, comp, rec]


def _header_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["memkit"])["keys"]


def test_files_saved_with_torch_key_names_still_load() -> None:
    mems = _memories()
    like = tuple(m.init_state(1) for m in mems)
    loaded = memkit.load_states(DATA / "legacy_states_v1.safetensors", like, mems)
    # format version 1 names (before the frame buffers), read through memkit.io.V1_NAMES
    assert [old for _, old in legacy_names(loaded)] == _header_keys(DATA / "legacy_states_v1.safetensors")
    assert [type(s).__name__ for s in loaded] == ["SinkWindowState", "ComposeState", "RecurrentState"]
    assert loaded[2].latent.abs().sum() > 0  # the saved values, not the template's
    fifo, comp, _ = mems
    like_dict = {"blocks.0.attn": fifo.init_state(1), "blocks.1.attn": comp.init_state(1)}
    loaded_dict = memkit.load_states(DATA / "legacy_states_dict_v1.safetensors", like_dict, [fifo, comp])
    assert list(loaded_dict) == ["blocks.0.attn", "blocks.1.attn"]
    assert "['blocks.1.attn'].states[0].win_k" in _header_keys(DATA / "legacy_states_dict_v1.safetensors")


def test_saving_today_writes_the_same_names(tmp_path: Path) -> None:
    mems = _memories()
    states = tuple(m.init_state(1) for m in mems)
    memkit.save_states(tmp_path / "now.safetensors", states, mems)
    names = dict(legacy_names(states))
    today = _header_keys(tmp_path / "now.safetensors")
    assert [names[n] for n in today] == _header_keys(DATA / "legacy_states_v1.safetensors")
    assert "[0].window.k" in today and "[1].states[0].sink.valid" in today
    assert read_header(tmp_path / "now.safetensors")["format_version"] == 2


def _as_version_1(src: Path, dst: Path) -> None:
    """``src`` with its header saying format version 1 (its tensors and names unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["memkit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["format_version"] = 1
    save_file(tensors, str(dst), metadata={"memkit": json.dumps(header)})


def test_a_version_1_file_with_unknown_names_is_refused_clearly(tmp_path: Path) -> None:
    fifo = memkit.FIFOMemory(heads=2, head_dim=4, tokens_per_frame=2, frames=2)
    memkit.save_states(tmp_path / "v2.safetensors", fifo.init_state(1), fifo)
    memkit.load_states(tmp_path / "v2.safetensors", fifo.init_state(1), fifo)  # today's file: fine
    _as_version_1(tmp_path / "v2.safetensors", tmp_path / "v1.safetensors")  # today's names under version 1
    with pytest.raises(memkit.CheckpointError) as err:
        memkit.load_states(tmp_path / "v1.safetensors", fifo.init_state(1), fifo)
    message = str(err.value)
    assert "missing ['.sink_k'" in message and "unexpected ['.sink.k'" in message
    assert "format version 1 names, memkit.io.V1_NAMES" in message


def test_every_frame_buffer_of_a_registered_memory_has_a_version_1_name() -> None:
    """A state class holding FrameBuffers must be in V1_NAMES (or be new since version 2 and say so here)."""
    from memkit.memories.frames import FrameBuffer
    from memkit.memories.registry import build_memory, memory_names
    from memkit.state import _walk

    new_since_v2: set[str] = set()
    for name in memory_names():
        kwargs = {"meta_dim": 2} if name == "pose_retrieval" else {}
        if name == "quantized":
            kwargs = {"memory": {"name": "fifo", "kwargs": {}}}
        memory = build_memory(name, heads=2, head_dim=4, tokens_per_frame=4, dim=8, **kwargs)
        state = memory.init_state(1)
        old = [o for _, o in legacy_names(state)]
        assert len(set(old)) == len(old), name
        for (path, _, holders), o in zip(_walk(state), old, strict=True):
            if isinstance(holders[-1][0], FrameBuffer) and type(holders[-2][0]).__name__ not in new_since_v2:
                assert o != path, f"{name}: {path} has no version-1 name"


def test_names_do_not_depend_on_torch_pytree_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("memkit used torch's pytree key paths for a file")

    monkeypatch.setattr(pytree, "keystr", refuse)
    monkeypatch.setattr(pytree, "tree_flatten_with_path", refuse)
    mems = _memories()
    states = tuple(m.init_state(1) for m in mems)
    memkit.save_states(tmp_path / "s.safetensors", states, mems)
    back = memkit.load_states(tmp_path / "s.safetensors", tuple(m.init_state(1) for m in mems), mems)
    for (p, a), (q, b) in zip(tensor_paths(back), tensor_paths(states), strict=True):
        assert p == q and torch.equal(a, b)


def test_field_paths_follow_pytree_leaf_order() -> None:
    mems = _memories()
    states = {"a": tuple(m.init_state(2) for m in mems), "b": [mems[0].init_state(2)]}
    assert [id(x) for _, x in tensor_paths(states)] == [id(x) for x in pytree.tree_leaves(states)]


# ------------------------------------------------------------------ files saved before the frame buffers
# tests/data/frame_states_v1.safetensors was saved by main at f492a17, before the frame memories'
# states held FrameBuffer sub-states (issue 13 item 3): every memory case of tests/golden.py, seed 0,
# after its four segments. ``python tests/test_state_format.py --record-v1`` wrote it (only meaningful
# on that commit; kept to show how it was made).

FRAME_STATES_V1 = DATA / "frame_states_v1.safetensors"


def _golden_states() -> tuple[dict, list]:
    """Every golden memory case's state after its four segments (seed 0), and the memories, in one order."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import golden

    states, memories = {}, []
    with torch.no_grad():
        for case in (*golden.MEMORIES, *golden.COMPOSED, "memflow"):
            memory = golden._memory(case, 0)
            state = memory.init_state(golden.B)
            for _, chunk in golden._segments(0, golden.META_DIM.get(case)):
                state = memory.write(state, chunk)
            states[case] = state
            memories.append(memory)
    return states, memories


def test_files_saved_before_frame_buffers_load_bit_identically() -> None:
    states, memories = _golden_states()
    like = {case: memory.init_state(2) for case, memory in zip(states, memories, strict=True)}
    loaded = memkit.load_states(FRAME_STATES_V1, like, memories)
    got, want = tensor_paths(loaded), tensor_paths(states)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), path


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--record-v1"]:
        states, memories = _golden_states()
        memkit.save_states(FRAME_STATES_V1, states, memories)
        print(f"wrote {FRAME_STATES_V1} ({FRAME_STATES_V1.stat().st_size} bytes)")
