"""Conventions a PyTorch user expects (issue 17, item 7).

States follow their layer's dtype; the non-finite check follows the checking switch;
``seed=None`` is fresh randomness and a generator draws on its own device; silent
adaptations warn; printed layers show their memory; files are written atomically and a
training checkpoint cannot mix steps.
"""

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import memkit
from memkit.integrations import multihead_attention_adapter
from memkit.models.malt import EulerSampler, MALTConfig, MALTNetwork, generate
from memkit.typing import set_typecheck, typecheck_enabled

MEMORIES = {
    "fifo": lambda: memkit.FIFOMemory(4, 8, 2, frames=2),
    "sink_window": lambda: memkit.SinkWindowMemory(4, 8, 2, sink_frames=1, window_frames=2),
    "sparse_kv": lambda: memkit.SparseKVMemory(4, 8, 2, capacity=4, top_k=2),
    "recurrent": lambda: memkit.RecurrentMemory(32, 4, 8, slots=2),
    "prompt_bank": lambda: memkit.PromptBankMemory(4, 8, 2, bank_frames=2),
    "memflow": lambda: memkit.MemFlowMemory(4, 8, 2, sink_frames=1, window_frames=2, bank_frames=2, top_k=2),
}


def _floats(state: object) -> set[torch.dtype]:
    return {
        x.dtype for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor) and x.is_floating_point()
    }


# ------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_a_bf16_layer_gets_a_bf16_state(name: str) -> None:
    attn = memkit.MemoryAttention(32, 4, memory=MEMORIES[name]()).to(torch.bfloat16)
    state = attn.init_state(2)
    assert _floats(state) == {torch.bfloat16}
    assert _floats(attn.init_state(2, dtype=torch.float32)) == {torch.float32}  # an explicit dtype wins
    # and the bf16 layer runs on its bf16 state
    x, pos = torch.randn(2, 4, 32, dtype=torch.bfloat16), torch.tensor([[0, 1], [0, 1]])
    y, new = attn.forward_and_write(x, state, pos)
    assert y.dtype == torch.bfloat16 and _floats(new) == {torch.bfloat16}


def test_a_bf16_model_and_attach_make_bf16_states() -> None:
    net = MALTNetwork(MALTConfig.preset("tiny", memory={"name": "fifo", "kwargs": {"frames": 2}})).to(torch.bfloat16)
    assert set().union(*(_floats(s) for s in net.init_states(1))) == {torch.bfloat16}

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = Host().to(torch.bfloat16)
    memory = memkit.FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=2)
    with memkit.attach(model, memory, layers="attn", adapter=multihead_attention_adapter, batch_size=1) as session:
        assert _floats(session.states["attn"]) == {torch.bfloat16}


# ------------------------------------------------------------------------------- checks
def _nan_chunk() -> memkit.Chunk:
    k = torch.randn(1, 4, 8, 16)
    k[0, 0, 0, 0] = float("nan")
    return memkit.Chunk(k, k, torch.randn(1, 8, 64), frame_positions=torch.tensor([[0]]), tokens_per_frame=8)


def test_the_non_finite_check_follows_the_one_checking_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert typecheck_enabled()  # tests run with checking on (tests/conftest.py)
    with pytest.raises(memkit.NonFiniteError, match="chunk.k: 1 non-finite value"):
        _nan_chunk()
    old = set_typecheck(False)
    try:
        # off: no value is read back, so no device sync per write
        calls: list[int] = []
        real = torch.isfinite
        monkeypatch.setattr(torch, "isfinite", lambda x: calls.append(1) or real(x))
        _nan_chunk()
        assert calls == []
    finally:
        set_typecheck(old)


# ------------------------------------------------------------------------------- randomness
def _net() -> MALTNetwork:
    torch.manual_seed(0)
    return MALTNetwork(MALTConfig.preset("tiny", memory={"name": "fifo", "kwargs": {"frames": 2}})).eval()


def test_seed_none_is_fresh_randomness_and_a_seed_repeats() -> None:
    net, sampler = _net(), EulerSampler(steps=1)
    a, b = (generate(net, 1, sampler=sampler, seed=None).video for _ in range(2))
    assert not torch.equal(a, b)
    c, d = (generate(net, 1, sampler=sampler, seed=3).video for _ in range(2))
    assert torch.equal(c, d)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(generate(net, 1, sampler=sampler, generator=g).video, c)  # seed=3 is that generator


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_generator_draws_on_the_gpu() -> None:
    net, sampler = _net().cuda(), EulerSampler(steps=1)
    g1, g2 = (torch.Generator(device="cuda").manual_seed(5) for _ in range(2))
    a = generate(net, 1, sampler=sampler, generator=g1).video
    b = generate(net, 1, sampler=sampler, generator=g2).video
    assert a.is_cuda and torch.equal(a, b)


# ------------------------------------------------------------------------------- warnings, printing
def test_with_memory_warns_about_freshly_initialised_memory_parameters() -> None:
    net = _net()
    with pytest.warns(UserWarning, match=r"with_memory\('recurrent'\): \d+ parameter tensor\(s\) of the new memory"):
        other = net.with_memory({"name": "recurrent", "kwargs": {"slots": 2}})
    assert other.config.memory.name == "recurrent"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.with_memory("sink_window")  # no parameters: nothing to say


def test_with_memory_keeps_the_dtype() -> None:
    net = _net().to(torch.bfloat16)
    assert net.with_memory("sink_window").spatial.dtype == torch.bfloat16


def test_printed_layers_show_their_memory() -> None:
    fifo = memkit.MemoryAttention(32, 4, memory=memkit.FIFOMemory(4, 8, 2, frames=2))
    assert "memory=FIFOMemory(heads=4, head_dim=8, tokens_per_frame=2, frames=2)" in repr(fifo)
    recurrent = memkit.MemoryAttention(32, 4, memory=memkit.RecurrentMemory(32, 4, 8, slots=2))
    assert "(memory): RecurrentMemory(" in repr(recurrent)  # a memory with parameters is a submodule
    assert any(isinstance(m, memkit.RecurrentMemory) for m in recurrent.modules())
    assert "memory='fifo'" in repr(_net())


# ------------------------------------------------------------------------------- atomic writes
def test_one_atomic_helper_writes_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import memkit.atomic

    written: list[str] = []
    real = memkit.atomic.atomic_path

    def spy(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        written.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(memkit.atomic, "atomic_path", spy)
    mem = memkit.FIFOMemory(2, 4, 1, frames=2)
    memkit.save_states(tmp_path / "s.safetensors", mem.init_state(1), mem)
    _net().save_pretrained(tmp_path / "ckpt")
    assert written == ["s.safetensors", "model.safetensors", "config.json"]
    for name in ("s.safetensors", "ckpt/model.safetensors", "ckpt/config.json"):
        # the permissions of any new file (0o666 less the umask), not the temporary file's private 0o600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~memkit.atomic._umask(), name
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    from memkit.io import atomic_path

    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def _train(out: Path, steps: int) -> None:
    from memkit.train import TrainConfig, train

    config = TrainConfig.preset("tiny").replace(batch_size=1, checkpoint_every=1)
    train(config, out, steps=steps, device="cpu", progress=False)


def _step(out: Path) -> int:
    return int(json.loads((out / "train" / "state.json").read_text())["step"])


def test_a_crash_during_a_training_checkpoint_cannot_mix_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import memkit.train.checkpoints as trainer
    from memkit.train.checkpoints import recover_training

    out = tmp_path / "run"
    _train(out, 1)
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    assert set(before) == {"weights.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}

    # 1. a crash while the new files are being written: train/ is untouched
    real_save = trainer._atomic_save

    def crash_on_optimizer(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        if path.name == "optimizer.safetensors":
            raise KeyboardInterrupt("killed")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(trainer, "_atomic_save", crash_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        _train(out, 2)
    monkeypatch.setattr(trainer, "_atomic_save", real_save)
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before
    assert not list(out.glob(".train-*"))

    # 2. a crash between the two renames: no train/, the old one aside; recovery puts a whole one back
    real_replace = os.replace

    def crash_on_second_rename(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).name == "train" and Path(src).name.endswith(".tmp"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(trainer.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _train(out, 2)
    monkeypatch.setattr(trainer.os, "replace", real_replace)
    assert not (out / "train").exists()
    assert recover_training(out)
    assert _step(out) == 1  # the interrupted save removed its own new folder: the old one is back, whole
    # killed outright (no clean-up) between the renames: the newest complete folder wins
    shutil.copytree(out / "train", out / ".train-killed.tmp")
    state = json.loads((out / ".train-killed.tmp" / "state.json").read_text())
    (out / ".train-killed.tmp" / "state.json").write_text(json.dumps({**state, "step": 2}))
    os.replace(out / "train", out / ".train-killed.old")
    assert recover_training(out) and _step(out) == 2
    assert not list(out.glob(".train-*"))
    names = {p.name for p in (out / "train").iterdir()}
    assert names == {"weights.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}

    # and training resumes from it
    _train(out, 3)
    assert _step(out) == 3
