"""memkit: interchangeable memory modules for long video generation."""

from memkit.attention import attend, attend_partial, attention_backend, available_backends, merge_partials
from memkit.errors import (
    AttachError,
    BackendUnavailableError,
    CheckpointError,
    DataError,
    MemkitError,
    NonFiniteError,
    ShapeError,
    StateError,
)
from memkit.integrations import MemorySession, attach
from memkit.io import load_states, save_states
from memkit.layers import MemoryAttention, init_memory_states, memory_layers
from memkit.memories import (
    ComposeMemory,
    CompressedWindowMemory,
    FIFOMemory,
    MemFlowMemory,
    NoMemory,
    PackedHistoryMemory,
    PoseRetrievalMemory,
    PromptBankMemory,
    QuantizedMemory,
    RecurrentMemory,
    SinkWindowMemory,
    SparseKVMemory,
    compose,
    quantized,
)
from memkit.protocol import Chunk, Context, Memory, Query, ReadLayout, ReadPlan, plan_read, read_planned
from memkit.state import MemoryState, map_tensors, memory_state, state_nbytes

__version__ = "0.1.0"

__all__ = [
    "Memory",
    "Query",
    "Chunk",
    "Context",
    "ReadLayout",
    "ReadPlan",
    "plan_read",
    "read_planned",
    "MemoryState",
    "memory_state",
    "map_tensors",
    "state_nbytes",
    "attend",
    "attend_partial",
    "merge_partials",
    "available_backends",
    "attention_backend",
    "MemoryAttention",
    "init_memory_states",
    "memory_layers",
    "NoMemory",
    "SinkWindowMemory",
    "FIFOMemory",
    "SparseKVMemory",
    "PromptBankMemory",
    "MemFlowMemory",
    "ComposeMemory",
    "compose",
    "RecurrentMemory",
    "CompressedWindowMemory",
    "PackedHistoryMemory",
    "QuantizedMemory",
    "PoseRetrievalMemory",
    "quantized",
    "MemkitError",
    "ShapeError",
    "BackendUnavailableError",
    "StateError",
    "CheckpointError",
    "NonFiniteError",
    "AttachError",
    "DataError",
    "attach",
    "MemorySession",
    "save_states",
    "load_states",
]
