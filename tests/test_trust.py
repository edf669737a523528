"""Loading a checkpoint never runs code from it (issue 17, item 1).

A config names only registered memories; ``"module:Class"`` needs ``trust_remote_code=True``
and even then builds only a class that implements the memory protocol.
"""

import json
import sys
from pathlib import Path

import pytest

from memkit.cli import main
from memkit.models.malt import (
    MALTConfig,
    MALTNetwork,
    UntrustedCodeError,
    build_memory,
    register_memory,
)
from memkit.models.malt.registry import _REGISTRY


def _poisoned_checkpoint(tmp_path: Path, memory: dict) -> Path:
    ckpt = tmp_path / "downloaded"
    MALTNetwork(MALTConfig.preset("tiny")).save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["memory"] = memory
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def _shell(marker: Path) -> dict:
    return {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path, marker: Path) -> None:
    ckpt = _poisoned_checkpoint(tmp_path, _shell(marker))
    with pytest.raises(UntrustedCodeError) as info:
        MALTNetwork.from_pretrained(ckpt)
    message = str(info.value)
    assert "'os:system' names code to import" in message
    assert "trust_remote_code=True" in message and "--trust-remote-code" in message
    assert "register_memory" in message and "sparse_kv" in message  # says what is allowed
    assert not marker.exists()


def test_trusting_does_not_call_what_is_not_a_memory_class(tmp_path: Path, marker: Path) -> None:
    ckpt = _poisoned_checkpoint(tmp_path, _shell(marker))
    with pytest.raises(UntrustedCodeError, match=r"'os:system' is a builtin_function_or_method, not a class"):
        MALTNetwork.from_pretrained(ckpt, trust_remote_code=True)
    assert not marker.exists()
    # a class, but not a memory: never instantiated
    popen = {"name": "subprocess:Popen", "kwargs": {"args": ["touch", str(marker)]}}
    with pytest.raises(UntrustedCodeError, match=r"not a class implementing memkit.Memory"):
        MALTNetwork.from_pretrained(_poisoned_checkpoint(tmp_path / "2", popen), trust_remote_code=True)
    assert not marker.exists()


def test_module_is_not_imported_without_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # importing a module runs its top level: refuse before importing anything
    (tmp_path / "evil_memkit_module.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = _poisoned_checkpoint(tmp_path, {"name": "evil_memkit_module:Memory"})
    with pytest.raises(UntrustedCodeError):
        MALTNetwork.from_pretrained(ckpt)
    assert "evil_memkit_module" not in sys.modules


def test_with_memory_and_build_memory_refuse_module_class_by_default() -> None:
    geometry = dict(heads=2, head_dim=16, tokens_per_frame=4, dim=32)
    with pytest.raises(UntrustedCodeError):
        build_memory("memkit.memories:FIFOMemory", **geometry)
    net = MALTNetwork(MALTConfig.preset("tiny"))
    with pytest.raises(UntrustedCodeError):
        net.with_memory("memkit.memories:FIFOMemory")
    with pytest.raises(UntrustedCodeError):
        MALTNetwork(MALTConfig.preset("tiny", memory="memkit.memories:FIFOMemory"))


def test_trusted_module_class_and_registered_names_build(tmp_path: Path) -> None:
    spec = {"name": "memkit.memories:FIFOMemory", "kwargs": {"frames": 2}}
    ckpt = _poisoned_checkpoint(tmp_path, spec)
    net = MALTNetwork.from_pretrained(ckpt, trust_remote_code=True)
    assert type(net.block_list[0].attn.memory).__name__ == "FIFOMemory"
    # the safe way: register the class, and the config names it
    from memkit.memories import FIFOMemory

    register_memory("my_fifo_for_test", FIFOMemory)
    try:
        net = MALTNetwork(MALTConfig.preset("tiny", memory={"name": "my_fifo_for_test", "kwargs": {"frames": 2}}))
        assert isinstance(net.block_list[0].attn.memory, FIFOMemory)
    finally:
        _REGISTRY.pop("my_fifo_for_test")


def test_cli_generate_refuses_a_malicious_checkpoint_in_one_line(
    tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _poisoned_checkpoint(tmp_path, _shell(marker))
    code = main(
        ["generate", "--checkpoint", str(ckpt), "--segments", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("memkit generate: error: memory 'os:system' names code to import")
    assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    code = main(["generate", "--checkpoint", str(ckpt), "--segments", "1", "--out", str(tmp_path / "o"),
                 "--no-progress", "--trust-remote-code"])  # fmt: skip
    assert code == 1 and "not a class implementing memkit.Memory" in capsys.readouterr().err
    assert not marker.exists()


def test_cli_train_refuses_module_class_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--config", "tiny", "--steps", "1", "--out", str(tmp_path / "t"), "--no-progress"]
    code = main([*args, "--memory", "memkit.memories:FIFOMemory", "--memory-kwargs", '{"frames": 2}'])
    assert code == 1 and "--trust-remote-code" in capsys.readouterr().err
    assert not (tmp_path / "t" / "model.safetensors").exists()


def test_a_config_cannot_grant_itself_trust(tmp_path: Path, marker: Path) -> None:
    spec = {"name": "os:system", "kwargs": {"command": f"touch {marker}", "trust_remote_code": True}}
    with pytest.raises(UntrustedCodeError, match="never a config's"):
        MALTNetwork.from_pretrained(_poisoned_checkpoint(tmp_path, spec))
    assert not marker.exists()
