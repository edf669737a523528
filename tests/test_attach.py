"""memkit.attach: memory for a segment-autoregressive transformer that memkit did not write."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import memkit
from memkit.errors import AttachError, ShapeError
from memkit.integrations import LayerAttend, multihead_attention_adapter

# ---------------------------------------------------------------- a user's model (no memkit inside)


def rope(x, pos, theta=10000.0):
    """Rotate x (b h n d) by integer frame positions (b n) or (b h n)."""
    if pos.ndim == 2:
        pos = pos[:, None]
    half = x.shape[-1] // 2
    angles = pos[..., None].double() * theta ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, pos):  # x (b n D), pos (b n): frame of each token
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(rope(q, pos), rope(k, pos), v)
        return self.out(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, pos):
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x))


class VideoDenoiser(nn.Module):
    """Denoises one segment: x (b f t c), noise level sigma (b,), frame_positions (b f)."""

    def __init__(self, channels=4, dim=32, heads=2, depth=2):
        super().__init__()
        self.embed, self.sigma = nn.Linear(channels, dim), nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x, sigma, frame_positions):
        f, t = x.shape[1:3]
        pos = frame_positions.repeat_interleave(t, dim=1)
        h = self.embed(x.flatten(1, 2)) + self.sigma(sigma[:, None])[:, None]
        for block in self.blocks:
            h = block(h, pos)
        return self.head(h).unflatten(1, (f, t))


def adapter(attn, attend, x, pos):
    """The whole seam: the module's own projections, memkit's attention core."""
    q, k, v = attn.qkv(x).unflatten(-1, (3, attn.heads, -1)).permute(2, 0, 3, 1, 4)
    return attn.out(attend(q, k, v).transpose(1, 2).flatten(2))


# ---------------------------------------------------------------- helpers

F_, T, C, DIM, HEADS = 2, 3, 4, 32, 2  # segments of 2 frames x 3 tokens
NOISY, CLEAN = torch.tensor([0.8]), torch.tensor([0.0])


def model_(depth: int = 2, seed: int = 0) -> VideoDenoiser:
    torch.manual_seed(seed)
    return VideoDenoiser(C, DIM, HEADS, depth).eval()


def seg(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, F_, T, C, generator=torch.Generator().manual_seed(seed))


def pos(i: int, batch: int = 1) -> torch.Tensor:
    return torch.arange(i * F_, (i + 1) * F_).expand(batch, -1)


def fifo(frames: int = 4):
    return lambda name, attn: memkit.FIFOMemory(attn.heads, DIM // attn.heads, T, frames=frames)


def sink(name, attn):
    return memkit.SinkWindowMemory(attn.heads, DIM // attn.heads, T, sink_frames=1, window_frames=2)


def attach(model: nn.Module, memory, **kw) -> memkit.MemorySession:
    return memkit.attach(model, memory, layers=SelfAttention, adapter=adapter, rotary=rope, **kw)


def step(model: nn.Module, session: memkit.MemorySession, i: int, x: torch.Tensor) -> torch.Tensor:
    """Segment i: one denoising read (with the session active), then the clean commit."""
    session.set_segment(frame_positions=pos(i, x.shape[0]))
    with torch.no_grad(), session.active():
        y = model(x, NOISY.expand(x.shape[0]), pos(i, x.shape[0]))
    with torch.no_grad():
        session.commit(x, CLEAN.expand(x.shape[0]), pos(i, x.shape[0]))
    return y


def alone(model: nn.Module, memory, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with attach(model, memory) as session:
        return [step(model, session, i, x) for i, x in enumerate(xs)]


# ---------------------------------------------------------------- tests


def test_no_memory_equals_the_original_model() -> None:
    model = model_()
    xs = [seg(i, batch=2) for i in range(3)]
    want = [model(x, NOISY.expand(2), pos(i, 2)) for i, x in enumerate(xs)]
    got = alone(model, memkit.NoMemory(), xs)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


def test_one_layer_reading_the_previous_segment_equals_the_whole_clip() -> None:
    """Memory keys rotated at their recorded frames: chunked == one pass over both segments."""
    model = model_(depth=1)
    x0, x1 = seg(0), seg(1)
    with torch.no_grad():
        whole = model(torch.cat([x0, x1], dim=1), CLEAN, torch.arange(2 * F_)[None])
        with attach(model, fifo(F_)) as session:
            session.set_segment(frame_positions=pos(0))
            session.commit(x0, CLEAN, pos(0))
            session.set_segment(frame_positions=pos(1))
            chunked = model(x1, CLEAN, pos(1))
        torch.testing.assert_close(chunked, whole[:, F_:], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(chunked, model(x1, CLEAN, pos(1)), atol=1e-3)


@pytest.mark.parametrize("memory", [sink, fifo()], ids=["sink_window", "fifo"])
def test_memory_makes_outputs_depend_on_the_past(memory) -> None:
    model = model_()
    xs = [seg(i) for i in range(4)]
    a, b = alone(model, memory, xs), alone(model, memory, [seg(100), *xs[1:]])
    assert torch.equal(a[0], b[0]) is False  # different first segments
    assert not torch.allclose(a[3], b[3], atol=1e-4)  # segment 3 still remembers segment 0
    none_a, none_b = alone(model, memkit.NoMemory(), xs), alone(model, memkit.NoMemory(), [seg(100), *xs[1:]])
    torch.testing.assert_close(none_a[3], none_b[3], atol=0, rtol=0)


def test_detach_restores_the_model_exactly() -> None:
    model = model_()
    x = seg(0)
    before = model(x, NOISY, pos(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {name: dict(m.__dict__) for name, m in model.named_modules()}
    session = attach(model, fifo())
    assert all("forward" in b.attn.__dict__ for b in model.blocks)
    step(model, session, 0, x)
    session.set_segment(frame_positions=pos(1))
    assert not torch.equal(model(x, NOISY, pos(1)), before)
    session.detach()
    session.detach()  # harmless twice
    assert {name: dict(m.__dict__) for name, m in model.named_modules()} == dicts
    assert torch.equal(model(x, NOISY, pos(0)), before)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    with pytest.raises(AttachError, match="detached"):
        session.commit(x, CLEAN, pos(0))
    assert session.states["blocks.0.attn"] is not None  # states outlive the attachment


def test_detach_restores_an_instance_forward_someone_else_installed() -> None:
    model = model_()
    attn = model.blocks[0].attn
    theirs = attn.forward  # e.g. accelerate's hooks patch forward this way
    attn.__dict__["forward"] = theirs
    with attach(model, fifo()) as session:
        assert attn.__dict__["forward"] is not theirs
        step(model, session, 0, seg(0))
    assert attn.__dict__["forward"] is theirs


@settings(max_examples=20, deadline=None)
@given(order=st.permutations([0] * 3 + [1] * 3))
def test_two_sessions_do_not_interfere(order: list[int]) -> None:
    model = model_()
    xs = {0: [seg(i) for i in range(3)], 1: [seg(50 + i) for i in range(3)]}
    memories = {0: fifo(), 1: sink}
    sessions = {s: attach(model, memories[s]) for s in (0, 1)}
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for s in order:
        i = len(got[s])
        got[s].append(step(model, sessions[s], i, xs[s][i]))
    for s in (0, 1):
        sessions[s].detach()
    assert all("forward" not in m.__dict__ for m in model.modules())
    for s in (0, 1):
        for want, have in zip(alone(model, memories[s], xs[s]), got[s], strict=True):
            torch.testing.assert_close(have, want, atol=0, rtol=0)


def test_activation_follows_attach_order_and_active_blocks() -> None:
    model = model_()
    a, b = attach(model, fifo()), attach(model, fifo())
    assert b.is_active and not a.is_active
    with a.active():
        assert a.is_active
        with b.active():
            assert b.is_active
        assert a.is_active
    assert b.is_active
    a.activate()
    assert a.is_active
    a.detach()
    assert b.is_active
    b.detach()
    assert not b.is_active and not b.attached


def test_states_are_values_a_stream_can_branch_from() -> None:
    model = model_()
    with attach(model, fifo(), batch_size=1) as session:
        nbytes = session.nbytes
        assert nbytes > 0 and session.states.names == ("blocks.0.attn", "blocks.1.attn")
        assert set(session.states.keys()) == set(dict(session.states)) == {"blocks.0.attn", "blocks.1.attn"}
        step(model, session, 0, seg(0))
        saved = session.states
        y1 = step(model, session, 1, seg(1))
        step(model, session, 2, seg(2))
        session.set_states(saved)
        assert torch.equal(step(model, session, 1, seg(1)), y1)
        for i in range(3, 12):
            step(model, session, i, seg(i))
        assert session.nbytes == nbytes
        session.reset()
        assert session.states["blocks.0.attn"].window.valid.sum() == 0


def test_a_failed_commit_changes_no_state() -> None:
    model = model_()
    with attach(model, fifo()) as session:
        step(model, session, 0, seg(0))
        saved = session.states
        session.set_segment(frame_positions=pos(1))

        def boom(*args):
            raise RuntimeError("boom")

        handle = model.blocks[1].mlp.register_forward_hook(boom)  # fails after block 0 wrote
        with pytest.raises(RuntimeError, match="boom"):
            session.commit(seg(1), CLEAN, pos(1))
        handle.remove()
        assert all(session.states[k] is v for k, v in saved.items())


@pytest.mark.parametrize(
    "layers",
    ["blocks.*.attn", ["blocks.0.attn", "blocks.1.attn"], SelfAttention, lambda name, m: name.endswith(".attn")],
    ids=["glob", "names", "type", "predicate"],
)
def test_ways_to_choose_layers(layers) -> None:
    model = model_()
    seen = []

    def factory(name, module):
        seen.append(name)
        return memkit.NoMemory()

    with memkit.attach(model, factory, layers=layers, adapter={SelfAttention: adapter}) as session:
        assert session.layer_names == ("blocks.0.attn", "blocks.1.attn") == tuple(seen)


def test_a_memory_dict_chooses_the_layers_itself() -> None:
    model = model_()
    memories = {"blocks.1.attn": memkit.FIFOMemory(HEADS, DIM // HEADS, T, frames=2)}
    with memkit.attach(model, memories, adapter=adapter, rotary=rope) as session:
        assert session.layer_names == ("blocks.1.attn",)
        assert "forward" not in model.blocks[0].attn.__dict__
        step(model, session, 0, seg(0))


def test_refusals_say_what_is_wrong() -> None:
    model = model_()
    with pytest.raises(AttachError, match="no module of VideoDenoiser matched"):
        memkit.attach(model, memkit.NoMemory(), layers="nope.*", adapter=adapter)
    with pytest.raises(AttachError, match="no module named 'blocks.7.attn'"):
        memkit.attach(model, memkit.NoMemory(), layers=["blocks.7.attn"], adapter=adapter)
    with pytest.raises(AttachError, match="say which layers"):
        memkit.attach(model, memkit.NoMemory(), adapter=adapter)
    with pytest.raises(AttachError, match="no entry for layer 'blocks.1.attn'"):
        memkit.attach(model, {"blocks.0.attn": memkit.NoMemory()}, layers=SelfAttention, adapter=adapter)
    with pytest.raises(AttachError, match="not a memkit.Memory"):
        memkit.attach(model, lambda n, m: object(), layers=SelfAttention, adapter=adapter)
    with pytest.raises(AttachError, match="another model"):
        with attach(model, memkit.NoMemory()):
            attach(model.blocks[0], memkit.NoMemory())
    assert all("forward" not in m.__dict__ for m in model.modules())
    with attach(model, fifo()) as session:
        with pytest.raises(AttachError, match=r"call session.set_segment\(frame_positions=...\)"):
            model(seg(0), NOISY, pos(0))
        session.set_segment(frame_positions=[0, 1, 2, 3])
        with pytest.raises(ShapeError, match="not a whole number of tokens per frame for the 4 frames"):
            model(seg(0), NOISY, pos(0))
        session.set_segment(frame_positions=[0, 1], tokens_per_frame=2)
        with pytest.raises(ShapeError, match=r"dimension n \(tokens\) of the layer's queries is 6"):
            model(seg(0), NOISY, pos(0))
        session.set_segment(frame_positions=torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ShapeError, match=r"dimension b \(batch\) of frame_positions should be 1 or 2"):
            model(seg(0, batch=2), NOISY.expand(2), pos(0, 2))
        with pytest.raises(ShapeError, match="integer tensor"):
            session.set_segment(frame_positions=torch.zeros(2))
        session.set_segment(frame_positions=[0, 1])
        blocks = model.blocks
        model.blocks = nn.ModuleList()  # a forward that never reaches an attached layer
        with pytest.raises(AttachError, match="none of the attached layers"):
            session.commit(seg(0), NOISY, pos(0))
        model.blocks = blocks


class PackedAttention(SelfAttention):
    """An attention whose input is not a plain (b n D) argument."""

    def forward(self, packed):
        x, pos = packed
        return super().forward(x, pos)


def test_commit_needs_hidden_states_it_can_find() -> None:
    seen: list[LayerAttend] = []

    def packed_adapter(attn, attend, packed):
        seen.append(attend)
        x, _ = packed
        q, k, v = attn.qkv(x).unflatten(-1, (3, attn.heads, -1)).permute(2, 0, 3, 1, 4)
        return attn.out(attend(q, k, v).transpose(1, 2).flatten(2))

    attn = PackedAttention(DIM, HEADS)
    x = torch.randn(1, 6, DIM)
    with memkit.attach(attn, fifo(), layers="", adapter=packed_adapter) as session:
        session.set_segment([0, 1])
        with pytest.raises(AttachError, match=r"pass attend\(q, k, v, hidden=...\)"):
            session.commit((x, pos(0).repeat_interleave(3, 1)))
    assert seen and seen[0].name == "" and seen[0].memory is session.memories[""]


def test_multihead_attention_adapter_matches_torch() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 8, 16)
    want = mha(x, x, x, need_weights=False)[0]
    with memkit.attach(mha, memkit.NoMemory(), layers="", adapter=multihead_attention_adapter) as session:
        session.set_segment([0, 1])
        torch.testing.assert_close(mha(x, x, x)[0], want, atol=1e-6, rtol=1e-5)
        with pytest.raises(AttachError, match="self-attention only"):
            mha(x, x.clone(), x)
        with pytest.raises(AttachError, match="masks"):
            mha(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
