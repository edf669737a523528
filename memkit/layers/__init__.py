"""Layers: the attention layer that carries a memory, and rotary embeddings."""

from memkit.layers.memory_attention import (
    LayerPlan,
    MemoryAttention,
    Rotate,
    attend_with_context,
    clamp_context_positions,
    memory_layers,
)
from memkit.layers.rotary import apply_rotary, rotary_angles
from memkit.layers.states import (
    init_memory_states,
    load_layer_states,
    load_memory_states,
    save_layer_states,
    save_memory_states,
)

__all__ = [
    "MemoryAttention",
    "LayerPlan",
    "attend_with_context",
    "clamp_context_positions",
    "Rotate",
    "init_memory_states",
    "save_memory_states",
    "load_memory_states",
    "save_layer_states",
    "load_layer_states",
    "memory_layers",
    "apply_rotary",
    "rotary_angles",
]
