"""SkyReels-V2 (Wan-derived, diffusion forcing) as a first-class integration (issue 18, item 1).

A tiny random SkyReelsV2Transformer3DModel, nothing downloaded. attach_wan accepts it by
structure; its block-causal mask (num_frame_per_block) is followed; chunks of two causal
blocks with per-frame noise levels stream with memory and equal the stock model run on
the whole clip (every earlier chunk clean as context), at every depth.
"""

import importlib.util

import pytest
import torch
from torch import Tensor

import memkit
from memkit.errors import AttachError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")

HEADS, HEAD_DIM, CHANNELS, TEXT_DIM = 2, 16, 4, 8
BLOCK, CHUNK, SIDE = 2, 4, 4  # causal blocks of 2 latent frames, chunks of 2 blocks, 2x2 tokens per frame
TOKENS_PER_FRAME = (SIDE // 2) ** 2
TEXT = torch.randn(1, 3, TEXT_DIM, generator=torch.Generator().manual_seed(99))


def tiny_skyreels(num_layers: int = 2, frames_per_block: int = BLOCK):
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS,
        out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=num_layers,
        rope_max_seq_len=64, num_frame_per_block=frames_per_block,
    ).eval()  # fmt: skip


def latents(seed: int, frames: int = CHUNK) -> Tensor:
    return torch.randn(1, CHANNELS, frames, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def run(fn, x: Tensor, timesteps: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """One diffusion-forcing call: a noise level per latent frame, ``timesteps (1 f)``."""
    with torch.no_grad():
        return fn(x, timesteps, TEXT, enable_diffusion_forcing=True).sample


def fifo(frames: int):  # type: ignore[no-untyped-def]
    return lambda name, attn: memkit.FIFOMemory(attn.heads, HEAD_DIM, TOKENS_PER_FRAME, frames=frames)


def per_frame(levels: list[int]) -> Tensor:
    """Per-block noise levels to per-frame timesteps ``(1 f)``."""
    return torch.tensor([levels]).repeat_interleave(BLOCK, dim=1)


def test_attach_wan_accepts_skyreels_by_structure_and_follows_its_block_causal_mask() -> None:
    from memkit.integrations import attach_wan, block_causal_mask

    model, x, t = tiny_skyreels(), latents(1), per_frame([600, 900])
    stock = run(model, x, t)
    seen: list[Tensor] = []
    hook = model.blocks[0].attn1.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
    with attach_wan(model, memkit.NoMemory()) as session:
        session.set_segment(list(range(8, 8 + CHUNK)))  # a chunk late in the stream: the mask is the same
        got = run(model, x, t)
    hook.remove()
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(run(model, x, t), stock)  # detached: stock, bit for bit
    assert not seen[0].all()  # the model did pass its block-causal mask to attn1
    assert torch.equal(seen[0][0, 0], block_causal_mask(torch.arange(8, 8 + CHUNK)[None], TOKENS_PER_FRAME, BLOCK)[0])


def test_memory_changes_the_output_and_the_state_is_bounded_over_10_chunks() -> None:
    from memkit.integrations import attach_wan

    model = tiny_skyreels()
    sizes = []
    with attach_wan(model, fifo(CHUNK)) as session:
        session.set_segment(list(range(CHUNK)))
        alone = run(model, latents(1), per_frame([500, 800]))
        for i in range(10):
            session.set_segment(list(range(i * CHUNK, (i + 1) * CHUNK)))
            if i == 1:
                assert (run(model, latents(1), per_frame([500, 800])) - alone).abs().max() > 1e-3
            run(session.commit, latents(10 + i), per_frame([0, 0]))
            sizes.append(session.nbytes)
    assert len(set(sizes)) == 1 and sizes[0] > 0


def stream_with_memory(model, chunks: int, steps: list[int]) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """Chunk-by-chunk diffusion forcing with memory: each chunk's second block one step behind its first."""
    from memkit.integrations import attach_wan

    out = []
    with attach_wan(model, fifo(chunks * CHUNK)) as session:
        for c in range(chunks):
            session.set_segment(list(range(c * CHUNK, (c + 1) * CHUNK)))
            x = latents(100 + c)
            for i in range(len(steps) - 1):
                now = per_frame([steps[i], steps[max(i - 1, 0)]])  # asynchronous: block 1 lags block 0
                nxt = per_frame([steps[i + 1], steps[i]])
                v = run(model, x, now)
                x = x + ((nxt - now).float() / 1000)[:, None, :, None, None] * v
            run(session.commit, x, per_frame([0, 0]))  # the clean pass writes the chunk
            out.append(x)
    return out


def stream_stock_on_the_whole_clip(model, chunks: int, steps: list[int]) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """The same generation without memory: every call sees the whole clip so far, earlier chunks clean."""
    out: list[Tensor] = []
    for c in range(chunks):
        x = latents(100 + c)
        past = torch.cat(out, dim=2) if out else x[:, :, :0]
        zeros = torch.zeros(1, past.shape[2], dtype=torch.long)
        for i in range(len(steps) - 1):
            now = per_frame([steps[i], steps[max(i - 1, 0)]])
            nxt = per_frame([steps[i + 1], steps[i]])
            v = run(model, torch.cat([past, x], dim=2), torch.cat([zeros, now], dim=1))[:, :, past.shape[2] :]
            x = x + ((nxt - now).float() / 1000)[:, None, :, None, None] * v
        out.append(x)
    return out


def test_streaming_with_memory_equals_stock_on_the_whole_clip_at_every_depth() -> None:
    model, steps = tiny_skyreels(num_layers=2), [1000, 700, 400, 0]
    got = stream_with_memory(model, 3, steps)
    want = stream_stock_on_the_whole_clip(model, 3, steps)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # the comparison can fail: the last chunk with a memory too short to hold the clip is another chunk
    from memkit.integrations import attach_wan

    with attach_wan(model, fifo(BLOCK)) as short:
        for c in range(2):
            short.set_segment(list(range(c * CHUNK, (c + 1) * CHUNK)))
            run(short.commit, want[c], per_frame([0, 0]))
        short.set_segment(list(range(2 * CHUNK, 3 * CHUNK)))
        forgetful = run(model, want[2], per_frame([400, 700]))
    full = run(model, torch.cat(want, dim=2), torch.cat([torch.zeros(1, 2 * CHUNK, dtype=torch.long),
                                                         per_frame([400, 700])], dim=1))[:, :, 2 * CHUNK :]  # fmt: skip
    assert (forgetful - full).abs().max() > 1e-4


def test_attach_wan_still_refuses_models_that_are_not_wan_like() -> None:
    from memkit.integrations import attach_wan

    with pytest.raises(AttachError, match="no diffusers attention processors"):
        attach_wan(torch.nn.Linear(2, 2), memkit.NoMemory())
