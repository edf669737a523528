"""Fuzz: malformed inputs are handled or refused with memkit's own errors, never an obscure one."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit

H, D, T, DIM = 2, 4, 2, 8

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    """Any small tensor: random rank 0-5, sizes 0-4, dtype, and sometimes NaN/Inf."""
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=5))
    dtype = draw(st.sampled_from(DTYPES))
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(-3, 10, shape, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    if x.numel() and draw(st.booleans()):
        x.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return x


def valid_query(b: int = 1) -> dict[str, Any]:
    return {"q": torch.randn(b, H, 2 * T, D), "frame_positions": torch.tensor([[4, 5]] * b), "tokens_per_frame": T}


def valid_chunk(b: int = 1) -> dict[str, Any]:
    return {
        "k": torch.randn(b, H, 2 * T, D),
        "v": torch.randn(b, H, 2 * T, D),
        "hidden": torch.randn(b, 2 * T, DIM),
        "frame_positions": torch.tensor([[0, 1]] * b),
        "tokens_per_frame": T,
    }


def corrupt(draw: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Replace one argument by a random tensor, a random int, or None."""
    key = draw(st.sampled_from(sorted(args)))
    args = dict(args)
    args[key] = draw(st.one_of(tensors(), st.integers(-2, 9), st.none()))
    return args


def refused_or_handled(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except memkit.MemkitError:
        pass


MEMORIES: dict[str, Callable[[], Any]] = {
    "none": memkit.NoMemory,
    "sink_window": lambda: memkit.SinkWindowMemory(H, D, T, sink_frames=1, window_frames=2),
    "fifo": lambda: memkit.FIFOMemory(H, D, T, frames=2),
}


@settings(max_examples=150)
@given(data=st.data())
def test_query_chunk_and_context_constructors(data):
    refused_or_handled(lambda: memkit.Query(**corrupt(data.draw, valid_query())))
    refused_or_handled(lambda: memkit.Chunk(**corrupt(data.draw, valid_chunk())))
    ctx = {"k": torch.randn(1, H, 3, D), "v": torch.randn(1, H, 3, D), "mask": torch.ones(1, H, 3, dtype=torch.bool),
           "positions": torch.zeros(1, H, 3, dtype=torch.long)}  # fmt: skip
    refused_or_handled(lambda: memkit.Context(**corrupt(data.draw, ctx)))


@settings(max_examples=150)
@given(data=st.data())
def test_attend(data):
    args = {"q": torch.randn(1, H, 3, D), "k": torch.randn(1, H, 3, D), "v": torch.randn(1, H, 3, D)}
    bad = corrupt(data.draw, args)
    backend = data.draw(st.sampled_from(["auto", "math", "sdpa", "xformers", "nope"]))
    refused_or_handled(lambda: memkit.attend(bad["q"], bad["k"], bad["v"], backend=backend))


@pytest.mark.parametrize("name", MEMORIES)
@settings(max_examples=60)
@given(data=st.data())
def test_memory_read_and_write(name, data):
    mem = MEMORIES[name]()
    batch = data.draw(st.integers(1, 2))
    state = mem.init_state(batch)
    in_batch = data.draw(st.integers(1, 3))

    def build(cls: Any, spec: dict[str, Any]) -> Any:
        return cls(**corrupt(data.draw, spec)) if data.draw(st.booleans()) else cls(**spec)

    refused_or_handled(lambda: mem.write(state, build(memkit.Chunk, valid_chunk(in_batch))))
    refused_or_handled(lambda: mem.read(state, build(memkit.Query, valid_query(in_batch))))
    other = data.draw(st.sampled_from([None, 3, "state", memkit.NoMemory().init_state(1)]))
    refused_or_handled(lambda: mem.read(other, memkit.Query(**valid_query(batch))))


@settings(max_examples=100)
@given(data=st.data())
def test_memory_attention_forward(data):
    attn = memkit.MemoryAttention(DIM, H, memkit.FIFOMemory(H, D, T, frames=2))
    state = attn.init_state(1)
    args = {"x": torch.randn(1, 2 * T, DIM), "frame_positions": torch.tensor([[0, 1]])}
    bad = corrupt(data.draw, args)
    refused_or_handled(lambda: attn(bad["x"], state, bad["frame_positions"]))
    refused_or_handled(lambda: attn.forward_and_write(bad["x"], state, bad["frame_positions"]))
