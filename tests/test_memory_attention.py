"""MemoryAttention: plain attention without memory, rotary at stored positions, clean errors."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

import memkit
from memkit.layers import apply_rotary


def test_no_memory_is_plain_self_attention():
    torch.manual_seed(0)
    attn = memkit.MemoryAttention(16, 2)
    x, pos = torch.randn(2, 6, 16), torch.tensor([[3, 4, 5]] * 2)
    q, k, v = rearrange(attn.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=2)
    tok = pos.repeat_interleave(2, dim=1)
    expected = F.scaled_dot_product_attention(apply_rotary(q, tok), apply_rotary(k, tok), v)
    expected = attn.to_out(rearrange(expected, "b h n d -> b n (h d)"))
    torch.testing.assert_close(attn(x, attn.init_state(2), pos), expected)


@given(shift=st.integers(0, 5000), seed=st.integers(0, 100))
def test_shifting_every_position_changes_nothing(shift, seed):
    """Rotary at stored positions: only distances between frames matter, at any length."""
    torch.manual_seed(seed)
    mem = memkit.SinkWindowMemory(2, 8, 2, sink_frames=1, window_frames=2)
    attn = memkit.MemoryAttention(16, 2, mem)
    segs = [torch.randn(1, 4, 16) for _ in range(3)]

    def run(offset):
        state = attn.init_state(1)
        for s, x in enumerate(segs[:2]):
            _, state = attn.forward_and_write(x, state, torch.tensor([[2 * s, 2 * s + 1]]) + offset)
        return attn(segs[2], state, torch.tensor([[4, 5]]) + offset)

    torch.testing.assert_close(run(0), run(shift), atol=5e-5, rtol=5e-5)


def test_memory_changes_the_output_and_forward_is_pure():
    torch.manual_seed(0)
    attn = memkit.MemoryAttention(16, 2, memkit.FIFOMemory(2, 8, 2, frames=4))
    state0 = attn.init_state(1)
    x0, x1 = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    y0 = attn(x1, state0, torch.tensor([[2, 3]]))
    _, state1 = attn.forward_and_write(x0, state0, torch.tensor([[0, 1]]))
    y1 = attn(x1, state1, torch.tensor([[2, 3]]))
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(attn(x1, state0, torch.tensor([[2, 3]])), y0)


def test_model_states_helpers():
    model = torch.nn.Sequential(memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1)), memkit.MemoryAttention(8, 2))
    states = memkit.init_memory_states(model, 2)
    assert len(memkit.memory_layers(model)) == 2 and len(states) == 2
    assert memkit.state_nbytes(states) == states[0].nbytes


def test_bad_inputs_name_what_was_expected():
    attn = memkit.MemoryAttention(16, 2)
    state = attn.init_state(1)
    with pytest.raises(memkit.ShapeError, match=r"x: dimension D \(model dim\) should be 16, got 12"):
        attn(torch.randn(1, 4, 12), state, torch.tensor([[0, 1]]))
    with pytest.raises(memkit.ShapeError, match="not a whole number of tokens per frame for 3 frames"):
        attn(torch.randn(1, 4, 16), state, torch.tensor([[0, 1, 2]]))
    with pytest.raises(memkit.ShapeError, match=r"frame_positions: dimension b \(batch\) should be 1, got 2"):
        attn(torch.randn(1, 4, 16), state, torch.tensor([[0, 1], [0, 1]]))
