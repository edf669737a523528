"""Layers: the attention layer that carries a memory, and rotary embeddings."""

from memkit.layers.memory_attention import (
    LayerPlan,
    MemoryAttention,
    Rotate,
    attend_with_context,
    clamp_context_positions,
    init_memory_states,
    memory_layers,
)
from memkit.layers.rotary import apply_rotary, rotary_angles

__all__ = [
    "MemoryAttention",
    "LayerPlan",
    "attend_with_context",
    "clamp_context_positions",
    "Rotate",
    "init_memory_states",
    "memory_layers",
    "apply_rotary",
    "rotary_angles",
]
