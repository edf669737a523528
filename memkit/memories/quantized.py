"""``QuantizedMemory`` / :func:`quantized`: a frame memory whose stored keys and values are int8."""

from typing import Any

import torch
from torch import Tensor, nn

from memkit.checks import check_state
from memkit.errors import StateError
from memkit.memories.registry import build_from_spec, register_memory
from memkit.protocol import Chunk, Context, Memory, Query, ReadLayout, ReadPlan, plan_read, read_dynamic
from memkit.state import (
    MemoryState,
    check_init_args,
    check_state_matches,
    map_tensor_paths,
    memory_state,
    tensor_paths,
)
from memkit.typing import typechecked

__all__ = ["QuantizedMemory", "QuantizedState", "quantized", "quantize_frames", "dequantize_frames"]

_LEVELS = 127  # symmetric int8: codes in [-127, 127], so 0 is exact and the scale is max|x| / 127


def quantize_frames(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes of ``x (... t d)`` with one scale per leading index (per frame, per head).

    Returns ``(codes, scale)``: ``codes`` int8 like ``x``, ``scale (...)`` in ``x``'s dtype, so
    ``codes * scale[..., None, None]`` is within ``scale / 2`` of ``x`` element-wise. An all-zero
    frame (an empty slot) gets scale 0 and codes 0. Re-quantizing a dequantized frame returns
    the same codes (the largest element maps to exactly +-127 again), so frames kept across
    writes do not drift.

    Example:
        >>> codes, scale = quantize_frames(torch.tensor([[[0.5, -1.0], [0.25, 0.0]]]))
        >>> codes.tolist(), scale.tolist()
        ([[[64, -127], [32, 0]]], [0.007874015718698502])
    """
    scale = x.abs().amax(dim=(-2, -1)) / _LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None, None]
    codes = torch.round(x / safe).clamp(-_LEVELS, _LEVELS).to(torch.int8)
    return codes, scale


def dequantize_frames(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes (... t d)`` int8 times ``scale (...)``: the float frames back, in ``scale``'s dtype."""
    return codes.to(scale.dtype) * scale[..., None, None]


def _frame_paths(state: Any) -> tuple[str, ...]:
    """Paths (``.window.k``) of the tensors holding frames of keys/values, anywhere in ``state``.

    Those the state holding them declares, in its ``layouts``, as floating ``"b h <frames> t d"``:
    the keys and values of every :class:`memkit.memories.frames.FrameBuffer`, and such fields of a
    memory's own state.
    """
    from memkit.state import _walk

    out = []
    for path, x, holders in _walk(state):
        owner, field = holders[-1] if holders else (None, "")
        layout = getattr(type(owner), "layouts", {}).get(field, "")
        dims = layout.split() if isinstance(layout, str) else []
        if len(dims) == 5 and dims[:2] == ["b", "h"] and dims[3:] == ["t", "d"] and x.is_floating_point():
            out.append(path)
    return tuple(out)


@memory_state
class QuantizedState(MemoryState):
    """State of :class:`QuantizedMemory`.

    Attributes:
        codes: the inner memory's state with every frame buffer (``b h F t d``) held as int8 codes.
        scales: one ``(b h F)`` scale tensor per such buffer, in field order.
    """

    codes: Any
    scales: tuple[Tensor, ...]


class QuantizedMemory(nn.Module):
    """Any frame memory, with its stored keys and values in int8 (per frame, per head scales).

    The wrapped memory's frame buffers (the keys and values of its state's
    :class:`memkit.memories.frames.FrameBuffer` sub-states, and any field its state's
    ``layouts`` declares as ``"b h <frames> t d"``: :class:`FIFOMemory`, :class:`SinkWindowMemory`,
    :class:`SparseKVMemory`, :class:`PromptBankMemory`, :class:`CompressedWindowMemory`)
    are kept as symmetric int8 codes with one float scale per frame and head: a quarter of
    the float32 bytes (half of bfloat16's) plus ``4 b h F`` bytes of scales. ``read``
    dequantizes and reads through the inner memory, so every selection rule is the inner
    memory's; ``write`` dequantizes, writes, and quantizes again (frames that stay keep
    their codes exactly). Positions, validity and small summaries stay as they are.

    The error is at most half a step, ``max|x| / 254`` per frame and head. LongLive 2.0
    ships a 4-bit KV cache; 8 bits is the conservative default here.

    Cost: the inner memory's, plus a dequantization of its buffers (``O(b h F t d)``) once per
    segment when read through a plan (:func:`memkit.plan_read`, as the reference sampler does;
    at every read otherwise) and a quantization at every write.
    State bytes: the inner state's, with ``2 b h F t d * (itemsize - 1) - 2 b h F * itemsize``
    fewer bytes for each pair of key/value buffers of ``F`` frames.

    Args:
        memory: a frame memory (its state must declare ``layouts``).

    Example:
        >>> import torch, memkit
        >>> fifo = memkit.FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=3)
        >>> mem = memkit.quantized(fifo)
        >>> state = mem.init_state(1)
        >>> state.codes.window.k.dtype, state.nbytes, fifo.init_state(1).nbytes
        (torch.int8, 467, 1571)
        >>> k = torch.randn(1, 2, 8, 8)
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 8, 16), torch.tensor([[0, 1]]), 4))
        >>> ctx = mem.read(state, memkit.Query(torch.randn(1, 2, 4, 8), torch.tensor([[2]]), 4))
        >>> bool((ctx.k[..., 4:, :] - k).abs().max() <= k.abs().max() / 254 + 1e-6)  # slots 4..11 hold frames 0, 1
        True
    """

    def __init__(self, memory: Memory[Any]) -> None:
        super().__init__()
        if not isinstance(memory, Memory):
            raise TypeError(f"QuantizedMemory: expected a memkit.Memory, got {type(memory).__name__}")
        if isinstance(memory, nn.Module):
            self.add_module("inner", memory)
        self.memory = memory
        paths = _frame_paths(memory.init_state(1, device="meta"))
        if not paths:
            raise ValueError(
                f"QuantizedMemory: {type(memory).__name__} declares no frame buffers (state fields laid out "
                "'b h <frames> t d' in its state's layouts); only frame memories can be quantized"
            )
        #: where the frames sit in the wrapped memory's state (``.sink.k``), one scale tensor each, in this order
        self.paths = paths

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> QuantizedState:
        batch_size = check_init_args("QuantizedMemory.init_state", batch_size, device, dtype)
        return self._quantize(self.memory.init_state(batch_size, device=device, dtype=dtype))

    def _quantize(self, inner: Any) -> QuantizedState:
        pairs = {path: quantize_frames(x) for path, x in tensor_paths(inner) if path in self.paths}
        codes = map_tensor_paths(lambda path, x: pairs[path][0] if path in pairs else x, inner)
        return QuantizedState(codes=codes, scales=tuple(pairs[path][1] for path in self.paths))

    def _dequantize(self, where: str, state: QuantizedState) -> Any:
        check_state(f"QuantizedMemory.{where}", state, QuantizedState)
        if len(state.scales) != len(self.paths):
            raise StateError(
                f"QuantizedMemory.{where}: expected {len(self.paths)} scale tensors (one per frame buffer "
                f"{self.paths}), got {len(state.scales)}"
            )
        check_state_matches(f"QuantizedMemory.{where}", state, self)
        scales = dict(zip(self.paths, state.scales, strict=True))
        return map_tensor_paths(
            lambda path, x: dequantize_frames(x, scales[path]) if path in scales else x, state.codes
        )

    @typechecked
    def read(self, state: QuantizedState, query: Query) -> Context:
        """The inner memory's context, read from the dequantized state."""
        return self.memory.read(self._dequantize("read", state), query)

    @typechecked
    def plan(self, state: QuantizedState, layout: ReadLayout) -> ReadPlan:
        """The wrapped memory's plan, made from the state dequantized once per segment (not at every step)."""
        return plan_read(self.memory, self._dequantize("plan", state), layout)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return read_dynamic(self.memory, plan, query)

    @typechecked
    def write(self, state: QuantizedState, chunk: Chunk) -> QuantizedState:
        """Dequantize, write through the inner memory, quantize again."""
        return self._quantize(self.memory.write(self._dequantize("write", state), chunk))

    def __repr__(self) -> str:
        return f"quantized({self.memory!r})"


def quantized(memory: Memory[Any]) -> QuantizedMemory:
    """``memory`` with int8 frame buffers (see :class:`QuantizedMemory`).

    Example:
        >>> import memkit
        >>> memkit.quantized(memkit.SinkWindowMemory(2, 8, 4, sink_frames=1, window_frames=2))
        quantized(SinkWindowMemory(heads=2, head_dim=8, tokens_per_frame=4, sink_frames=1, window_frames=2))
    """
    return QuantizedMemory(memory)


def _build_quantized(
    *, heads: int, head_dim: int, tokens_per_frame: int, dim: int, memory: dict[str, Any], **extra: Any
) -> QuantizedMemory:
    """``{"name": "quantized", "kwargs": {"memory": {"name": "sparse_kv", "kwargs": {...}}}}`` in a config."""
    if not isinstance(memory, dict) or "name" not in memory:
        raise ValueError(
            "quantized: kwargs.memory should be the wrapped memory's spec, {'name': ..., 'kwargs': {...}}, "
            f"got {memory!r}"
        )
    geometry = {"heads": heads, "head_dim": head_dim, "tokens_per_frame": tokens_per_frame, "dim": dim}
    # extra: geometry the host adds (prompt_dim), which the wrapped memory may take
    return QuantizedMemory(build_from_spec(memory["name"], {**memory.get("kwargs", {}), **extra}, geometry))


register_memory("quantized", _build_quantized)
