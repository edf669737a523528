"""Interchangeability: a model trained with one memory, evaluated with another (issue 14).

memkit's frame memories share one key/value format (keys before rotary, one position per
frame), so a memory can be swapped into weights trained with another one
(``MALTNetwork.with_memory``). This section measures whether that works: for each bundled
checkpoint (the weights) and each memory swapped in at inference (no training), the PSNR of
the frames it generates at 1x and 4x the trained length on the revisit world, and its place
recall at 4x, on procedural canvases and on photographs no model trained on. The weights'
own memory, NoMemory and a flat grey frame are the references on the same clips.
"""

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Section
from benchmarks.length import _first_memory, candidate_checkpoints, later_memories
from benchmarks.markdown import skipped

CANVASES = ("procedural", "photos")
AS_TRAINED = "as trained"


@dataclasses.dataclass
class SwapSettings:
    """What the section measures: ``seeds`` clips per evaluation path family and canvas kind."""

    multiple: int = 4
    seeds: int = 1
    steps: int = 8
    quick: bool = False  # one checkpoint, two memories, procedural canvases only (a smoke run)
    only: tuple[str, ...] | None = None  # measure only these swapped memories (labels of eval_with)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def eval_with(places: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Memories to swap in: ``{label: spec}`` (``places``: the sweep's frames, the sink of the sink memories)."""
    specs: dict[str, dict[str, Any]] = {
        "fifo 3": {"name": "fifo", "kwargs": {"frames": 3}},
        f"sink_window {places}+4": {"name": "sink_window", "kwargs": {"sink_frames": places, "window_frames": 4}},
    }
    if quick:
        return specs
    later = later_memories(places)  # the memories the length section also scores, at the same sizes
    specs.update(
        {
            "sparse_kv C16 k4": {"name": "sparse_kv", "kwargs": {"capacity": 16, "top_k": 4}},
            f"sparse_kv C16 k4 A{places}": {
                "name": "sparse_kv",
                "kwargs": {"capacity": 16, "top_k": 4, "always_frames": places},
            },
            f"compressed_window {places}+4": later[f"compressed_window {places}+4"],
            "compressed_window 0+4": {
                "name": "compressed_window",
                "kwargs": {"sink_frames": 0, "window_frames": 4, "pool": "token"},
            },
            "packed_history F8 L2": later["packed_history F8 L2"],
            "pose_retrieval C40 k4": later["pose_retrieval C40 k4"],
            f"quantized sparse_kv C16 k4 A{places}": later[f"quantized sparse_kv C16 k4 A{places}"],
            # the published settings (issue 16), at one-frame segments: LongLive's 12-frame budget is
            # sink 3 + the frame being generated + 8 past; MemFlow's release defaults
            "LongLive 3+8": {"name": "sink_window", "kwargs": {"sink_frames": 3, "window_frames": 8}},
            "MemFlow NAM": {"name": "memflow", "kwargs": {"top_k": None}},
            "MemFlow NAM+SMA": later["MemFlow NAM+SMA"],
            "recurrent 32": {"name": "recurrent", "kwargs": {"slots": 32}},
        }
    )
    return specs


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:12]


def swap_section(st: SwapSettings) -> Section:
    """Every bundled sweep-world checkpoint x every memory swapped in, at 1x and 4x the trained length."""
    sec = Section("swap", "Interchangeability: trained with one memory, evaluated with another")
    try:
        from memkit.data import EVAL_PATHS, TEST_PHOTOS
        from memkit.models.malt import MALTNetwork
        from memkit.train import TrainConfig
        from memkit.train.long_eval import evaluate_long, trained_length
    except ImportError as err:  # pragma: no cover - the backbone ships with memkit
        sec.skip(f"skipped: not available yet: the backbone or the long evaluation ({err})")
        return sec
    loaded = []
    for path in candidate_checkpoints():
        tc_path = path / "train_config.json"
        if not tc_path.is_file():
            continue
        tc = TrainConfig.load(tc_path)
        net = MALTNetwork.from_pretrained(path).eval()
        if tc.data.kwargs.get("path") is None or net.config.frames_per_segment != 1:
            sec.notes.append(f"skipped {path.name}: not trained on a sweep path family with one-frame segments")
            continue
        loaded.append((path, net, tc))
    loaded.sort(key=lambda x: x[1].config.memory.name != "sparse_kv")
    if st.quick:
        loaded = loaded[:1]
    if not loaded:
        sec.skip("skipped: no bundled checkpoint trained on a sweep path family")
        return sec
    families = EVAL_PATHS[:1] if st.quick else EVAL_PATHS
    seeds = tuple(100_000 + i for i in range(st.seeds))
    checkpoints = []
    for path, net, tc in loaded:
        world = dict(tc.data.kwargs)
        places = int(world.get("places", 8))
        L = trained_length(tc)
        specs = eval_with(places, st.quick)
        if st.only is not None:
            specs = {k: v for k, v in specs.items() if k in st.only}
        if net.config.positions != "pose":
            specs = {k: v for k, v in specs.items() if v["name"] != "pose_retrieval"}
        variants = {k: {**v, "layers": net.config.memory.layers} for k, v in specs.items()}
        own = net.config.memory.name
        trained_repr = repr(_first_memory(net))
        for k in [k for k, v in variants.items() if repr(_first_memory(net.with_memory(v))) == trained_repr]:
            del variants[k]  # the trained memory itself: its row is "as trained"
        t0, cpu0 = time.time(), time.process_time()
        for kind in ("procedural",) if st.quick else CANVASES:
            sources = ("procedural",) if kind == "procedural" else TEST_PHOTOS
            print(f"swap: {path.name} ({own}) on {kind}: {len(variants) + 3} memories", flush=True)
            res = evaluate_long(
                net,
                name=AS_TRAINED,
                trained_length=L,
                world={**world, "sources": sources},
                multiple=st.multiple,
                families=families,
                seeds=seeds,
                steps=st.steps,
                references=("none", "grey"),
                variants=variants,
            )
            for label, r in res.items():
                for bucket in (1, st.multiple):
                    params = {"weights": path.name, "evaluated": label, "canvas": kind, "bucket": f"{bucket}x"}
                    sec.add("psnr", _num(r.at(bucket)), "dB", params=params)
                    if r.recall is not None:
                        sec.add("recall", _num(r.at(bucket, "recall")), "fraction", params=params)
                sec.add("state_bytes", r.state_bytes, "B", params={"weights": path.name, "evaluated": label})
        checkpoints.append(
            {
                "weights": path.name,
                "memory": own,
                "sha256": _digest(path),
                "trained_length": L,
                "seconds": round(time.time() - t0, 1),
                "cpu_seconds": round(time.process_time() - cpu0, 1),
            }
        )
    sec.config = {
        "checkpoints": checkpoints,
        "multiple": st.multiple,
        "families": list(families),
        "clip_seeds": list(seeds),
        "steps": st.steps,
        "memories": {k: v for k, v in eval_with(8, st.quick).items()},
    }
    return sec


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 3)


def _get(sec: dict[str, Any], name: str, **params: Any) -> float | None:
    for f in sec.get("figures", []):
        if f["name"] == name and all(f["params"].get(k) == v for k, v in params.items()):
            return f["value"]
    return None


def _label(label: str) -> str:
    return AS_TRAINED if label.endswith("(as trained)") else label  # results recorded before the rename


def _cells(sec: dict[str, Any], w: str, label: str, m: int) -> list[tuple[float | None, ...]]:
    """(procedural, photos) of PSNR 1x, PSNR mx, recall mx for one weights and one memory."""
    out = []
    for name, bucket in (("psnr", "1x"), ("psnr", f"{m}x"), ("recall", f"{m}x")):
        out.append(
            tuple(
                next(
                    (
                        f["value"]
                        for f in sec["figures"]
                        if f["name"] == name
                        and _label(f["params"]["evaluated"]) == label
                        and f["params"]["weights"] == w
                        and f["params"]["canvas"] == c
                        and f["params"]["bucket"] == bucket
                    ),
                    None,
                )
                for c in CANVASES
            )
        )
    return out


def _show(vals: tuple[float | None, ...], digits: int) -> str:
    if all(v is None for v in vals):
        return "-"
    return " / ".join("-" if v is None else (f"{v:.{digits}f}" if digits else f"{v:.0%}") for v in vals)


def render_swap(add: Callable[[str], None], sec: dict[str, Any] | None) -> None:
    """The interchangeability table: one row per memory swapped in, one column group per weights."""
    if skipped(add, sec, "Interchangeability") or sec is None:
        return
    add("## Interchangeability")
    add("")
    cfg = sec["config"]
    m = cfg["multiple"]
    add(
        "Which memories can be swapped into a trained model at inference, without retraining "
        "(`MALTNetwork.with_memory`)? Each bundled checkpoint (the weights) generates "
        f"{m}x its trained length on the revisit world with each memory in turn; PSNR (dB) at 1x and "
        f"{m}x the trained length, and place recall at {m}x, as procedural / photographs no model trained on. "
        f"Clips: {len(cfg['clip_seeds'])} per evaluation path family ({', '.join(cfg['families'])}) and "
        f'canvas kind; {cfg["steps"]} Euler steps a frame. "as trained": the weights\' own memory; '
        '"= as trained": the swapped memory is the trained one (same configuration).'
    )
    add("")
    weights = [c["weights"] for c in cfg["checkpoints"]]
    own = {c["weights"]: c["memory"] for c in cfg["checkpoints"]}
    labels = [AS_TRAINED, "none", "grey"]
    for f in sec["figures"]:
        if f["name"] == "psnr" and _label(f["params"]["evaluated"]) not in labels:
            labels.append(_label(f["params"]["evaluated"]))
    header = ["evaluated with"]
    for w in weights:
        header += [f"{w} ({own[w]}) weights: 1x", f"{m}x", f"recall {m}x"]
    add("| " + " | ".join(header) + " |")
    add("|" + "---|" * len(header))
    works: dict[str, list[str]] = {w: [] for w in weights}
    fails: dict[str, list[str]] = {w: [] for w in weights}
    for label in labels:
        row = [label]
        for w in weights:
            cells, trained = _cells(sec, w, label, m), _cells(sec, w, AS_TRAINED, m)
            floor = [max(a or -math.inf, b or -math.inf) for a, b in zip(*(c[1] for c in (
                _cells(sec, w, "none", m), _cells(sec, w, "grey", m))), strict=True)]  # fmt: skip
            if label != AS_TRAINED and cells == trained and any(v is not None for v in cells[0]):
                row += ["= as trained"] * 3
                continue
            row += [_show(cells[0], 1), _show(cells[1], 1), _show(cells[2], 0)]
            if label in (AS_TRAINED, "none", "grey") or any(v is None for v in cells[1]):
                continue
            (works if all(v >= f + 3.0 for v, f in zip(cells[1], floor, strict=True)) else fails)[w].append(label)  # type: ignore[operator]
        add("| " + " | ".join(row) + " |")
    add("")
    for w in weights:
        add(
            f"Into `{w}`'s weights ({own[w]}), {len(works[w])} of {len(works[w]) + len(fails[w])} swapped memories "
            f"beat max(none, grey) by 3 dB at {m}x on both canvas kinds"
            + (f": {', '.join(works[w])}" if works[w] else "")
            + (f"; not: {', '.join(fails[w])}." if fails[w] else ".")
        )
        add("")
    add(
        "Reading it: the frame memories (FIFO, sink + window, SparseKV, CompressedWindow, PackedHistory, "
        "PoseRetrieval, their int8 forms) share one key/value format and no parameters, so any of them runs in "
        "weights trained with another; what decides quality past the trained length is which frames they hand "
        "attention (a sink that holds the context sweep, retrieval by pose), more than the rule the weights "
        "were trained with. The published settings (LongLive's sink 3 + window 8, MemFlow's NAM and NAM+SMA) "
        "keep recent frames and fall off at 4x like the trained SparseKV. Weights trained with RecurrentMemory "
        "lean on what its slots learned to hold: frame memories swapped in work there only as far as the "
        "backbone still reads frame keys (the bundled one started from the SparseKV checkpoint's weights), and a "
        "RecurrentMemory swapped into weights that never trained it brings untrained parameters."
    )
    for c in cfg["checkpoints"]:
        add("")
        add(
            f"`{c['weights']}` (model.safetensors sha256 {c['sha256']}…, trained with {c['memory']}, "
            f"L = {c['trained_length']}): measured in {c['seconds']:.0f} s."
        )
    add("")
