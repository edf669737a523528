"""Each memory slot carries its place in the frame where it has one (issue 18, item 4).

``Context.places``: a frame memory's slots sit at their index modulo tokens per frame, a
learned slot has none (-1). Composition keeps each part's own places, so a memory with
3 learned slots in front of a frame memory does not shift the frames' spatial rotation.
"""

import importlib.util

import pytest
import torch
from torch import Tensor, nn

import memkit
from memkit.integrations.rotary import TableRotary, axis_frequencies
from memkit.memories.none import NoState


class FixedContext(memkit.NoMemory):
    def __init__(self, context: memkit.Context) -> None:
        self.context = context

    def read(self, state: NoState, query: memkit.Query) -> memkit.Context:
        return self.context


def frames_context(seed: int, m: int = 8) -> memkit.Context:
    g = torch.Generator().manual_seed(seed)
    return memkit.Context(
        torch.randn(1, 2, m, 16, generator=g), torch.randn(1, 2, m, 16, generator=g),
        torch.ones(1, 2, m, dtype=torch.bool), torch.tensor([0] * 4 + [1] * 4).expand(1, 2, m),
    )  # fmt: skip


def learned_slots(m: int = 3, valid: bool = False) -> memkit.Context:
    """Slots with no place in a frame, here invalid: they contribute nothing to attention."""
    z = torch.randn(1, 2, m, 16)
    return memkit.Context(z, z, torch.full((1, 2, m), valid), torch.zeros(1, 2, m, dtype=torch.long),
                          torch.full((1, 2, m), -1))  # fmt: skip


def test_concat_keeps_each_parts_places() -> None:
    both = memkit.Context.concat([learned_slots(), frames_context(0)])
    assert both.places is not None and both.places[0, 0].tolist() == [-1, -1, -1, *range(8)]
    assert memkit.Context.concat([frames_context(0), frames_context(1)]).places is None  # frames only: unchanged


def test_recurrent_memory_says_its_slots_have_no_place() -> None:
    mem = memkit.RecurrentMemory(32, 2, 16, slots=3)
    q = memkit.Query(torch.randn(1, 2, 8, 16), torch.tensor([[4, 5]]), tokens_per_frame=4)
    ctx = mem.read(mem.init_state(1), q)
    assert ctx.places is not None and (ctx.places == -1).all()


def test_table_rotary_turns_a_placeless_slot_along_time_only() -> None:
    freqs = axis_frequencies((4, 2, 2), theta=100.0)
    angles = torch.arange(4)[:, None] % 2 * freqs + torch.arange(4)[:, None] * 0.3  # 2 frames of 2 tokens
    rot = TableRotary(angles.cos(), angles.sin(), freqs, tokens_per_frame=2, origin=torch.tensor([5]))
    x = torch.randn(1, 1, 1, 8)
    got = rot(x, torch.tensor([[[3]]]), places=torch.tensor([[[-1]]]))
    turn = (3 - 5) * freqs
    want = rot(x, torch.tensor([[[5]]]), places=torch.tensor([[[0]]]))  # sanity: the table's first row
    assert torch.allclose(want, rot(x, torch.tensor([[[5]]])), atol=1e-6)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    manual = torch.stack([x1 * turn.cos() - x2 * turn.sin(), x1 * turn.sin() + x2 * turn.cos()], -1).flatten(-2)
    assert torch.allclose(got, manual, atol=1e-6)


def raw_adapter(rotary):  # type: ignore[no-untyped-def]
    def adapter(module, attend, q, k, v):  # type: ignore[no-untyped-def]
        return attend(q, k, v, hidden=v.transpose(1, 2).flatten(2), rotary=rotary)

    return adapter


class Raw(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise AssertionError("only called through memkit")


def test_learned_slots_in_front_do_not_shift_the_frames_places_table_rotary() -> None:
    freqs = axis_frequencies((8, 4, 4), theta=100.0)
    g = torch.Generator().manual_seed(0)
    spatial = torch.rand(4, 8, generator=g) * 3  # a stand-in spatial part, different per place
    angles = torch.arange(8)[:, None].div(4, rounding_mode="floor") * freqs + spatial[torch.arange(8) % 4]
    rot = TableRotary(angles.cos(), angles.sin(), freqs, tokens_per_frame=4, origin=torch.tensor([2]))
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    outs = []
    for ctx in (frames_context(3), memkit.Context.concat([learned_slots(), frames_context(3)])):
        host = Raw()
        with memkit.attach(host, FixedContext(ctx), layers="", adapter=raw_adapter(rot)) as s:
            s.set_segment([2, 3])
            outs.append(host(q, k, v))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")
def test_learned_slots_in_front_do_not_shift_the_frames_places_wan() -> None:
    from diffusers import WanTransformer3DModel

    from memkit.integrations import attach_wan

    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 8)
    outs = []
    for ctx in (frames_context(3), memkit.Context.concat([learned_slots(), frames_context(3)])):
        with torch.no_grad(), attach_wan(wan, FixedContext(ctx)) as s:
            s.set_segment([2, 3])
            outs.append(wan(x, torch.tensor([500]), text).sample)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
