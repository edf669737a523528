"""LTX-Video by the generic route (issue 18, item 5): memkit.attach + a user's adapter + TableRotary.

The adapter below is the one docs/integrations.md shows. A tiny random LTX, nothing downloaded.
LTX's prompt enters by cross-attention (attn2), so chunk-relative frames are exact.
"""

import importlib.util
import math

import pytest
import torch
from torch import Tensor

import memkit
from memkit.integrations.rotary import TableRotary

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")

HEADS, HEAD_DIM, CHANNELS, TEXT_DIM, FRAMES, SIDE = 2, 16, 4, 8, 2, 2
TOKENS_PER_FRAME = SIDE * SIDE  # LTX takes patchified latents (patch size 1): a token per latent pixel
TEXT = torch.randn(1, 3, TEXT_DIM, generator=torch.Generator().manual_seed(99))


def ltx_time_freqs(rope, heads: int, frame_scale: float = 1.0) -> Tensor:  # type: ignore[no-untyped-def]
    """LTX's rotary turn per frame of each (head, channel pair): its frame axis is every third pair."""
    freqs = rope.theta ** torch.linspace(0.0, 1.0, rope.dim // 6) * math.pi / 2  # LTXVideoRotaryPosEmbed's
    per_pair = torch.zeros(rope.dim // 2)
    per_pair[(rope.dim % 6) // 2 :: 3] = 2 * frame_scale * freqs  # angle = freq * (2 * frame * scale - 1)
    return per_pair.view(heads, -1)


def ltx_adapter(time_freqs: Tensor):  # type: ignore[no-untyped-def]
    def adapter(attn, attend, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):  # type: ignore[no-untyped-def]
        assert encoder_hidden_states is None and attention_mask is None  # attn1: self-attention
        q, k, v = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states)), attn.to_v(hidden_states)
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))
        fp, t = attend.layout(q)
        # LTX rotates all heads' channels as one vector: its (b n D) table, per pair, per head
        cos, sin = (x[0, :, 0::2].unflatten(-1, (attn.heads, -1)).transpose(0, 1) for x in image_rotary_emb)
        out = attend(q, k, v, hidden=hidden_states, rotary=TableRotary(cos, sin, time_freqs, t, fp[:, 0]))
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))

    return adapter


def tiny_ltx(num_layers: int = 2):  # type: ignore[no-untyped-def]
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM, num_layers=num_layers, caption_channels=TEXT_DIM,
    ).eval()  # fmt: skip


def attach_ltx(model, memory):  # type: ignore[no-untyped-def]
    freqs = ltx_time_freqs(model.rope, HEADS)
    return memkit.attach(model, memory, layers="transformer_blocks.*.attn1", adapter=ltx_adapter(freqs))


def latents(seed: int, frames: int = FRAMES) -> Tensor:
    return torch.randn(1, frames * TOKENS_PER_FRAME, CHANNELS, generator=torch.Generator().manual_seed(seed))


def run(fn, x: Tensor, timestep: int = 500) -> Tensor:  # type: ignore[no-untyped-def]
    frames = x.shape[1] // TOKENS_PER_FRAME
    with torch.no_grad():
        return fn(x, TEXT, torch.tensor([timestep]), torch.ones(1, 3), frames, SIDE, SIDE).sample


def fifo(frames: int = FRAMES):  # type: ignore[no-untyped-def]
    return lambda name, attn: memkit.FIFOMemory(HEADS, HEAD_DIM, TOKENS_PER_FRAME, frames=frames)


def test_no_memory_equals_stock_and_detach_restores_it() -> None:
    model, x = tiny_ltx(), latents(1)
    stock = run(model, x)
    with attach_ltx(model, memkit.NoMemory()) as session:
        session.set_segment([0, 1])
        got = run(model, x)
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(run(model, x), stock)


def test_memory_changes_the_output_and_the_state_is_bounded_over_10_chunks() -> None:
    model, sizes = tiny_ltx(), []
    with attach_ltx(model, fifo()) as session:
        session.set_segment([0, 1])
        alone = run(model, latents(1))
        for i in range(10):
            session.set_segment([2 * i, 2 * i + 1])
            if i == 1:
                assert (run(model, latents(1)) - alone).abs().max() > 1e-3
            run(session.commit, latents(10 + i), 0)
            sizes.append(session.nbytes)
    assert len(set(sizes)) == 1 and sizes[0] > 0


def test_chunk_b_reading_chunk_a_from_memory_equals_stock_on_the_clip() -> None:
    model, a, b = tiny_ltx(num_layers=1), latents(1), latents(2)
    clip = run(model, torch.cat([a, b], dim=1))
    with attach_ltx(model, fifo()) as session:
        session.set_segment([0, 1])
        run(session.commit, a)  # at the clip's timestep: A's keys as the clip sees them
        session.set_segment([2, 3])
        got = run(model, b)
        session.set_segment([0, 1])
        run(session.commit, a, 0)  # a clean A is another A: the comparison can fail
        session.set_segment([2, 3])
        other = run(model, b)
    n = FRAMES * TOKENS_PER_FRAME
    torch.testing.assert_close(got, clip[:, n:], atol=2e-5, rtol=1e-4)
    assert (other - clip[:, n:]).abs().max() > 1e-4
