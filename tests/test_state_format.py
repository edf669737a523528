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
from memkit.io import read_header
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
    assert [p for p, _ in tensor_paths(loaded)] == _header_keys(DATA / "legacy_states_v1.safetensors")
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
    assert _header_keys(tmp_path / "now.safetensors") == _header_keys(DATA / "legacy_states_v1.safetensors")
    assert read_header(tmp_path / "now.safetensors")["format_version"] == 1


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
