"""memkit in diffusers' joint text-video transformers (issue 18): CogVideoX, HunyuanVideo, Mochi.

Tiny random configs, nothing downloaded. Per model: NoMemory equals stock (1e-5), detach
restores stock bit for bit, the state is bounded over 10 chunks, memory changes the
output, and with one transformer block "chunk B reading chunk A from memory" equals stock
on the clip [A, B] (one block: the clip's A keys are A's own, whatever B holds).
"""

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import memkit
from memkit.errors import AttachError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")

HEADS, HEAD_DIM, CHANNELS, TEXT_DIM, TEXT_LEN = 2, 16, 4, 8, 3
FRAMES, SIDE = 2, 4  # a chunk: 2 latent frames of (4/2) x (4/2) = 4 tokens
TOKENS_PER_FRAME = (SIDE // 2) ** 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclasses.dataclass
class Host:
    """One model family: how to build it, attach to it and run one chunk or clip of latent frames."""

    name: str
    build: Callable[[bool], nn.Module]  # one_block -> model
    attach: Callable[..., memkit.MemorySession]
    # (model or session.commit, latents (b c f h w), timestep) -> (b c f h w)
    run: Callable[[Callable[..., Any], Tensor, int], Tensor]


# ---------------------------------------------------------------------------------------------------- CogVideoX
def cog_build(one_block: bool) -> nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS, out_channels=CHANNELS,
        time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=1 if one_block else 2, sample_width=SIDE * 8,
        sample_height=SIDE * 8, sample_frames=9, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip


def cog_rotary(frames: int) -> tuple[Tensor, Tensor]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = SIDE // 2
    # what CogVideoXPipeline._prepare_rotary_positional_embeddings builds for a chunk of `frames` latent frames
    return get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (grid, grid)), (grid, grid), frames)


COG_TEXT = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen(99))


def cog_run(model: Callable[..., Any], latents: Tensor, timestep: int) -> Tensor:
    x = latents.transpose(1, 2)  # CogVideoX takes (b f c h w)
    with torch.no_grad():
        out = model(x, COG_TEXT, torch.tensor([timestep]), image_rotary_emb=cog_rotary(x.shape[1])).sample
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------- HunyuanVideo
def hunyuan_build(one_block: bool, single: bool = False) -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    layers = (0, 1) if one_block and single else (1, 0) if one_block else (1, 1)
    return HunyuanVideoTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        num_layers=layers[0], num_single_layers=layers[1], num_refiner_layers=1, text_embed_dim=TEXT_DIM,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=False,
    ).eval()  # fmt: skip


HY_TEXT = torch.randn(1, TEXT_LEN + 1, TEXT_DIM, generator=gen(98))
HY_TEXT_MASK = torch.tensor([[1, 1, 1, 0]])  # the prompt's last token is padding: the mask is used on every call
HY_POOLED = torch.randn(1, 8, generator=gen(97))


def hunyuan_run(model: Callable[..., Any], latents: Tensor, timestep: int) -> Tensor:
    with torch.no_grad():
        return model(latents, torch.tensor([timestep]), HY_TEXT, HY_TEXT_MASK, HY_POOLED).sample


# ---------------------------------------------------------------------------------------------------- Mochi
def mochi_build(one_block: bool) -> nn.Module:
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1 if one_block else 2,
        pooled_projection_dim=8, in_channels=CHANNELS, text_embed_dim=TEXT_DIM, time_embed_dim=8,
        max_sequence_length=TEXT_LEN + 1,
    ).eval()  # fmt: skip
    with torch.no_grad():  # Mochi's learned rotary starts at 0 (no rotation): give it frequencies to test
        model.pos_frequencies.normal_(generator=gen(5))
    return model


MOCHI_TEXT = torch.randn(1, TEXT_LEN + 1, TEXT_DIM, generator=gen(96))
MOCHI_TEXT_MASK = torch.tensor([[1, 1, 1, 0]])


def mochi_run(model: Callable[..., Any], latents: Tensor, timestep: int) -> Tensor:
    with torch.no_grad():
        return model(latents, MOCHI_TEXT, torch.tensor([timestep]), MOCHI_TEXT_MASK).sample


def _hosts() -> dict[str, Host]:
    from memkit.integrations import attach_cogvideox, attach_hunyuan_video, attach_mochi

    return {
        "cogvideox": Host("cogvideox", cog_build, attach_cogvideox, cog_run),
        "hunyuan_dual": Host("hunyuan_dual", hunyuan_build, attach_hunyuan_video, hunyuan_run),
        "hunyuan_single": Host(
            "hunyuan_single", lambda one: hunyuan_build(one, single=True), attach_hunyuan_video, hunyuan_run
        ),
        "mochi": Host("mochi", mochi_build, attach_mochi, mochi_run),
    }


NAMES = ["cogvideox", "hunyuan_dual", "hunyuan_single", "mochi"]


def latents(seed: int, frames: int = FRAMES) -> Tensor:
    return torch.randn(1, CHANNELS, frames, SIDE, SIDE, generator=gen(seed))


def fifo(frames: int = 2) -> Callable[[str, Any], memkit.Memory[Any]]:
    return lambda name, attn: memkit.FIFOMemory(attn.heads, HEAD_DIM, TOKENS_PER_FRAME, frames=frames)


@pytest.mark.parametrize("name", NAMES)
def test_no_memory_equals_stock_and_detach_restores_it_exactly(name: str) -> None:
    host = _hosts()[name]
    model, x = host.build(False), latents(1)
    stock = host.run(model, x, 500)
    with host.attach(model, memkit.NoMemory()) as session:
        session.set_segment([0, 1])
        got = host.run(model, x, 500)
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(host.run(model, x, 500), stock)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_memory_changes_the_output_and_the_state_is_bounded_over_10_chunks(name: str) -> None:
    host = _hosts()[name]
    model = host.build(False)
    sizes = []
    with host.attach(model, fifo()) as session:
        session.set_segment([0, 1])
        alone = host.run(model, latents(1), 500)  # nothing in memory yet
        for i in range(10):
            session.set_segment([2 * i, 2 * i + 1])
            if i == 1:
                assert (host.run(model, latents(1), 500) - alone).abs().max() > 1e-3  # chunk 0 is read
            host.run(session.commit, latents(10 + i), 0)
            sizes.append(session.nbytes)
    assert len(set(sizes)) == 1 and sizes[0] > 0


@pytest.mark.parametrize("name", NAMES)
def test_chunk_b_reading_chunk_a_from_memory_equals_stock_on_the_clip(name: str) -> None:
    host = _hosts()[name]
    model = host.build(True)
    a, b = latents(1), latents(2)
    clip = host.run(model, torch.cat([a, b], dim=2), 500)
    # joint attention scores unrotated prompt keys against rotated video queries: exact with stream frames
    with host.attach(model, fifo(FRAMES), frame_origin="stream") as session:
        session.set_segment([0, 1])
        host.run(session.commit, a, 500)  # A written as the clip's pass sees it (same timestep)
        session.set_segment([2, 3])
        got = host.run(model, b, 500)
        session.set_segment([0, 1])
        host.run(session.commit, a, 0)  # a clean A is another A: the comparison can fail
        session.set_segment([2, 3])
        other = host.run(model, b, 500)
    torch.testing.assert_close(got, clip[:, :, FRAMES:], atol=2e-5, rtol=1e-4)
    assert (other - clip[:, :, FRAMES:]).abs().max() > 1e-4


def test_cogvideox_with_an_absolute_position_embedding_is_refused_with_the_reason() -> None:
    from diffusers import CogVideoXTransformer3DModel

    from memkit.integrations import attach_cogvideox

    cog2b = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=1, sample_width=SIDE * 8, sample_height=SIDE * 8, sample_frames=9,
        max_text_seq_length=TEXT_LEN,
    )  # fmt: skip
    with pytest.raises(AttachError, match="adds a position embedding to its input"):
        attach_cogvideox(cog2b, memkit.NoMemory())


def test_cogvideox_1_5_with_temporal_patches_is_exact_too() -> None:
    """CogVideoX 1.5 patches 2 latent frames into one: one frame position per patched frame."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from memkit.integrations import attach_cogvideox

    torch.manual_seed(0)
    cog = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS, out_channels=CHANNELS,
        time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=1, sample_width=SIDE * 8, sample_height=SIDE * 8,
        sample_frames=9, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True, patch_size_t=2,
    ).eval()  # fmt: skip
    grid = SIDE // 2

    def run(fn, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        # CogVideoXPipeline's 1.5 table: grid_type="slice", one row per patched frame
        rotary = get_3d_rotary_pos_embed(HEAD_DIM, None, (grid, grid), x.shape[1] // 2, grid_type="slice",
                                         max_size=(grid, grid))  # fmt: skip
        with torch.no_grad():
            return fn(x, COG_TEXT, torch.tensor([500]), image_rotary_emb=rotary).sample

    a, b = (torch.randn(1, 4, CHANNELS, SIDE, SIDE, generator=gen(s)) for s in (1, 2))  # 4 latent = 2 patched frames
    stock, clip = run(cog, a), run(cog, torch.cat([a, b], dim=1))
    with attach_cogvideox(cog, fifo(FRAMES), frame_origin="stream") as session:
        session.set_segment([0, 1])
        first = run(cog, a)  # empty memory: stock
        run(session.commit, a)
        session.set_segment([2, 3])
        got = run(cog, b)
    torch.testing.assert_close(first, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, clip[:, 4:], atol=2e-5, rtol=1e-4)
