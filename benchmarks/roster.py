"""The memories the suite measures, each sized from one layer geometry.

memkit's own memories are sized to read the same budget of ``4 f`` frames from memory
(``f`` sink frames plus ``3 f`` more; a segment has ``f`` frames), so their costs compare at a
matched attention budget. The published settings are scaled to a segment of ``f`` frames the
way the papers' chunks of 3 frames relate to their numbers (LongLive: ``local_attn_size`` 12 =
3 sink + the 3-frame chunk + 6 past frames; MemFlow adds its 3-frame bank, routed with the sink
by SMA); they read ``3 f`` (+ the bank) frames from memory:

==========================  ========================================================  =========
memory                      configuration                                             frames read
==========================  ========================================================  =========
NoMemory                    nothing                                                   0
FIFOMemory                  newest ``4 f`` frames                                     4 f
SinkWindowMemory            ``f`` sink frames + newest ``3 f`` (matched budget)      4 f
LongLive                    ``f`` sink + newest ``2 f`` (LongLive's 12 = 3 + 3 + 6)   3 f
MemFlow NAM                 LongLive + bank 3 (record every 3 writes), all attended   3 f + 3
MemFlow NAM+SMA             LongLive's window + top 3 of sink + bank per head         2 f + 3
SparseKVMemory              ring of ``C`` frames, ``f`` sink + top ``3 f``            4 f
PromptBankMemory            bank of 3 frames (MemFlow's b = 3)                        3
PromptBank+SparseKV         bank 3 + SparseKV (``f`` sink + top ``3 f - 3``)          4 f
RecurrentMemory             ``t`` latent slots (one frame's worth of tokens)          (t tokens)
FullHistory (baseline)      every frame ever written (unbounded, benchmarks only)     all
==========================  ========================================================  =========

A memory memkit does not have yet is listed with the reason instead of a factory.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import memkit
from benchmarks.baselines import FullHistoryMemory


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One attention layer's shape: heads, head dim, tokens per frame, model dim, frames per segment."""

    heads: int
    head_dim: int
    tokens_per_frame: int
    dim: int
    frames_per_segment: int
    capacity: int = 64  # SparseKV ring size in frames

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Entry:
    """One memory of the roster: a factory (``None`` when unavailable, with ``why``)."""

    name: str
    make: Callable[[], Any] | None
    config: dict[str, Any]
    bounded: bool = True
    why: str | None = None

    @property
    def available(self) -> bool:
        return self.make is not None


FULL_HISTORY = "FullHistory (baseline)"
COMPOSED = "PromptBank+SparseKV"
LONGLIVE = "LongLive"


def _need(*names: str) -> str | None:
    missing = [n for n in names if not hasattr(memkit, n)]
    if missing:
        return f"not available yet: memkit has no {', '.join(missing)} in this checkout"
    return None


def roster(g: Geometry, *, full_history: bool = True) -> list[Entry]:
    """Every memory the suite measures, built for geometry ``g`` (fresh modules per call)."""
    h, d, t, f, c = g.heads, g.head_dim, g.tokens_per_frame, g.frames_per_segment, g.capacity
    entries: list[Entry] = []

    def add(name: str, needs: tuple[str, ...], config: dict[str, Any], make: Callable[[], Any]) -> None:
        why = _need(*needs)
        entries.append(Entry(name, None if why else make, config, why=why))

    add("NoMemory", ("NoMemory",), {}, lambda: memkit.NoMemory())
    add("FIFOMemory", ("FIFOMemory",), {"frames": 4 * f}, lambda: memkit.FIFOMemory(h, d, t, frames=4 * f))
    add(
        "SinkWindowMemory",
        ("SinkWindowMemory",),
        {"sink_frames": f, "window_frames": 3 * f},
        lambda: memkit.SinkWindowMemory(h, d, t, sink_frames=f, window_frames=3 * f),
    )
    add(
        LONGLIVE,
        ("SinkWindowMemory",),
        {"sink_frames": f, "window_frames": 2 * f},
        lambda: memkit.SinkWindowMemory(h, d, t, sink_frames=f, window_frames=2 * f),
    )

    def memflow(top_k: int | None) -> Callable[[], Any]:
        return lambda: memkit.MemFlowMemory(
            h, d, t, sink_frames=f, window_frames=2 * f, bank_frames=3, top_k=top_k, record_interval=3
        )

    for name, top_k in (("MemFlow NAM", None), ("MemFlow NAM+SMA", 3)):
        config = {"sink_frames": f, "window_frames": 2 * f, "bank_frames": 3, "top_k": top_k, "record_interval": 3}
        add(name, ("MemFlowMemory",), config, memflow(top_k))
    add(
        "SparseKVMemory",
        ("SparseKVMemory",),
        {"capacity": c, "top_k": 3 * f, "always_frames": f},
        lambda: memkit.SparseKVMemory(h, d, t, capacity=c, top_k=3 * f, always_frames=f),
    )
    add(
        "PromptBankMemory",
        ("PromptBankMemory",),
        {"bank_frames": 3},
        lambda: memkit.PromptBankMemory(h, d, t, bank_frames=3),
    )
    k_routed = max(1, 3 * f - 3)
    add(
        COMPOSED,
        ("PromptBankMemory", "SparseKVMemory", "compose"),
        {"bank_frames": 3, "capacity": c, "top_k": k_routed, "always_frames": f},
        lambda: memkit.compose(
            memkit.PromptBankMemory(h, d, t, bank_frames=3),
            memkit.SparseKVMemory(h, d, t, capacity=c, top_k=k_routed, always_frames=f),
        ),
    )
    # issue 14's memories, at LongLive's budget where they have one (MemRoPE: sink + 2 averages + window)
    add(
        "CompressedWindowMemory",
        ("CompressedWindowMemory",),
        {"sink_frames": f, "window_frames": max(1, 2 * f - 2)},
        lambda: memkit.CompressedWindowMemory(h, d, t, sink_frames=f, window_frames=max(1, 2 * f - 2)),
    )
    add(
        "PackedHistoryMemory",
        ("PackedHistoryMemory",),
        {"frames_per_level": f, "levels": 3},
        lambda: memkit.PackedHistoryMemory(h, d, t, frames_per_level=f, levels=3),
    )
    add(
        "SparseKVMemory int8",
        ("SparseKVMemory", "quantized"),
        {"capacity": c, "top_k": 3 * f, "always_frames": f, "quantized": "int8"},
        lambda: memkit.quantized(memkit.SparseKVMemory(h, d, t, capacity=c, top_k=3 * f, always_frames=f)),
    )
    entries.append(
        Entry(
            "PoseRetrievalMemory",
            None,
            {},
            why="needs per-frame metadata (a camera pose) that the cost hosts do not pass; scored in the swap section",
        )
    )
    add(
        "RecurrentMemory",
        ("RecurrentMemory",),
        {"slots": t},
        lambda: memkit.RecurrentMemory(g.dim, h, d, slots=t),
    )
    if full_history:
        entries.append(Entry(FULL_HISTORY, lambda: FullHistoryMemory(h, d), {}, bounded=False))
    return entries


def describe(entries: list[Entry]) -> dict[str, Any]:
    """The roster as plain data for results.json."""
    return {e.name: {"config": e.config, "bounded": e.bounded, "available": e.available, "why": e.why} for e in entries}
