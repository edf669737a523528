"""A host's memory lifecycle with memkit.attach: train, save, load, move, mode, detach.

The host is a plain PyTorch transformer written here without memkit inside (its own rotary
for ``(b n)`` positions, separate q/k/v projections, pre-norm blocks); memory reaches it
only through ``attach``.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memkit
from memkit.errors import AttachError, CheckpointError, StateError

DIM, HEADS, FRAMES, TOKENS, CH = 24, 3, 2, 4, 5  # head_dim 8; segments of 2 frames x 4 tokens


# ---------------------------------------------------------------- the host: no memkit inside


def rotary_bn(x, pos):
    """Rotate x (b h n d) at positions (b n) only: the usual way a host writes its rotary."""
    half = x.shape[-1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    ang = pos[:, None, :, None].double() * freqs  # (b 1 n half): (b n) only
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _rotary_bhm(x, pos):
    half = x.shape[-1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    ang = pos[..., None].double() * freqs
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def rotary(x, pos):
    """The same rotary for (b n) and (b h m) positions: memkit passes (b h m) for memory keys."""
    return _rotary_bhm(x, pos[:, None] if pos.ndim == 2 else pos)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def heads(self, x):
        return x.unflatten(-1, (HEADS, -1)).transpose(1, 2)

    def forward(self, x, pos):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        out = F.scaled_dot_product_attention(rotary(q, pos), rotary(k, pos), v)
        return self.o(out.transpose(1, 2).flatten(2))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attention = Attention()
        self.ff = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.drop = nn.Dropout(0.5)  # shows train/eval mode

    def forward(self, x, pos):
        x = x + self.attention(self.n1(x), pos)
        return x + self.drop(self.ff(self.n2(x)))


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(CH, DIM), nn.Linear(DIM, CH)
        self.layers = nn.ModuleList(Layer() for _ in range(2))

    def forward(self, x, frames):  # x (b f t c), frames (b f)
        pos = frames.repeat_interleave(x.shape[2], dim=1)
        h = self.inp(x.flatten(1, 2))
        for layer in self.layers:
            h = layer(h, pos)
        return self.out(h).unflatten(1, x.shape[1:3])


def adapter(attn, attend, x, pos):
    q, k, v = attn.heads(attn.q(x)), attn.heads(attn.k(x)), attn.heads(attn.v(x))
    return attn.o(attend(q, k, v).transpose(1, 2).flatten(2))


def recurrent(name, module):
    return memkit.RecurrentMemory(DIM, HEADS, slots=3)


def attach(host, memory=recurrent, **kw):
    return memkit.attach(host, memory, layers=Attention, adapter=adapter, rotary=rotary, **kw)


def frames(i):
    return torch.tensor([[FRAMES * i + j for j in range(FRAMES)]])


def seg(seed):
    return torch.randn(1, FRAMES, TOKENS, CH, generator=torch.Generator().manual_seed(seed))


def run_stream(host, session, start, stop):
    """Commit segments start..stop-1, returning the read outputs of the last one."""
    out = None
    with torch.no_grad():
        for i in range(start, stop):
            session.set_segment(frame_positions=frames(i))
            out = host(seg(i), frames(i))
            session.commit(seg(i), frames(i))
    return out


# ---------------------------------------------------------------- the host owns its memories


def test_memories_with_parameters_become_part_of_the_host() -> None:
    torch.manual_seed(0)
    host = Denoiser().eval()
    plain_keys, plain_params = list(host.state_dict()), len(list(host.parameters()))
    session = attach(host)
    mems = list(session.memories.values())
    assert list(host.memkit_memories) == ["layers-0-attention", "layers-1-attention"]
    assert [host.memkit_memories[k] for k in host.memkit_memories] == mems
    params = {id(p) for p in host.parameters()}
    assert all(id(p) in params for m in mems for p in m.parameters())  # the optimizer sees them
    extra = [k for k in host.state_dict() if k not in plain_keys]
    assert extra and all(k.startswith("memkit_memories.layers-") for k in extra)
    assert not any(m.training for m in mems)  # they took the host's eval mode
    host.train()
    assert all(m.training for m in mems)
    host.eval()
    assert not any(m.training for m in mems)
    session.detach()
    assert not hasattr(host, "memkit_memories")
    assert list(host.state_dict()) == plain_keys and len(list(host.parameters())) == plain_params


def test_a_memory_shared_by_layers_is_registered_once_and_sessions_share_the_attribute() -> None:
    host = Denoiser()
    shared = memkit.RecurrentMemory(DIM, HEADS, slots=3)
    a = attach(host, shared)
    assert list(host.memkit_memories) == ["layers-0-attention"]
    b = attach(host)  # a second stream, with memories of its own
    assert len(host.memkit_memories) == 3
    a.detach()
    assert shared not in list(host.memkit_memories.values()) and len(host.memkit_memories) == 2
    b.detach()
    assert not hasattr(host, "memkit_memories")


def test_memories_without_parameters_leave_the_host_alone() -> None:
    host = Denoiser()
    keys = list(host.state_dict())
    with attach(host, memkit.SinkWindowMemory(HEADS, DIM // HEADS, TOKENS, window_frames=2)):
        assert not hasattr(host, "memkit_memories") and list(host.state_dict()) == keys


def test_an_attribute_of_that_name_is_not_overwritten() -> None:
    host = Denoiser()
    host.memkit_memories = nn.Linear(2, 2)
    with pytest.raises(AttachError, match="already has an attribute 'memkit_memories'"):
        attach(host)
    assert isinstance(host.memkit_memories, nn.Linear)


def test_training_the_host_trains_its_memories() -> None:
    torch.manual_seed(0)
    host = Denoiser()
    session = attach(host)
    optimizer = torch.optim.SGD(host.parameters(), lr=0.1)  # nothing memkit-specific
    before = {k: v.clone() for k, v in host.memkit_memories.state_dict().items()}
    for step in range(2):
        session.reset()
        session.set_segment(frame_positions=frames(0))
        session.commit(seg(step), frames(0))  # written with gradients
        session.set_segment(frame_positions=frames(1))
        loss = F.mse_loss(host(seg(10 + step), frames(1)), seg(20 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = host.memkit_memories.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert any("init_latent" in k for k in changed) and any("to_read_kv" in k for k in changed)


def test_save_load_continues_bit_for_bit_and_works_before_the_first_segment(tmp_path: Path) -> None:
    torch.manual_seed(0)
    host = Denoiser().eval()
    session = attach(host)
    session.save_states(tmp_path / "empty.safetensors")  # nothing yet: states are None
    run_stream(host, session, 0, 3)
    torch.save(host.state_dict(), tmp_path / "host.pt")
    session.save_states(tmp_path / "stream.safetensors")
    want = run_stream(host, session, 3, 5)

    fresh = Denoiser().eval()
    restored = attach(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "host.pt"))
    assert all(s is None for s in restored.states.values())
    restored.load_states(tmp_path / "stream.safetensors")  # before its first segment, no template
    got = run_stream(fresh, restored, 3, 5)
    assert torch.equal(got, want)

    restored.load_states(tmp_path / "empty.safetensors")  # an empty stream loads as empty
    assert all(s is None for s in restored.states.values())
    eager = attach(Denoiser(), batch_size=1)
    eager.load_states(tmp_path / "stream.safetensors")
    assert all(s.writes.tolist() == [3] for s in eager.states.values())


def test_load_refuses_another_configuration_and_set_states_too(tmp_path: Path) -> None:
    host = Denoiser().eval()
    session = attach(host)
    run_stream(host, session, 0, 1)
    session.save_states(tmp_path / "stream.safetensors")
    other = attach(Denoiser(), lambda name, m: memkit.RecurrentMemory(DIM, HEADS, slots=5))
    with pytest.raises(CheckpointError, match="slots: saved 3, expected 5"):
        other.load_states(tmp_path / "stream.safetensors")
    with pytest.raises(StateError, match=r"state.latent: dimension m \(memory slots\) should be 5, got 3"):
        other.set_states(session.states)
    fifo = attach(Denoiser(), memkit.FIFOMemory(HEADS, DIM // HEADS, TOKENS, frames=2))
    with pytest.raises(CheckpointError, match="RecurrentMemory"):
        fifo.load_states(tmp_path / "stream.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        session.load_states(tmp_path / "missing.safetensors")
    # a session's states as a template before the first segment: the error says what to do
    with pytest.raises(CheckpointError, match=r"session.load_states\(path\)"):
        memkit.load_states(tmp_path / "stream.safetensors", other.states)


def test_moving_the_host_moves_its_memories_and_the_session_moves_its_states() -> None:
    torch.manual_seed(0)
    host = Denoiser().eval()
    session = attach(host)
    run_stream(host, session, 0, 2)
    host.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in host.memkit_memories.parameters())
    session.to(torch.float64)
    assert all(s.latent.dtype == torch.float64 and s.writes.dtype == torch.long for s in session.states.values())
    with torch.no_grad():
        session.set_segment(frame_positions=frames(2))
        y = host(seg(2).double(), frames(2))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


def test_attach_moves_a_memory_to_the_host_device() -> None:
    host = Denoiser().to(torch.device("meta"))
    mem = memkit.RecurrentMemory(DIM, HEADS, slots=3)
    with attach(host, mem):
        assert mem.init_latent.device.type == "meta"


def test_a_rotary_for_b_n_positions_only_fails_with_what_memkit_passed() -> None:
    host = Denoiser().eval()
    session = memkit.attach(
        host, memkit.FIFOMemory(HEADS, DIM // HEADS, TOKENS, frames=2), layers=Attention, adapter=adapter,
        rotary=rotary_bn,
    )  # fmt: skip
    session.set_segment(frame_positions=frames(0))  # an empty memory has slots too: (b h m) positions
    with pytest.raises(AttachError, match=r"positions \(b h m\): memory keys.*= \(1, 3, 8\)"):
        host(seg(0), frames(0))
    session.detach()
    bad = memkit.attach(
        host, memkit.FIFOMemory(HEADS, DIM // HEADS, TOKENS, frames=2), layers=Attention, adapter=adapter,
        rotary=lambda x, pos: x[..., :2],
    )  # fmt: skip
    bad.set_segment(frame_positions=frames(0))
    with pytest.raises(AttachError, match="must return a tensor shaped like x"):
        host(seg(0), frames(0))
    bad.detach()
