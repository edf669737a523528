"""Checks at the doors, trust inside (issue 13 item 6): one check where data enters, one switch for all."""

import importlib

import pytest
import torch

import memkit
import memkit.layers.memory_attention as layer_mod
import memkit.protocol as protocol_mod
from memkit.models.malt import MALTConfig, MALTNetwork
from memkit.typing import at_door, checks_enabled, outside, set_checks, trusted

attend_mod = importlib.import_module("memkit.attention.attend")  # the module (the package exports the function)


def _net() -> MALTNetwork:
    torch.manual_seed(0)
    return MALTNetwork(MALTConfig.preset("tiny", memory={"name": "fifo", "kwargs": {"frames": 2}})).eval()


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str, calls: list[str]) -> None:
    real = getattr(module, name)

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_inner_calls_skip_the_checks_the_door_already_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _spy(monkeypatch, protocol_mod, "check_floating", calls)  # Query / Chunk / Context validation
    _spy(monkeypatch, attend_mod, "check_attend_inputs", calls)  # attend's own checks
    _spy(monkeypatch, layer_mod, "check_floating", calls)  # MemoryAttention's door check
    net = _net()
    states = net.init_states(1)
    x, pos = torch.randn(1, 2, 3, 8, 8), net.segment_positions(0, 1)
    with torch.no_grad():
        states = net.write(x, states, pos)
        net(x, torch.ones(1), states, net.segment_positions(1, 1))
    assert calls == []  # the network checked its inputs; its layers, memories and attend trusted them
    # the same functions called by the user do check (so the spies above can see a check)
    q = torch.randn(1, 2, 4, 8)
    memkit.attend(q, q, q)
    memkit.Query(q, torch.tensor([[0, 1]]), 2)
    layer = memkit.MemoryAttention(16, 2)
    layer(torch.randn(1, 4, 16), layer.init_state(1), torch.tensor([[0, 1]]))
    assert calls == ["check_attend_inputs", "check_floating", "check_floating"]


def test_the_doors_still_refuse_bad_input_with_a_clear_error() -> None:
    net = _net()
    with pytest.raises(memkit.ShapeError, match=r"x: dimension c\b.* should be 3, got 2"):
        net(torch.randn(1, 2, 2, 8, 8), torch.ones(1), net.init_states(1), net.segment_positions(0, 1))
    mem = memkit.SinkWindowMemory(2, 8, 2, sink_frames=1, window_frames=2)
    with pytest.raises(memkit.StateError, match="window frames"):
        memkit.MemoryAttention(16, 2, memory=mem)(
            torch.randn(1, 4, 16),
            memkit.SinkWindowMemory(2, 8, 2, sink_frames=1, window_frames=3).init_state(1),
            torch.tensor([[0, 1]]),
        )


def test_one_switch_turns_off_every_check() -> None:
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 3, 3, 8)  # 3 heads against q's 2
    with pytest.raises(memkit.ShapeError):
        memkit.attend(q, k, k)
    old = set_checks(False)
    try:
        assert not checks_enabled() and not at_door() and not outside()
        with pytest.raises(RuntimeError) as err:  # torch notices, with its own message
            memkit.attend(q, k, k)
        assert not isinstance(err.value, memkit.ShapeError)
        bad = torch.full((1, 2, 4, 8), float("nan"))
        memkit.Chunk(bad, bad, torch.randn(1, 4, 16), torch.tensor([[0, 1]]), 2)  # not even the NaN check
        small, big = memkit.FIFOMemory(2, 8, 2, frames=2), memkit.FIFOMemory(2, 8, 2, frames=3)
        small.read(big.init_state(1), memkit.Query(q[:, :, :2], torch.tensor([[0]]), 2))  # no state check
    finally:
        set_checks(old)
    assert checks_enabled() and at_door() and outside()


def test_trusted_scopes_and_depth_are_restored_after_an_error() -> None:
    with trusted():
        assert not at_door()
    assert at_door()
    with pytest.raises(memkit.ShapeError):
        memkit.attend(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    assert outside()  # the failed call left no entry point open
