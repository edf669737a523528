"""Choosing the attention backend: a registry with priorities and ``memkit.attention_backend`` (issue 13, item 7)."""

import pytest
import torch

import memkit
from memkit.attention import Backend, backends, get_backend, register_backend
from memkit.attention.backends import attend_sdpa


def _qkv() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    ctx = memkit.Context(
        torch.randn(2, 2, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8, generator=g),
        torch.rand(2, 2, 5, generator=g) < 0.6,
        torch.zeros(2, 2, 5, dtype=torch.long),
    )
    return q, k, v, ctx


def test_the_block_changes_what_auto_means_and_restores_it() -> None:
    q, k, v, ctx = _qkv()
    math, sdpa = memkit.attend(q, k, v, ctx, backend="math"), memkit.attend(q, k, v, ctx, backend="sdpa")
    assert not torch.equal(math, sdpa)  # rounding differs, so the test can tell them apart
    assert torch.equal(memkit.attend(q, k, v, ctx), sdpa)
    with memkit.attention_backend("math"):
        assert torch.equal(memkit.attend(q, k, v, ctx), math)
        with memkit.attention_backend("sdpa"):  # blocks nest
            assert torch.equal(memkit.attend(q, k, v, ctx), sdpa)
        assert torch.equal(memkit.attend(q, k, v, ctx), math)
        assert torch.equal(memkit.attend(q, k, v, ctx, backend="sdpa"), sdpa)  # a name still wins
    assert torch.equal(memkit.attend(q, k, v, ctx), sdpa)


def test_the_block_is_left_clean_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), memkit.attention_backend("math"):
        raise RuntimeError("boom")
    assert get_backend("auto", torch.zeros(1, 1, 1, 1)).name == "sdpa"


def test_the_block_reaches_every_layer_of_a_model() -> None:
    from memkit.models.malt import MALTConfig, MALTNetwork

    torch.manual_seed(0)
    net = MALTNetwork(MALTConfig.preset("tiny", memory="fifo")).eval()
    for p in net.parameters():  # zero-initialised heads would hide the attention's output
        torch.nn.init.normal_(p, std=0.2)
    math_net = MALTNetwork(MALTConfig.preset("tiny", memory="fifo", backend="math")).eval()
    math_net.load_state_dict(net.state_dict())
    x, t = torch.randn(1, 2, 3, 8, 8), torch.full((1,), 0.5)
    states, pos = net.init_states(1), net.segment_positions(0, 1)
    states = net.write(torch.randn(1, 2, 3, 8, 8), states, pos)
    pos = net.segment_positions(1, 1)
    with torch.no_grad():
        want = math_net(x, t, states, pos)
        assert not torch.equal(net(x, t, states, pos), want)
        with memkit.attention_backend("math"):
            assert torch.equal(net(x, t, states, pos), want)


def test_auto_takes_the_runnable_backend_of_highest_priority() -> None:
    q = torch.zeros(1, 1, 1, 1)
    assert get_backend("auto", q).name == "sdpa"  # math has no priority; xformers cannot run on the CPU
    calls = []

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return attend_sdpa(*args)

    register_backend(Backend("counting", counting, lambda q: None, priority=100))
    try:
        assert get_backend("auto", q).name == "counting"
        memkit.attend(*_qkv())
        assert calls == [1]
        register_backend(Backend("counting", counting, lambda q: "never here", priority=100))
        assert get_backend("auto", q).name == "sdpa"  # it cannot run: the next one in line
    finally:
        del backends._REGISTRY["counting"]


def test_unknown_names_are_refused_at_once_and_unrunnable_ones_when_used() -> None:
    with pytest.raises(memkit.BackendUnavailableError, match="unknown attention backend 'flash9'.*'math'"):
        with memkit.attention_backend("flash9"):
            pass
    q, k, v, _ = _qkv()
    if "xformers" not in memkit.available_backends(q):
        with memkit.attention_backend("xformers"):
            with pytest.raises(memkit.BackendUnavailableError, match="'xformers' cannot run here: xformers"):
                memkit.attend(q, k, v)
