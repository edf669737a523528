"""Memories: one file each, all implementing :class:`memkit.Memory`, each registered by name in its file."""

from memkit.memories.compose import ComposeMemory, ComposeState, compose
from memkit.memories.compressed_window import CompressedWindowMemory, CompressedWindowState
from memkit.memories.frames import FrameBuffer
from memkit.memories.memflow import MemFlowMemory, MemFlowState
from memkit.memories.none import NoMemory, NoState
from memkit.memories.packed_history import PackedHistoryMemory, PackedHistoryState
from memkit.memories.pose_retrieval import PoseRetrievalMemory, PoseRetrievalState
from memkit.memories.prompt_bank import PromptBankMemory, PromptBankState
from memkit.memories.quantized import QuantizedMemory, QuantizedState, quantized
from memkit.memories.recurrent import RecurrentMemory, RecurrentState
from memkit.memories.registry import build_from_spec, build_memory, memory_names, register_memory
from memkit.memories.sink_window import FIFOMemory, SinkWindowMemory, SinkWindowState
from memkit.memories.sparse_kv import SparseKVMemory, SparseKVState

__all__ = [
    "NoMemory",
    "NoState",
    "SinkWindowMemory",
    "SinkWindowState",
    "FIFOMemory",
    "SparseKVMemory",
    "SparseKVState",
    "PromptBankMemory",
    "PromptBankState",
    "MemFlowMemory",
    "MemFlowState",
    "ComposeMemory",
    "ComposeState",
    "compose",
    "RecurrentMemory",
    "RecurrentState",
    "register_memory",
    "build_memory",
    "build_from_spec",
    "memory_names",
    "CompressedWindowMemory",
    "CompressedWindowState",
    "PackedHistoryMemory",
    "PackedHistoryState",
    "QuantizedMemory",
    "PoseRetrievalMemory",
    "PoseRetrievalState",
    "QuantizedState",
    "quantized",
    "FrameBuffer",
]
