"""One container of per-layer states (issue 13, item 5): LayerStates, made, saved and loaded in one place."""

from pathlib import Path

import pytest
import torch

import memkit
from memkit.layers import load_memory_states, save_memory_states
from memkit.models import TinySegmentModel
from memkit.models.malt import MALTConfig, MALTNetwork
from memkit.state import LayerStates, map_tensors, tensor_paths


def test_the_backbone_and_the_tiny_host_keep_states_by_layer_name() -> None:
    torch.manual_seed(0)
    net = MALTNetwork(MALTConfig.preset("tiny", memory="fifo")).eval()
    states = net.init_states(1)
    assert isinstance(states, LayerStates) and isinstance(states, tuple)
    assert states.names == tuple(f"blocks.{i}.attn" for i in range(net.config.depth))
    with torch.no_grad():
        written = net.write(torch.randn(1, 2, 3, 8, 8), states, net.segment_positions(0, 1))
    assert isinstance(written, LayerStates) and written.names == states.names
    assert written["blocks.1.attn"] is written[1] and int(written[1].window.valid.sum()) == 2
    tiny = TinySegmentModel(3, 3, tokens_per_frame=4, dim=16, heads=2, memory=lambda i: memkit.FIFOMemory(2, 8, 4))
    _, tiny_states = tiny(torch.randn(1, 8, 3), tiny.init_states(1), torch.tensor([[0, 1]]), write=True)
    assert tiny_states.names == ("blocks.0.attn", "blocks.1.attn")


def test_it_is_a_pytree_named_like_a_tuple() -> None:
    layers = torch.nn.ModuleList(memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1)) for _ in range(2))
    states = memkit.init_memory_states(layers, 2)
    moved = map_tensors(lambda x: x + 1 if x.is_floating_point() else x, states)
    assert isinstance(moved, LayerStates) and moved.names == ("0", "1")
    assert [p for p, _ in tensor_paths(states)] == [p for p, _ in tensor_paths(tuple(states))]
    with pytest.raises(KeyError, match="no memory layer named 'x'; layers: 0, 1"):
        states["x"]
    with pytest.raises(memkit.StateError, match="one distinct name per state"):
        LayerStates(tuple(states), ["a", "a"])


def test_save_and_load_without_a_template_also_files_saved_from_tuples(tmp_path: Path) -> None:
    layers = torch.nn.ModuleList(memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1, frames=2)) for _ in range(2))
    states = memkit.init_memory_states(layers, 3)
    x = torch.randn(3, 2, 8)
    states = states.with_states(
        layers[i].forward_and_write(x, s, torch.tensor([[0, 1]] * 3))[1] for i, s in enumerate(states)
    )
    save_memory_states(tmp_path / "a.safetensors", layers, states)
    memkit.save_states(tmp_path / "tuple.safetensors", tuple(states), [m.memory for m in layers])
    for name in ("a.safetensors", "tuple.safetensors"):
        back = load_memory_states(tmp_path / name, layers)
        assert isinstance(back, LayerStates) and back.names == ("0", "1")
        for (p, a), (q, b) in zip(tensor_paths(back), tensor_paths(states), strict=True):
            assert p == q and torch.equal(a, b)
    other = torch.nn.ModuleList(memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1, frames=3)) for _ in range(2))
    with pytest.raises(memkit.CheckpointError, match="another configuration"):
        load_memory_states(tmp_path / "a.safetensors", other)
