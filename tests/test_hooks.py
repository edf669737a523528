"""attach composes with the ecosystem's hooks (issue 17, item 6).

A diffusers ``ModelHook`` (registered with diffusers' own ``HookRegistry``) on an attached
layer fires exactly once per call whether it was added before or after ``attach``; it wraps
memkit's attention (what it does to the output shows); ``detach`` removes memkit only.
"""

import importlib

import pytest
import torch
from torch import nn

import memkit
from memkit.integrations import multihead_attention_adapter

hooks = pytest.importorskip("diffusers.hooks")


class Count(hooks.ModelHook):
    """Counts calls and scales the output, so that its place around memkit's attention shows."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.pre = self.post = 0
        self.scale = scale

    def pre_forward(self, module, *args, **kwargs):
        self.pre += 1
        return args, kwargs

    def post_forward(self, module, output):
        self.post += 1
        return (output[0] * self.scale, output[1])


class Offload(hooks.ModelHook):
    """A hook with its own ``new_forward`` calling ``fn_ref.original_forward`` (as diffusers' offloading does)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _memory() -> memkit.FIFOMemory:
    return memkit.FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=2)


def _attach(model: Host) -> memkit.MemorySession:
    return memkit.attach(model, _memory(), layers="attn", adapter=multihead_attention_adapter)


def _with_memory_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the attached layer returns for ``y`` after committing ``x``, with no hook at all."""
    torch.manual_seed(0)
    model = Host().eval()
    with _attach(model) as session:
        session.set_segment([0, 1])
        session.commit(x)
        session.set_segment([2, 3])
        return model(y)


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_diffusers_hook_fires_once_per_call_around_memkit_and_survives_detach(order: str) -> None:
    x, y = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    want = _with_memory_reference(x, y)
    torch.manual_seed(0)
    model = Host().eval()
    stock = model(y)
    hook = Count(scale=2.0)
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model.attn)
    if order == "before":
        registry.register_hook(hook, "count")
    session = _attach(model)
    if order == "after":
        registry.register_hook(hook, "count")
    session.set_segment([0, 1])
    session.commit(x)
    assert (hook.pre, hook.post) == (1, 1)  # the clean pass: once
    session.set_segment([2, 3])
    got = model(y)
    assert (hook.pre, hook.post) == (2, 2)  # a denoising call: once
    torch.testing.assert_close(got, 2.0 * want)  # the hook wraps memkit's attention, memory included
    session.detach()
    after = model(y)
    assert (hook.pre, hook.post) == (3, 3), "detach removed the diffusers hook"
    torch.testing.assert_close(after, 2.0 * stock)  # the hook, around the stock module
    registry.remove_hook("count")
    torch.testing.assert_close(model(y), stock)
    assert hook.pre == 3


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_diffusers_hook_with_its_own_forward_composes(order: str) -> None:
    x, y = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    want = _with_memory_reference(x, y)
    torch.manual_seed(0)
    model = Host().eval()
    hook = Offload()
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model.attn)
    if order == "before":
        registry.register_hook(hook, "offload")
    session = _attach(model)
    if order == "after":
        registry.register_hook(hook, "offload")
    session.set_segment([0, 1])
    session.commit(x)
    session.set_segment([2, 3])
    torch.testing.assert_close(model(y), want)
    assert hook.calls == 2
    session.detach()
    model(y)
    assert hook.calls == 3


def test_hooks_on_both_sides_and_torch_hooks_each_fire_once_and_reattach_works() -> None:
    torch.manual_seed(0)
    model, x = Host().eval(), torch.randn(1, 8, 16)
    stock = model(x)
    inner, outer, torch_calls = Count(), Count(), []
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model.attn)
    registry.register_hook(inner, "inner")
    model.attn.register_forward_hook(lambda *_: torch_calls.append(1))
    first = _attach(model)
    registry.register_hook(outer, "outer")
    first.set_segment([0, 1])
    model(x)
    assert (inner.pre, outer.pre, len(torch_calls)) == (1, 1, 1)
    first.detach()
    # attach again after a detach that left hooks in place: a fresh route, still once per call
    with _attach(model) as second:
        second.set_segment([0, 1])
        second.commit(x)
        assert (inner.pre, outer.pre, len(torch_calls)) == (2, 2, 2)
    torch.testing.assert_close(model(x), stock)
    registry.remove_hook("outer")
    registry.remove_hook("inner")
    torch.testing.assert_close(model(x), stock)
    assert (inner.pre, outer.pre) == (3, 3)


def test_removing_a_hook_while_attached_keeps_memory_then_detach_restores_the_module() -> None:
    torch.manual_seed(0)
    model, x = Host().eval(), torch.randn(1, 8, 16)
    stock = model(x)
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model.attn)
    registry.register_hook(Count(), "count")
    session = _attach(model)
    registry.remove_hook("count")
    session.set_segment([0, 1])
    session.commit(x)  # still routed through memkit: the commit writes
    session.set_segment([2, 3])
    assert not torch.allclose(model(x), stock)
    session.detach()
    torch.testing.assert_close(model(x), stock)


def test_an_accelerate_hook_composes_in_either_order() -> None:
    accelerate_hooks = pytest.importorskip("accelerate.hooks")

    class CountHook(accelerate_hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountHook.calls += 1
            return args, kwargs

    for order in ("before", "after"):
        torch.manual_seed(0)
        model, x = Host().eval(), torch.randn(1, 8, 16)
        stock = model(x)
        CountHook.calls = 0
        if order == "before":
            accelerate_hooks.add_hook_to_module(model.attn, CountHook())
        session = _attach(model)
        if order == "after":
            accelerate_hooks.add_hook_to_module(model.attn, CountHook())
        session.set_segment([0, 1])
        session.commit(x)
        model(x)
        assert CountHook.calls == 2, order
        session.detach()
        torch.testing.assert_close(model(x), stock)
        assert CountHook.calls == 3, order
        accelerate_hooks.remove_hook_from_module(model.attn)
        torch.testing.assert_close(model(x), stock)


def test_the_wan_processor_follows_set_attention_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models import attention_dispatch

    from memkit.integrations import attach_wan
    from memkit.integrations.diffusers_wan import memkit_backend

    # set_attention_backend also sets diffusers' process-wide default: put it back afterwards
    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
        ffn_dim=32, num_layers=1,
    ).eval()  # fmt: skip
    stock = wan.attn_processors["blocks.0.attn1.processor"]
    attach_module = importlib.import_module("memkit.integrations.layer_attend")  # where LayerAttend calls it
    used: list[str | None] = []
    real = attach_module.attend_with_context

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        used.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attach_module, "attend_with_context", spy)
    latents, text, t = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 8), torch.tensor([500])
    with torch.no_grad(), attach_wan(wan, lambda name, attn: memkit.FIFOMemory(2, 16, 4, frames=2)) as session:
        session.set_segment([0, 1])
        wan(latents, t, text)
        wan.set_attention_backend("_native_math")
        wan(latents, t, text)
        assert used == ["auto", "math"]  # the session's default, then what diffusers was told
    assert getattr(stock._attention_backend, "value", None) == "_native_math"  # the stock processor kept it
    wan.reset_attention_backend()
    assert stock._attention_backend is None
    assert memkit_backend("native") == "sdpa"
    with pytest.warns(UserWarning, match="'sage' has no memkit counterpart"):
        assert memkit_backend("sage") is None
