"""memkit inside diffusers' WanTransformer3DModel: a tiny random Wan, no download."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memkit
from memkit.errors import AttachError, ShapeError

requires_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")

HEADS, HEAD_DIM, CHANNELS, TEXT_DIM = 2, 16, 4, 8
FRAMES, HEIGHT, WIDTH = 2, 4, 6  # latent chunk: 2 frames of (4/2) x (6/2) = 6 tokens
TOKENS_PER_FRAME = (HEIGHT // 2) * (WIDTH // 2)


def tiny_wan(num_layers: int = 2, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=64,
    ).eval()


def chunk(seed: int, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(1, CHANNELS, frames, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


TEXT = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(99))
NOISY, CLEAN = torch.tensor([700]), torch.tensor([0])


def run(model, latents: torch.Tensor, timestep: torch.Tensor = NOISY) -> torch.Tensor:
    with torch.no_grad():
        return model(latents, timestep, TEXT).sample


def frames(i: int) -> list[int]:
    return list(range(i * FRAMES, (i + 1) * FRAMES))


def fifo(frames_kept: int = 4):
    return lambda name, attn: memkit.FIFOMemory(attn.heads, attn.inner_dim // attn.heads, TOKENS_PER_FRAME,
                                               frames=frames_kept)  # fmt: skip


def stream(model, memory, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Denoise-step output of each chunk after committing every earlier chunk."""
    from memkit.integrations import attach_wan

    outs = []
    with attach_wan(model, memory) as session:
        for i, x in enumerate(chunks):
            session.set_segment(frame_positions=frames(i))
            outs.append(run(model, x))
            with torch.no_grad():
                session.commit(x, CLEAN, TEXT)
    return outs


def test_import_memkit_leaves_diffusers_alone_and_attach_wan_says_how_to_install_it() -> None:
    code = (
        "import sys, torch, memkit, memkit.integrations\n"
        "assert 'diffusers' not in sys.modules, 'import memkit imported diffusers'\n"
        "sys.modules['diffusers'] = None  # as if it were not installed\n"
        "try:\n"
        "    memkit.integrations.attach_wan(torch.nn.Linear(2, 2), memkit.NoMemory())\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'memkit-video[diffusers]'\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('attach_wan without diffusers raised no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@requires_diffusers
def test_no_memory_equals_stock_processors() -> None:
    from memkit.integrations import attach_wan

    model = tiny_wan()
    xs = [chunk(i) for i in range(3)]
    stock = [run(model, x, t) for x in xs for t in (NOISY, CLEAN)]
    with attach_wan(model, memkit.NoMemory()) as session:
        got = []
        for i, x in enumerate(xs):
            session.set_segment(frame_positions=frames(i + 5))  # far from 0: only differences matter
            got += [run(model, x, t) for t in (NOISY, CLEAN)]
            with torch.no_grad():
                session.commit(x, CLEAN, TEXT)
    for want, have in zip(stock, got, strict=True):
        torch.testing.assert_close(have, want, atol=1e-6, rtol=0)


@requires_diffusers
def test_memory_keys_are_rotated_at_their_true_frames() -> None:
    """One layer: a chunk reading the previous chunk from memory == the two chunks as one clip.

    With a single transformer block, the only place tokens meet is attn1; if the memory
    holds the previous chunk's keys/values rotated at their true (t, h, w) positions, the
    chunk's output equals stock Wan run on both chunks as one clip.
    """
    model = tiny_wan(num_layers=1)
    x0, x1 = chunk(0), chunk(1)
    whole = run(model, torch.cat([x0, x1], dim=2), CLEAN)
    from memkit.integrations import attach_wan

    with attach_wan(model, fifo(FRAMES)) as session:
        session.set_segment(frame_positions=frames(0))
        with torch.no_grad():
            out0 = session.commit(x0, CLEAN, TEXT).sample
        session.set_segment(frame_positions=frames(1))
        out1 = run(model, x1, CLEAN)
    torch.testing.assert_close(out0, run(model, x0, CLEAN), atol=1e-6, rtol=0)  # empty memory: stock
    torch.testing.assert_close(out1, whole[:, :, FRAMES:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out1, run(model, x1, CLEAN), atol=1e-3)


@requires_diffusers
@pytest.mark.parametrize("memory", ["sink_window", "fifo"])
def test_chunk_output_depends_on_earlier_chunks(memory: str) -> None:
    model = tiny_wan()

    def make(name, attn):
        h, d = attn.heads, attn.inner_dim // attn.heads
        if memory == "fifo":
            return memkit.FIFOMemory(h, d, TOKENS_PER_FRAME, frames=4)
        return memkit.SinkWindowMemory(h, d, TOKENS_PER_FRAME, sink_frames=1, window_frames=2)

    base = [chunk(i) for i in range(4)]
    changed_first = [chunk(100), *base[1:]]
    a, b = stream(model, make, base), stream(model, make, changed_first)
    assert not torch.allclose(a[3], b[3], atol=1e-4)  # chunk 3 remembers chunk 0 (sink or FIFO of 4 frames)
    assert not torch.allclose(a[1], run(model, base[1]), atol=1e-4)  # and differs from no memory
    no_mem_a, no_mem_b = stream(model, memkit.NoMemory(), base), stream(model, memkit.NoMemory(), changed_first)
    torch.testing.assert_close(no_mem_a[3], no_mem_b[3], atol=0, rtol=0)


@requires_diffusers
def test_state_size_is_fixed_over_50_chunks() -> None:
    from memkit.integrations import attach_wan

    model = tiny_wan()
    x = chunk(0)
    with attach_wan(model, fifo(3), batch_size=1) as session:
        sizes, seen = [], []
        for i in range(50):
            session.set_segment(frame_positions=frames(i))
            with torch.no_grad():
                session.commit(x, CLEAN, TEXT)
            sizes.append(session.nbytes)
            seen.append(session.states["blocks.1.attn1"].window.pos[0].tolist())
        last = run(model, x)
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert seen[-1] == [97, 98, 99]  # positions keep counting past rope_max_seq_len (64)
    assert torch.isfinite(last).all()


@requires_diffusers
def test_detach_restores_stock_processors_bit_identically() -> None:
    from memkit.integrations import WanMemoryProcessor, attach_wan

    model = tiny_wan()
    x = chunk(0)
    before = run(model, x)
    processors = model.attn_processors
    state = {k: v.clone() for k, v in model.state_dict().items()}
    session = attach_wan(model, fifo())
    assert all(isinstance(model.attn_processors[f"blocks.{i}.attn1.processor"], WanMemoryProcessor) for i in (0, 1))
    assert model.attn_processors["blocks.0.attn2.processor"] is processors["blocks.0.attn2.processor"]
    session.set_segment(frame_positions=[0, 1])
    with torch.no_grad():
        session.commit(x, CLEAN, TEXT)
    session.set_segment(frame_positions=[2, 3])
    assert not torch.equal(run(model, x), before)
    session.detach()
    assert model.attn_processors == processors  # the very same processor objects
    assert all(model.attn_processors[k] is p for k, p in processors.items())
    assert torch.equal(run(model, x), before)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert all("forward" not in m.__dict__ for m in model.modules())


@requires_diffusers
def test_two_wan_sessions_do_not_interfere() -> None:
    from memkit.integrations import attach_wan

    model = tiny_wan()
    xa, xb = [chunk(i) for i in range(3)], [chunk(10 + i) for i in range(3)]
    alone_a, alone_b = stream(model, fifo(), xa), stream(model, fifo(), xb)
    a, b = attach_wan(model, fifo()), attach_wan(model, fifo())
    got_a, got_b = [], []
    for i in range(3):
        for session, xs, got in ((a, xa, got_a), (b, xb, got_b)):
            session.set_segment(frame_positions=frames(i))
            with session.active():
                got.append(run(model, xs[i]))
            with torch.no_grad():
                session.commit(xs[i], CLEAN, TEXT)
    a.detach()
    b.detach()
    for want, have in zip(alone_a + alone_b, got_a + got_b, strict=True):
        torch.testing.assert_close(have, want, atol=0, rtol=0)


@requires_diffusers
def test_wrong_frame_count_is_refused_with_a_clear_message() -> None:
    from memkit.integrations import attach_wan

    model = tiny_wan()
    with attach_wan(model, fifo()) as session:
        session.set_segment(frame_positions=[0, 1, 2])  # the latents have 2 frames of 6 tokens, not 3 of 4
        with pytest.raises(ShapeError, match="one frame position per latent frame"):
            run(model, chunk(0))
        session.set_segment(frame_positions=[0])  # 1 frame of 12 tokens
        with pytest.raises(ShapeError, match="one frame position per latent frame"):
            run(model, chunk(0))


@requires_diffusers
def test_attach_wan_refuses_cross_attention_and_other_models() -> None:
    from memkit.integrations import attach_wan

    model = tiny_wan()
    with pytest.raises(AttachError, match="not a Wan self-attention layer"):
        attach_wan(model, memkit.NoMemory(), layers="blocks.0.attn2")
    with pytest.raises(AttachError, match="expected a diffusers WanTransformer3DModel"):
        attach_wan(torch.nn.Linear(2, 2), memkit.NoMemory())
    with pytest.raises(AttachError, match="set_segment"):
        with attach_wan(model, memkit.NoMemory()):
            run(model, chunk(0))
    assert model.attn_processors["blocks.0.attn1.processor"].__class__.__name__ == "WanAttnProcessor"


@requires_diffusers
def test_shifting_every_frame_position_changes_nothing() -> None:
    """Batch items at frames 0.. and 1000.. (past rope_max_seq_len) see the same relative past."""
    from memkit.integrations import attach_wan

    model = tiny_wan()
    xs = [chunk(i).expand(2, -1, -1, -1, -1) for i in range(3)]
    with attach_wan(model, fifo(), batch_size=2) as session:
        for i, x in enumerate(xs):
            session.set_segment(frame_positions=torch.tensor([frames(i), [1000 + f for f in frames(i)]]))
            with torch.no_grad():
                out = model(x, NOISY.expand(2), TEXT.expand(2, -1, -1)).sample
                session.commit(x, CLEAN.expand(2), TEXT.expand(2, -1, -1))
    assert session.states["blocks.0.attn1"].window.pos[1].tolist() == [1002, 1003, 1004, 1005]
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
