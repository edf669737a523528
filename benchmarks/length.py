"""Quality along length and revisit lag (issue 11): does memory hold at 2x, 4x and 8x the trained length?

For every checkpoint trained on the revisit world's sweep path families
(``MEMKIT_BENCH_CHECKPOINT``, else the bundled ``memkit/assets/demo-*``), one
:func:`memkit.train.long_eval.evaluate_long` call scores it on the evaluation-only path
families (:data:`memkit.data.EVAL_PATHS`): the context is the sweep over the canvas, the
model generates ``multiple x L`` frames (``L``, the trained length), and every frame is
scored against the truth (PSNR, SSIM, place recall) and filed by length bucket (1x = frames
``1 .. L``, 2x = ``L+1 .. 2L``, 4x = ``2L+1 .. 4L``, 8x = ``4L+1 .. 8L``) and by revisit lag.
Clips use procedural canvases and the photographs no model trained on
(:data:`memkit.data.TEST_PHOTOS`), all in one batch.

References on the same weights and clips: ``none`` (the memory replaced by NoMemory),
``grey`` (a flat frame of the context's mean colour) and ``full history`` (a FIFO holding
every frame of the clip; only on the checkpoint whose memory stores frames).

Quality per byte: on that checkpoint's weights, frame memories of several sizes are
swapped in (``evaluate_long(variants=...)``: FIFO, sink + window, SparseKV), and each point
of the plot is one memory and size: PSNR at 4x against the bytes of its state per stream.

The targets of issue 11 are judged at 4x here (:func:`length_targets`) and listed with the
suite's others; a quick run scores up to 2x and judges them there, saying so.
"""

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, Section, checkpoint_folders
from benchmarks.markdown import fmt, image, notes, skipped, table

#: The bucket the targets are judged at (a run shorter than that judges its longest bucket).
TARGET_MULTIPLE = 4

#: Targets of issue 11: key -> (what, op, threshold, unit).
TARGETS: dict[str, tuple[str, str, float, str]] = {
    "bounded_vs_floor": ("best bounded memory - max(none, grey)", ">=", 6.0, "dB"),
    "full_vs_grey": ("full history - grey", ">=", 6.0, "dB"),
    "full_minus_bounded": ("full history - best bounded memory", "<=", 1.0, "dB"),
    "recurrent_vs_floor": ("RecurrentMemory - max(none, grey)", ">=", 3.0, "dB"),
    "recurrent_recall_pauses": ("RecurrentMemory place recall on the 'pauses' family", ">=", 0.80, "fraction"),
}
CANVASES: tuple[tuple[str, bool], ...] = (("procedural", False), ("photos", True))
_CANVAS_WORDS = {"procedural": "procedural canvases", "photos": "photographs no model trained on"}


def _variants(places: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Frame memories of several sizes to swap into the frame-memory checkpoint's weights."""
    out: dict[str, dict[str, Any]] = {}
    for frames in (3,) if quick else (3, 8, 16):
        out[f"fifo {frames}"] = {"name": "fifo", "kwargs": {"frames": frames}}
    for window in (2,) if quick else (2, 4, 8):
        out[f"sink_window {places}+{window}"] = {
            "name": "sink_window",
            "kwargs": {"sink_frames": places, "window_frames": window},
        }
    for capacity, always in ((4, 0),) if quick else ((4, 0), (8, 0), (16, 0), (4, places), (8, places), (16, places)):
        out[f"sparse_kv C{capacity} A{always} k4"] = {
            "name": "sparse_kv",
            "kwargs": {"capacity": capacity, "top_k": 4, "always_frames": always},
        }
    if not quick:
        out.update(later_memories(places))
    return out


def later_memories(places: int) -> dict[str, dict[str, Any]]:
    """The memories issue 14 added (and MemFlow's as released), at the sizes the swap section uses."""
    return {
        f"compressed_window {places}+4": {
            "name": "compressed_window",
            "kwargs": {"sink_frames": places, "window_frames": 4, "pool": "token"},
        },
        "packed_history F8 L2": {
            "name": "packed_history",
            "kwargs": {"frames_per_level": 8, "levels": 2, "frame_shape": (4, 4)},
        },
        "pose_retrieval C40 k4": {"name": "pose_retrieval", "kwargs": {"meta_dim": 1, "capacity": 40, "top_k": 4}},
        f"quantized sparse_kv C16 k4 A{places}": {
            "name": "quantized",
            "kwargs": {
                "memory": {"name": "sparse_kv", "kwargs": {"capacity": 16, "top_k": 4, "always_frames": places}}
            },
        },
        "MemFlow NAM+SMA": {"name": "memflow", "kwargs": {}},
    }


@dataclasses.dataclass
class LengthSettings:
    """What the section measures.

    ``seeds`` clips per path family; their canvases take in turn ``procedural`` copies of
    the procedural canvas and then each of :data:`memkit.data.TEST_PHOTOS` (the default,
    ``procedural + 4`` seeds, gives every family each test photograph once).
    """

    multiple: int = 8
    seeds: int | None = None  # default: one per source, so every family sees every source
    procedural: int = 2
    steps: int = 8
    variants: bool = True  # swap the frame memories of several sizes into the frame-memory checkpoint
    quick_variants: bool = False  # only one size per kind (a smoke run)
    only: tuple[str, ...] = ()  # only these variants, no references (a run to merge into an earlier one)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- checkpoints


def candidate_checkpoints() -> list[Path]:
    """``$MEMKIT_BENCH_CHECKPOINT`` (folders, ``os.pathsep``-separated, each a checkpoint or a folder of
    them) when set, else the bundled ``memkit/assets/demo-*``."""
    env = os.environ.get("MEMKIT_BENCH_CHECKPOINT")
    roots = (
        [Path(x) for x in env.split(os.pathsep) if x] if env else sorted((ROOT / "memkit" / "assets").glob("demo-*"))
    )
    return checkpoint_folders(roots)


def _why_not(path: Path, tc: Any, cfg: Any) -> str | None:
    """Why ``path`` cannot be scored along length (``None`` when it can)."""
    from memkit.data import PATH_FAMILIES

    if tc is None:
        return "no train_config.json, so its world and trained length are unknown"
    path_family = dict(tc.data.kwargs).get("path", "out_and_back")
    if tc.data.world != "revisit" or path_family not in PATH_FAMILIES:
        return (
            f"trained on the {tc.data.world} world with path {path_family!r}, not on a sweep path family "
            f"({', '.join(PATH_FAMILIES)})"
        )
    if cfg.frames_per_segment != 1:
        return f"{cfg.frames_per_segment} frames per segment (the length evaluation scores one-frame segments)"
    if cfg.action_dim not in (0, 4):
        return f"{cfg.action_dim}-d actions (the sweep clips give motion + pose, 4-d)"
    return None


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _window(memory: Any) -> int | None:
    """Recent frames a memory holds (FIFO/sink window, SparseKV ring); ``None`` when it holds no frames."""
    if memory is None:
        return None
    if hasattr(memory, "window_frames"):
        return int(memory.window_frames)
    if hasattr(memory, "capacity"):
        return int(memory.capacity)
    return None


def _sink(memory: Any) -> int:
    return int(getattr(memory, "sink_frames", getattr(memory, "always_frames", 0)) or 0)


def _spec_text(spec: Any) -> str:
    """``name {kwargs}`` of a memory spec, on one line (a module's repr spans many)."""
    kwargs = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
    return f"{spec.name}({kwargs})"


def _first_memory(net: Any) -> Any:
    layers = net.config.memory_layers()
    return net.blocks[layers[0]].attn.memory if layers else None


# --------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class _Scored:
    label: str
    weights: str
    kind: str  # "trained", "reference", "variant"
    memory: str  # memory name: "sparse_kv", "fifo", "none", "grey", "full", "recurrent", ...
    result: Any  # LongResult
    state_bytes: int | None  # per stream; None for grey (no state)
    window: int | None
    sink: int
    places: int


def length_section(st: LengthSettings) -> Section:
    """Score every sweep-world checkpoint along length and lag, with the references and the swapped sizes."""
    sec = Section("length", "Quality along length and revisit lag")
    try:
        from memkit.data import EVAL_PATHS, TEST_PHOTOS
        from memkit.models.malt import MALTNetwork
        from memkit.train import TrainConfig
        from memkit.train.long_eval import FRAME_MEMORIES, LAG_BUCKETS, evaluate_long, trained_length
    except ImportError as err:
        sec.skip(f"skipped: not available yet: the backbone or the long evaluation ({err})")
        return sec
    try:
        import pytorch_msssim  # noqa: F401  (SSIM)
    except ImportError:
        sec.skip("skipped: pytorch_msssim is not installed (pip install 'memkit-video[video]'), so no SSIM")
        return sec
    env = os.environ.get("MEMKIT_BENCH_CHECKPOINT")
    candidates = candidate_checkpoints()
    loaded: list[tuple[Path, Any, Any]] = []
    for path in candidates:
        net = MALTNetwork.from_pretrained(path).eval()
        tc_path = path / "train_config.json"
        tc = TrainConfig.load(tc_path) if tc_path.is_file() else None
        why = _why_not(path, tc, net.config)
        if why:
            sec.notes.append(f"skipped {_rel(path)}: {why}")
        else:
            loaded.append((path, net, tc))
    if not loaded:
        where = "MEMKIT_BENCH_CHECKPOINT" if env else "memkit/assets/demo-*"
        sec.skip(
            f"skipped: no checkpoint trained on a sweep path family under {where} "
            f"({len(candidates)} checkpoint(s) looked at; each is named in a note above with the reason)"
        )
        return sec
    # the frame-memory checkpoint hosts the full-history reference and the swapped sizes
    frame_nets = [x for x in loaded if x[1].config.memory.name in FRAME_MEMORIES and x[1].config.memory.name != "none"]
    frame_nets.sort(key=lambda x: x[1].config.memory.name != "sparse_kv")
    host = frame_nets[0][0] if frame_nets else None
    if host is None:
        sec.notes.append("skipped full history and the swapped sizes: no checkpoint trained with a frame memory")
    loaded.sort(key=lambda x: x[0] != host)  # the host's memories head the tables
    sources = ("procedural",) * st.procedural + tuple(TEST_PHOTOS)
    n_seeds = st.seeds or len(sources)
    seeds = tuple(100_000 + i for i in range(n_seeds))
    at = min(TARGET_MULTIPLE, st.multiple)
    scored: list[_Scored] = []
    checkpoints: list[dict[str, Any]] = []
    for path, net, tc in loaded:
        from memkit import state_nbytes

        weights = path.name
        mem = net.config.memory.name
        L = trained_length(tc)
        world = dict(tc.data.kwargs)
        places = int(world.get("places", 8))
        is_host = path == host
        if st.only and not is_host:
            continue
        refs: tuple[str, ...] = (
            ("grey",) if mem == "none" else (("none", "grey", "full") if is_host else ("none", "grey"))
        )
        variants = _variants(places, st.quick_variants) if is_host and st.variants else {}
        if st.only:
            variants = {k: v for k, v in variants.items() if k in st.only}
            refs = ()
        # a size equal to the trained memory is the trained memory: not run twice
        trained_repr = repr(_first_memory(net))
        same = [k for k, spec in variants.items() if repr(_first_memory(net.with_memory(spec))) == trained_repr]
        for k in same:
            del variants[k]
        n = st.multiple * L
        t0, cpu0 = time.time(), time.process_time()
        print(
            f"length: {weights} ({mem}, L = {L}): {1 + len(refs) - ('grey' in refs) + len(variants)} memories x "
            f"{len(EVAL_PATHS) * n_seeds} clips x {n} frames",
            flush=True,
        )
        specs = {k: {**v, "layers": net.config.memory.layers} for k, v in variants.items()}
        res = evaluate_long(
            net,
            name=mem,
            trained_length=L,
            world={**world, "sources": sources},
            multiple=st.multiple,
            families=EVAL_PATHS,
            seeds=seeds,
            steps=st.steps,
            references=refs,
            variants=specs,
        )
        seconds, cpu = time.time() - t0, time.process_time() - cpu0
        checkpoints.append(
            {
                "path": _rel(path),
                "weights": weights,
                "memory": mem,
                "memory_config": _spec_text(net.config.memory),
                "trained_length": L,
                "places": places,
                "world": {k: v for k, v in world.items() if k != "sources"},
                "generated_frames": n,
                "references": list(refs),
                "variants": {k: v["kwargs"] for k, v in variants.items()},
                "variants_equal_to_trained": same,
                "seconds": round(seconds, 1),
                "cpu_seconds": round(cpu, 1),
            }
        )
        for label, r in res.items():
            if label == mem:
                kind, name, model = "trained", f"{mem} (trained)", net
            elif label in ("none", "grey", "full"):
                kind, name = "reference", {"none": "none", "grey": "grey", "full": "full history"}[label]
                model = net.with_memory("none") if label == "none" else None
            else:
                kind, name, model = "variant", label, net.with_memory(specs[label])
            if label == "full":
                full4 = {"name": "fifo", "kwargs": {"frames": places + at * L}, "layers": net.config.memory.layers}
                nbytes: int | None = state_nbytes(net.with_memory(full4).init_states(1))
                window, sink = None, 0
            elif model is None:
                nbytes, window, sink = None, None, 0
            else:
                nbytes = state_nbytes(model.init_states(1))
                first = _first_memory(model)
                window, sink = _window(first), _sink(first)
            memory = {"trained": mem, "variant": str(specs.get(label, {}).get("name"))}.get(kind, label)
            scored.append(_Scored(name, weights, kind, memory, r, nbytes, window, sink, places))
    sec.config = {
        "settings": st.to_dict(),
        "checkpoints": checkpoints,
        "host": None if host is None else host.name,
        "families": list(EVAL_PATHS),
        "sources": list(sources),
        "seeds": list(seeds),
        "clips_per_memory": len(EVAL_PATHS) * n_seeds,
        "clips_procedural": sum(1 for s in scored[0].result.sources if s == "procedural"),
        "clips_photos": sum(1 for s in scored[0].result.sources if s != "procedural"),
        "sampler_steps": st.steps,
        "multiple": st.multiple,
        "target_multiple": at,
        "buckets": {
            f"{m}x": "generated frames 1..L" if m == 1 else f"generated frames {m // 2 if m > 2 else ''}L+1..{m}L"
            for m in (1, 2, 4, 8)
            if m <= st.multiple
        },
        "lag_buckets": [f"{lo + 1}-{hi}" if hi < 1 << 30 else f">{lo}" for lo, hi in LAG_BUCKETS],
        "protocol": "the sweep over the canvas (P frames, one per place) is the context, written through the clean "
        "pass; the model generates multiple x L frames along an evaluation-only path; every generated frame shows "
        "a place the sweep showed and is scored against the truth (PSNR peak-to-peak 2, SSIM on [0, 1], place "
        "recall: its nearest context frame shows its place)",
        "state_bytes": "bytes of one stream's memory states (init_states(1): every bounded state has its final "
        "size from the start); full history: what it holds at the end of the target bucket "
        f"(P + {at}L frames)",
    }
    for s in scored:
        _record(sec, s, st.multiple, at)
    if not st.only:  # a partial run to merge: its references (and so its targets) are in the earlier run
        _judge(sec, scored, at)
    sec.series = {
        "memories": {
            f"{s.label} [{s.weights}]": {
                "label": s.label,
                "weights": s.weights,
                "kind": s.kind,
                "memory": s.memory,
                "state_bytes": s.state_bytes,
                "window": s.window,
                "sink": s.sink,
                "by_length": {
                    canv: {
                        f"{m}x": _num(s.result.at(m, "psnr", photos=photos)) for m in (1, 2, 4, 8) if m <= st.multiple
                    }
                    for canv, photos in CANVASES
                },
                "by_lag": [[lab, v, k] for lab, v, k in s.result.by_lag("psnr")],
            }
            for s in scored
        }
    }
    return sec


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _record(sec: Section, s: _Scored, multiple: int, at: int) -> None:
    """Figures of one scored memory: per length bucket, per family, per lag bucket, bytes."""
    r = s.result
    base = {"memory": s.label, "weights": s.weights, "kind": s.kind}
    units = {"psnr": "dB", "ssim": "ssim", "recall": "fraction"}
    for m in (1, 2, 4, 8):
        if m > multiple:
            continue
        for canv, photos in CANVASES:
            for metric, unit in units.items():
                v = r.at(m, metric, photos=photos)
                if math.isfinite(v):
                    sec.add(metric, v, unit, params={**base, "bucket": f"{m}x", "canvases": canv})
    for family in sorted(set(r.families)):
        for metric in ("psnr", "recall"):
            v = r.at(at, metric, family)
            if math.isfinite(v):
                sec.add(f"{metric}_family", v, units[metric], params={**base, "bucket": f"{at}x", "family": family})
    for lab, v, k in r.by_lag("psnr"):
        sec.add("psnr_lag", v, "dB", params={**base, "lag": lab}, frames=k)
    if s.window is not None:
        # inside the memory's recent frames (window or ring) vs beyond them
        lags, psnr = r.lags, r.psnr.astype(np.float64)
        for name, sel in (
            ("psnr_within_window", (lags > 0) & (lags <= s.window)),
            ("psnr_beyond_window", lags > s.window),
        ):
            if sel.any():
                sec.add(name, float(psnr[sel].mean()), "dB", params={**base, "window": s.window}, frames=int(sel.sum()))
    if s.state_bytes is not None:
        sec.add("state_bytes", float(s.state_bytes), "bytes", params=base)
    if s.kind != "reference" or s.label != "grey":
        sec.add("ms_per_frame", r.ms_per_frame, "ms", params={**base, "batch": int(r.psnr.shape[0])})


def _judge(sec: Section, scored: list[_Scored], at: int) -> None:
    """The targets of issue 11 at bucket ``at``, per canvas kind, as figures with a verdict."""

    def find(weights: str, label: str) -> _Scored | None:
        return next((s for s in scored if s.weights == weights and s.label == label), None)

    def floor(s: _Scored, photos: bool) -> tuple[float, float, float]:
        none, grey = find(s.weights, "none"), find(s.weights, "grey")
        n = none.result.at(at, photos=photos) if none else float("nan")
        g = grey.result.at(at, photos=photos) if grey else float("nan")
        return max(x for x in (n, g) if math.isfinite(x)), n, g

    def verdict(key: str, canv: str, value: float, detail: str, **params: Any) -> None:
        what, op, threshold, unit = TARGETS[key]
        if not math.isfinite(value):
            sec.notes.append(f"skipped target {what} ({canv}): not measurable ({detail})")
            return
        holds = value >= threshold if op == ">=" else value <= threshold
        sec.add(
            "target",
            value,
            unit,
            params={"target": key, "canvases": canv, "bucket": f"{at}x", **params},
            op=op,
            threshold=threshold,
            holds=holds,
            detail=detail,
        )

    bounded = [s for s in scored if s.kind in ("trained", "variant") and s.memory != "none"]
    full = next((s for s in scored if s.label == "full history"), None)
    recurrent = [s for s in bounded if s.memory == "recurrent" and s.kind == "trained"]
    where = f"at {at}x"
    for canv, photos in CANVASES:
        best = max(bounded, key=lambda s: _finite_or(s.result.at(at, photos=photos)), default=None)
        f = full.result.at(at, photos=photos) if full else float("nan")
        if best is not None:
            b = best.result.at(at, photos=photos)
            fl, n, g = floor(best, photos)
            cause = (
                "Full history on the frame-memory weights reaches only "
                f"{f:.2f} dB, so the limit is the backbone (finding the place in memory and copying it), not how "
                "much the memory holds."
                if full and f - fl < TARGETS["bounded_vs_floor"][2]
                else f"Full history reaches {f:.2f} dB, so the bounded memories lose what they no longer hold: see "
                "the lag table."
                if full
                else ""
            )
            verdict(
                "bounded_vs_floor",
                canv,
                b - fl,
                f"{best.label} [{best.weights} weights] scored {b:.2f} dB {where}; none {n:.2f} dB, grey {g:.2f} dB. "
                + cause,
                memory=best.label,
            )
            if full:
                verdict(
                    "full_minus_bounded",
                    canv,
                    f - b,
                    f"full history {f:.2f} dB vs the best bounded memory, {best.label} [{best.weights} weights], "
                    f"{b:.2f} dB {where}.",
                    memory=best.label,
                )
        if full:
            fl, n, g = floor(full, photos)
            verdict(
                "full_vs_grey",
                canv,
                f - g,
                f"full history {f:.2f} dB vs grey {g:.2f} dB {where}: every frame of the clip is in its memory, so a "
                "shortfall is the backbone's (it does not find and copy the revisited place).",
            )
        for s in recurrent[:1]:
            v = s.result.at(at, photos=photos)
            fl, n, g = floor(s, photos)
            verdict(
                "recurrent_vs_floor",
                canv,
                v - fl,
                f"{s.label} [{s.weights}] {v:.2f} dB {where}; none on its weights {n:.2f} dB, grey {g:.2f} dB.",
            )
            rc = s.result.at(at, "recall", "pauses", photos)
            verdict(
                "recurrent_recall_pauses",
                canv,
                rc,
                f"{rc:.0%} of its generated frames {where} on 'pauses' clips have the right place as their nearest "
                f"context frame (chance: 1/{s.places} = {1 / s.places:.0%}).",
            )
    if not recurrent:
        sec.notes.append(
            "skipped the RecurrentMemory targets: no checkpoint trained with RecurrentMemory on a sweep path family"
        )
    if full is None:
        sec.notes.append("skipped the full-history targets: no checkpoint trained with a frame memory")


def _finite_or(x: float, default: float = -math.inf) -> float:
    return x if math.isfinite(x) else default


# --------------------------------------------------------------------------- targets


def _target_figure(sec: dict[str, Any] | None, key: str, canv: str) -> dict[str, Any] | None:
    for f in (sec or {}).get("figures", []):
        if f["name"] == "target" and f["params"].get("target") == key and f["params"].get("canvases") == canv:
            return f
    return None


def _missing(sec: dict[str, Any] | None, key: str) -> str:
    if sec is None:
        return "the length section did not run"
    if sec.get("status") == "skipped":
        return "; ".join(sec.get("notes", [])) or "the length section was skipped"
    topic = "RecurrentMemory" if key.startswith("recurrent") else "full-history" if "full" in key else "target"
    for note in sec.get("notes", []):
        if topic in note and note.startswith("skipped"):
            return note
    return f"not measured in this run (length: {sec.get('status')})"


def length_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's targets, one record per (target, canvas kind), in report.evaluate_targets' format."""
    sec = results["sections"].get("length")
    at = (sec or {}).get("config", {}).get("target_multiple", TARGET_MULTIPLE)
    out = []
    for key, (what, op, threshold, unit) in TARGETS.items():
        shown = f"{threshold:.0%}" if unit == "fraction" else f"{threshold:+g} dB"
        for canv, _ in CANVASES:
            fig = _target_figure(sec, key, canv)
            rec: dict[str, Any] = {
                "name": f"length {at}x, {canv}: {what}",
                "key": f"length_{key}",
                "target": f"{what} {op} {shown} at {at}x the trained length ({canv} canvases)",
                "op": op,
                "threshold": threshold,
                "value": None,
                "min": None,
                "max": None,
                "status": "not measured",
                "why": None,
                "what": what,
                "canvases": canv,
                "unit": unit,
            }
            if fig is None:
                rec["why"] = _missing(sec, key)
            else:
                value = float(fig["value"])
                holds = value >= threshold if op == ">=" else value <= threshold
                rec.update(value=value, status="holds" if holds else "falls short")
                if not holds:
                    rec["why"] = fig.get("detail") or what
            out.append(rec)
    return out


# --------------------------------------------------------------------------- plots

KIND_STYLE = {"trained": ("*", 11), "reference": ("s", 6), "variant": ("o", 5)}


def _line(m: dict[str, Any]) -> str:
    return {"grey": ":", "none": "-."}.get(m["memory"], "--" if m["kind"] == "reference" else "-")


def _plot_curve(ax: Any, m: dict[str, Any], pts: list[tuple[int, float]], colour_of: Any) -> None:
    """One memory's line: thick for the trained memory, faint for swapped-in sizes, grey for references."""
    ax.plot(
        [i for i, _ in pts],
        [y for _, y in pts],
        _line(m),
        marker="o",
        ms=3,
        lw=2.0 if m["kind"] == "trained" else 1.0,
        color="grey" if m["memory"] in ("grey", "none") else colour_of(m),
        alpha=1.0 if m["kind"] != "variant" else 0.6,
        label=f"{m['label']} [{m['weights']}]",
    )


def _lag_label(lab: str) -> str:
    """``"1-1"`` -> ``"1"``."""
    lo, _, hi = lab.partition("-")
    return lo if lo == hi else lab


def _group(m: dict[str, Any]) -> str:
    """One colour and one line per memory kind with or without a sink, per weights."""
    sink = f" + sink {m['sink']}" if m["sink"] and m["memory"] != "sink_window" else ""
    memory = f"sink_window (sink {m['sink']})" if m["memory"] == "sink_window" else m["memory"]
    return f"{memory}{sink} [{m['weights']} weights]"


def _tag(m: dict[str, Any]) -> str:
    """A short label for a point of the per-byte plot: its size."""
    if m["kind"] == "trained":
        return "as trained"
    if m["window"] is None:
        return ""
    return {"sink_window": f"+{m['window']}", "sparse_kv": f"C{m['window']}"}.get(m["memory"], str(m["window"]))


def _groups(sec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in sec.get("series", {}).get("memories", {}).values():
        if m["memory"] in ("grey", "none"):
            continue
        out.setdefault(_group(m), []).append(m)
    return out


def length_plots(sec: dict[str, Any] | None, save: Callable[[Any, str], None], plt: Any) -> None:
    """The section's plots: PSNR against state bytes, against length, against revisit lag."""
    if not sec or sec.get("status") == "skipped" or not sec.get("series", {}).get("memories"):
        return
    mems = list(sec["series"]["memories"].values())
    at = f"{sec['config']['target_multiple']}x"
    palette = plt.get_cmap("tab10").colors
    groups = _groups(sec)
    colour = {g: palette[i % len(palette)] for i, g in enumerate(groups)}

    def colour_of(m: dict[str, Any]) -> Any:
        return colour.get(_group(m), "k")

    floors = [m for m in mems if m["memory"] in ("grey", "none")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, (canv, _) in zip(axes, CANVASES, strict=True):
        for g, members in groups.items():
            points = sorted(
                (
                    (m["state_bytes"], m["by_length"][canv].get(at), m)
                    for m in members
                    if m["state_bytes"] and m["by_length"][canv].get(at) is not None
                ),
                key=lambda p: (p[0], p[1]),
            )
            if not points:
                continue
            label = "full history" if points[0][2]["label"] == "full history" else g
            ax.plot([p[0] for p in points], [p[1] for p in points], "-", color=colour[g], lw=0.8, alpha=0.6,
                    label=label)  # fmt: skip
            for x, y, m in points:
                marker, size = KIND_STYLE[m["kind"]]
                ax.plot([x], [y], marker, color=colour[g], ms=size)
                ax.annotate(_tag(m), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        drawn: set[float] = set()
        for m in floors:
            y = m["by_length"][canv].get(at)
            if y is None or (m["memory"] == "grey" and y in drawn):  # the same clips give the same grey
                continue
            drawn.add(y)
            label = "grey (the context's mean colour)" if m["memory"] == "grey" else f"none [{m['weights']} weights]"
            ax.axhline(y, color="grey", ls=_line(m), lw=1, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("memory state bytes per stream (log)")
        ax.set_title(_CANVAS_WORDS[canv], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"PSNR of the {at} bucket (dB)")
    fig.suptitle(f"Quality per byte: PSNR at {at} the trained length vs memory state bytes per stream", fontsize=10)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, "length_psnr_per_byte.png")

    buckets = [b for b in ("1x", "2x", "4x", "8x") if b in sec["config"]["buckets"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, (canv, _) in zip(axes, CANVASES, strict=True):
        for m in mems:
            ys = [m["by_length"][canv].get(b) for b in buckets]
            pts = [(i, y) for i, y in enumerate(ys) if y is not None]
            if not pts:
                continue
            _plot_curve(ax, m, pts, colour_of)
        ax.set_xticks(range(len(buckets)))
        ax.set_xticklabels(buckets)
        ax.set_xlabel("length bucket (multiples of the trained length L)")
        ax.set_title(f"PSNR along length ({_CANVAS_WORDS[canv]})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR of the frames in the bucket (dB)")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, "length_psnr_by_length.png")

    labels = sec["config"]["lag_buckets"]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for m in mems:
        got = {lab: v for lab, v, _ in m["by_lag"]}
        pts = [(i, got[lab]) for i, lab in enumerate(labels) if lab in got]
        if not pts:
            continue
        _plot_curve(ax, m, pts, colour_of)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([_lag_label(lab) for lab in labels])
    ax.set_xlabel("revisit lag: frames since the place was last on screen (context or generated)")
    ax.set_ylabel("PSNR (dB), every clip and length")
    ax.set_title("PSNR along revisit lag", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, "length_psnr_by_lag.png")


# --------------------------------------------------------------------------- Markdown


def render_length(add: Callable[[str], None], sec: dict[str, Any] | None, plots: list[str], image_dir: str) -> None:
    """The section of the benchmarks page."""
    title = "4c. Quality along length and revisit lag"
    if skipped(add, sec, title):
        return
    assert sec is not None
    cfg = sec["config"]
    at = f"{cfg['target_multiple']}x"
    figs = sec["figures"]
    add(f"## {title}\n")
    cks = "; ".join(
        f"`{c['path']}` ({c['memory']}: {c['memory_config']}; L = {c['trained_length']} generated frames, "
        f"P = {c['places']} places; measured in {c['seconds']:.0f} s, {c.get('cpu_seconds', 0):.0f} s of CPU)"
        for c in cfg["checkpoints"]
    )
    add(
        f"Does memory hold past the length the model trained on? Checkpoints: {cks}. Protocol: {cfg['protocol']}. "
        f"Clips: {cfg['clips_per_memory']} per memory ({cfg['clips_procedural']} on procedural canvases, "
        f"{cfg['clips_photos']} on photographs no model trained on), on the evaluation-only path families "
        f"{', '.join(cfg['families'])}; {cfg['sampler_steps']} Euler steps per frame; {cfg['multiple']}x the trained "
        "length generated. Length buckets: "
        + ", ".join(f"{k} = {v}" for k, v in cfg["buckets"].items())
        + ". References on the same weights and clips: none (NoMemory), grey (a flat frame of the context's mean "
        "colour), full history (a FIFO holding every frame of the clip). State bytes: " + cfg["state_bytes"] + ".\n"
    )
    add(f"**Targets of issue 11, at {at} the trained length**\n")
    rows = []
    for t in length_targets({"sections": {"length": sec}}):
        f = _target_figure(sec, t["key"].removeprefix("length_"), t["canvases"])
        value = (
            "-" if t["value"] is None else (f"{t['value']:.0%}" if t["unit"] == "fraction" else f"{t['value']:+.2f} dB")
        )
        verdict = {"holds": "holds", "falls short": "**falls short**", "not measured": "not measured"}[t["status"]]
        asks = f"{t['op']} {t['threshold']:.0%}" if t["unit"] == "fraction" else f"{t['op']} {t['threshold']:+g} dB"
        rows.append([t["what"], t["canvases"], asks, value, verdict, (f or {}).get("detail") or t["why"] or "-"])
    add(table(["target", "canvases", "asks", "measured", "verdict", "from"], rows) + "\n")
    image(add, plots, "length_psnr_per_byte.png", image_dir, f"PSNR at {at} vs state bytes")

    def get(name: str, m: dict[str, Any], **p: Any) -> dict[str, Any] | None:
        return next(
            (
                f
                for f in figs
                if f["name"] == name
                and f["params"].get("memory") == m["label"]
                and f["params"].get("weights") == m["weights"]
                and all(f["params"].get(k) == v for k, v in p.items())
            ),
            None,
        )

    def val(f: dict[str, Any] | None, unit: str = "") -> str:
        return "-" if f is None else fmt(float(f["value"]), unit)

    mems = []
    greys: list[Any] = []
    for m in sec["series"]["memories"].values():
        if m["memory"] == "grey":  # the same clips give the same grey: shown once
            if m["by_length"] in greys:
                continue
            greys.append(m["by_length"])
        mems.append(m)
    buckets = list(cfg["buckets"])
    photo_buckets = [at] + ([buckets[-1]] if buckets[-1] != at else [])
    rows = []
    for m in mems:
        rows.append(
            [
                m["label"],
                m["weights"],
                "-" if m["state_bytes"] is None else f"{m['state_bytes']:,}",
                *[val(get("psnr", m, bucket=b, canvases="procedural")) for b in buckets],
                *[val(get("psnr", m, bucket=b, canvases="photos")) for b in photo_buckets],
                val(get("ssim", m, bucket=at, canvases="procedural")),
                val(get("recall", m, bucket=at, canvases="procedural"), "fraction"),
                val(get("ms_per_frame", m)),
            ]
        )
    photo_cols = [f"PSNR {b} photos" for b in photo_buckets]
    add(
        table(
            [
                "memory",
                "weights",
                "state bytes / stream",
                *[f"PSNR {b}" for b in buckets],
                *photo_cols,
                f"SSIM {at}",
                f"recall {at}",
                "ms / frame (batch)",
            ],
            rows,
        )
        + "\n"
    )
    add(
        "PSNR in dB; columns without 'photos' are procedural canvases. Recall: share of generated frames whose "
        "nearest context frame shows their place (chance: 1/P). ms / frame: wall time per generated frame for the "
        f"whole batch of {cfg['clips_per_memory']} clips, on this run's threads.\n"
    )
    image(add, plots, "length_psnr_by_length.png", image_dir, "PSNR along length")
    image(add, plots, "length_psnr_by_lag.png", image_dir, "PSNR along revisit lag")
    lags = cfg["lag_buckets"]
    rows = []
    for m in mems:
        got = {lab: v for lab, v, _ in m["by_lag"]}
        held = "-" if m["window"] is None else (f"{m['window']}" + (f" + sink {m['sink']}" if m["sink"] else ""))
        rows.append(
            [
                m["label"],
                m["weights"],
                held,
                *[fmt(got[lab]) if lab in got else "-" for lab in lags],
                val(get("psnr_within_window", m)),
                val(get("psnr_beyond_window", m)),
            ]
        )
    frames = {lab: n for lab, _, n in mems[0]["by_lag"]} if mems else {}
    add(
        table(
            [
                "memory",
                "weights",
                "recent frames held",
                *[f"lag {_lag_label(lab)} ({frames.get(lab, 0)} fr.)" for lab in lags],
                "lag <= held",
                "lag > held",
            ],
            rows,
        )
        + "\n"
    )
    add(
        "PSNR (dB) of generated frames by revisit lag (frames since their place was last on screen, context or "
        "generated), over every clip and length. 'Recent frames held': a FIFO's or a sink+window's window, a "
        "SparseKV's ring (the sink, when there is one, holds the first frames written: the sweep, when it is as "
        "long as the sweep, so every place stays reachable). The last two columns split the frames at that size: "
        "a memory that only remembers what it holds falls off past it.\n"
    )
    families = sorted({f["params"]["family"] for f in figs if f["name"] == "psnr_family"})
    rows = []
    for m in mems:
        cells = []
        for fam in families:
            p, r = get("psnr_family", m, family=fam), get("recall_family", m, family=fam)
            cells.append(val(p) + ("" if r is None else f" ({fmt(float(r['value']), 'fraction')})"))
        rows.append([m["label"], m["weights"], *cells])
    add(f"**Per path family at {at}** (PSNR dB, place recall in parentheses; both canvas kinds)\n")
    add(table(["memory", "weights", *families], rows) + "\n")
    notes(add, sec)
