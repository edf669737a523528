"""Saving and resuming streams: round trips, refusals that say what differs, atomic writes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils._pytree as pytree

import memkit
from memkit.io import atomic_write_bytes

H, D, T = 2, 4, 2


def written_state(mem, segments=3, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = mem.init_state(batch)
    for s in range(segments):
        pos = torch.tensor([[2 * s, 2 * s + 1]] * batch)
        k = torch.randn(batch, H, 2 * T, D, generator=gen)
        state = mem.write(state, memkit.Chunk(k, k * 2, torch.randn(batch, 2 * T, 8, generator=gen), pos, T))
    return state


def assert_same(a, b):
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.fixture
def sink():
    return memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=3)


def test_round_trip_of_a_model_state_tuple(tmp_path, sink):
    fifo = memkit.FIFOMemory(H, D, T, frames=2)
    states = (written_state(sink), memkit.NoMemory().init_state(2), written_state(fifo, seed=1))
    mems = [sink, memkit.NoMemory(), fifo]
    memkit.save_states(tmp_path / "s.safetensors", states, mems)
    like = tuple(m.init_state(2) for m in mems)
    assert_same(memkit.load_states(tmp_path / "s.safetensors", like, mems), states)


def test_refuses_another_memory_class_or_config(tmp_path, sink):
    path = tmp_path / "s.safetensors"
    memkit.save_states(path, written_state(sink), sink)
    other = memkit.SinkWindowMemory(H, D, T, sink_frames=2, window_frames=2)
    with pytest.raises(memkit.CheckpointError, match="sink_frames: saved 1, expected 2.*window_frames: saved 3"):
        memkit.load_states(path, other.init_state(2), other)
    fifo = memkit.FIFOMemory(H, D, T, frames=4)
    with pytest.raises(memkit.CheckpointError, match="memory 0 was a SinkWindowMemory, expected a FIFOMemory"):
        memkit.load_states(path, fifo.init_state(2), fifo)


def test_refuses_other_shapes(tmp_path, sink):
    path = tmp_path / "s.safetensors"
    memkit.save_states(path, written_state(sink), sink)
    with pytest.raises(
        memkit.CheckpointError, match=r"\.sink\.k has shape \(2, 2, 1, 2, 4\), expected \(3, 2, 1, 2, 4\)"
    ):
        memkit.load_states(path, sink.init_state(3))
    with pytest.raises(memkit.CheckpointError, match="sink.k has dtype torch.float32, expected torch.float64"):
        memkit.load_states(path, sink.init_state(2, dtype=torch.float64))
    with pytest.raises(memkit.CheckpointError, match="another structure"):
        memkit.load_states(path, (sink.init_state(2), sink.init_state(2)))


def test_refuses_truncated_corrupted_and_foreign_files(tmp_path, sink):
    path = tmp_path / "s.safetensors"
    memkit.save_states(path, written_state(sink), sink)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(memkit.CheckpointError, match="truncated or corrupted"):
        memkit.load_states(tmp_path / "cut", sink.init_state(2))
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a flipped bit in the tensor bytes, header intact
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(memkit.CheckpointError, match="checksum does not match"):
        memkit.load_states(tmp_path / "flip", sink.init_state(2))
    with pytest.raises(memkit.CheckpointError, match="no such file"):
        memkit.load_states(tmp_path / "missing", sink.init_state(2))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign"))
    with pytest.raises(memkit.CheckpointError, match="without a memkit header"):
        memkit.load_states(tmp_path / "foreign", sink.init_state(2))


def test_refuses_another_format_version(tmp_path, sink, monkeypatch):
    import memkit.io as io

    path = tmp_path / "s.safetensors"
    monkeypatch.setattr(io, "FORMAT_VERSION", 99)
    memkit.save_states(path, written_state(sink), sink)
    monkeypatch.setattr(io, "FORMAT_VERSION", 1)
    with pytest.raises(memkit.CheckpointError, match="format version 99, this memkit reads versions 1, 2"):
        memkit.load_states(path, sink.init_state(2))


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, sink, monkeypatch):
    path = tmp_path / "s.safetensors"
    first = written_state(sink, segments=1)
    memkit.save_states(path, first, sink)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        memkit.save_states(path, written_state(sink, segments=5), sink)
    monkeypatch.undo()
    assert_same(memkit.load_states(path, sink.init_state(2), sink), first)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_killed_writer_process_leaves_the_previous_file_intact(tmp_path):
    """A process killed (SIGKILL) while writing never leaves a half-written target."""
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    script = textwrap.dedent(
        f"""
        import os, memkit.io as io
        real = os.fsync
        def slow(fd):
            print("writing", flush=True)
            import time; time.sleep(60)
        os.fsync = slow
        io.atomic_write_bytes({str(path)!r}, b"new" * 1000)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert path.read_bytes() == b"old"


RESUME = """
import sys, torch, memkit
from memkit.models import TinySegmentModel
torch.manual_seed(0)
make = {"sink": lambda i: memkit.SinkWindowMemory(2, 8, 2, sink_frames=1, window_frames=2),
        "fifo": lambda i: memkit.FIFOMemory(2, 8, 2, frames=3)}[sys.argv[1]]
model = TinySegmentModel(4, 4, tokens_per_frame=2, dim=16, heads=2, memory=make).eval()
mode, path, k, n = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
mems = [layer.memory for layer in memkit.memory_layers(model)]
states = model.init_states(1)
start = 0
if mode == "resume":
    states = memkit.load_states(path, states, mems)
    start = k
outs = []
with torch.no_grad():
    for s in range(start, n):
        x = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(s))
        pos = torch.tensor([[2 * s, 2 * s + 1]])
        y, states = model(x, states, pos, write=True)
        outs.append(y)
        if mode == "save" and s == k - 1:
            memkit.save_states(path, states, mems)
            break
torch.save(outs, path + "." + mode + ".pt")
"""


@pytest.mark.parametrize("memory", ["sink", "fifo"])
def test_save_load_in_a_fresh_process_continues_bit_for_bit(tmp_path, memory):
    path = str(tmp_path / "stream.safetensors")
    run = [sys.executable, "-c", RESUME, memory]
    subprocess.run([*run, "full", path, "0", "7"], check=True)
    subprocess.run([*run, "save", path, "3", "7"], check=True)
    subprocess.run([*run, "resume", path, "3", "7"], check=True)
    full = torch.load(path + ".full.pt")
    resumed = torch.load(path + ".save.pt") + torch.load(path + ".resume.pt")
    assert len(full) == len(resumed) == 7
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)


def test_header_is_readable_json(tmp_path, sink):
    from safetensors import safe_open

    memkit.save_states(tmp_path / "s", written_state(sink), sink)
    with safe_open(str(tmp_path / "s"), framework="pt") as f:
        header = json.loads(f.metadata()["memkit"])
    assert header["format_version"] == 2 and header["memories"][0]["class"] == "SinkWindowMemory"
    assert header["tensors"][".sink.k"]["shape"] == [2, 2, 1, 2, 4]
