"""``python -m benchmarks run [--quick] [--out DIR] [--docs DIR | --no-docs] [--threads N] [--only ...]``.

Writes ``results.json``, PNG plots under ``plots/`` and ``benchmarks.md`` into ``--out``
(default ``benchmarks/results/``; ``benchmarks/results/quick/`` for ``--quick``, so a smoke run
never replaces the full run's results). A full run also regenerates the docs page
(``docs/benchmarks.md``, plots copied to ``docs/assets/benchmarks/``); a ``--quick`` run
never touches the docs unless ``--docs`` names a folder, so the smoke test leaves every
committed file alone. The run never fails because a target is missed; it exits non-zero
only when a section itself crashed.
"""

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (switches shape checking off before memkit is imported)

SECTIONS = ("cost_layer", "cost_backbone", "overhead", "wan", "attend", "sparse", "quality", "length", "swap", "scenes")


def plan(quick: bool) -> dict[str, Any]:
    """Every setting of a run, quick or full."""
    from benchmarks.attend import AttendSettings
    from benchmarks.cost import StreamSettings
    from benchmarks.length import LengthSettings
    from benchmarks.overhead import OverheadSettings
    from benchmarks.quality import QualitySettings
    from benchmarks.roster import Geometry
    from benchmarks.scenes import ScenesSettings
    from benchmarks.sparse import SparseSettings
    from benchmarks.swap import SwapSettings
    from benchmarks.wan import WanSettings

    if quick:
        return {
            "layer_geometry": Geometry(
                heads=2, head_dim=16, tokens_per_frame=8, dim=32, frames_per_segment=2, capacity=16
            ),
            "layer_stream": StreamSettings(
                segments=24, steps=2, reference=8, window=4, replay_rounds=1, full_history_budget_s=2
            ),
            "backbone_cost_model": "tiny",
            "backbone_stream": StreamSettings(
                segments=16, steps=1, reference=8, window=4, replay_rounds=1, full_history_budget_s=2
            ),
            # one child process per memory costs a torch import each: two memories are enough for a smoke run
            "rss": {"segments": 40, "steps": 1, "budget_s": 5.0, "warmup": 8},
            "rss_memories": ["SinkWindowMemory", "FullHistory (baseline)"],
            "overhead_model": "tiny",
            "overhead": OverheadSettings(steps=(2,), warm_segments=10, rounds=3, warmup_rounds=1),
            "wan": WanSettings(dim=64, heads=4, mlp=128, tokens_per_frame=8, prompt_tokens=6, rounds=2, capacity=8),
            "attend": AttendSettings(
                shapes={"tiny": (2, 16, 16, (16, 32))},
                rounds=3,
                wan_shapes={"tiny wan": (2, 16, 24, (24, 48))},
                wan_rounds=2,
                warmup=1,
            ),
            "sparse": SparseSettings(
                heads=2,
                head_dim=16,
                tokens_per_frame=8,
                frames_per_segment=2,
                capacities=(16, 64),
                top_ks=(2, 8),
                rounds=3,
                attend_sizes=((16, 80), (64, 1024)),
                mm_sizes=(128, 256),
                target=(64, 8),
            ),
            "quality": QualitySettings(clips=2, segments=10, psnr_clips=1, sampler_steps=2),
            "length": LengthSettings(multiple=2, seeds=1, steps=2, quick_variants=True),
            "swap": SwapSettings(multiple=2, seeds=1, steps=2, quick=True),
            "scenes": ScenesSettings(quick=True),
        }
    return {
        "layer_geometry": Geometry(
            heads=4, head_dim=32, tokens_per_frame=16, dim=128, frames_per_segment=3, capacity=64
        ),
        "layer_stream": StreamSettings(segments=1024, steps=4, window=8, replay_rounds=4, full_history_budget_s=90),
        "backbone_cost_model": "demo",
        "backbone_stream": StreamSettings(segments=256, steps=4, window=8, replay_rounds=3, full_history_budget_s=60),
        "rss": {"segments": 2048, "steps": 1, "budget_s": 45.0, "warmup": 16},
        "overhead_model": "bench",
        # 26 rounds: every one of the 13 memories twice in every position of a round
        # PromptBank+SparseKV once more with its reads compiled (the first warm-up round compiles)
        "overhead": OverheadSettings(
            steps=(8, 4), warm_segments=48, rounds=26, warmup_rounds=2, compiled=("PromptBank+SparseKV",)
        ),
        # a segment of the Wan-shaped block takes ~5-15 s on 2 quiet cores: as many full rotations of the 8
        # memories as fit in 14 min (sized from each memory's untimed first segment; at least one rotation)
        "wan": WanSettings(rounds=0, budget_s=840.0, warmup_rounds=0, compiled=("PromptBank+SparseKV",)),
        "attend": AttendSettings(),
        "sparse": SparseSettings(),
        "quality": QualitySettings(),
        "length": LengthSettings(),
        "swap": SwapSettings(),
        "scenes": ScenesSettings(),
    }


def load_caveat(machine: dict[str, Any], end: list[float] | None) -> str | None:
    """The page's warning when other processes shared the machine, read off the 1-minute load averages.

    At the start the run has not loaded the machine yet; at the end its own ``torch_threads``
    are part of the load, so only what exceeds them counts as others. Either above half the
    CPUs left to others means the machine was shared.
    """
    start = (machine.get("load_average_start") or [0.0])[0]
    end_load = (end or [0.0])[0]
    cpus = int(machine["cpus_usable"])
    own = min(int(machine.get("torch_threads") or 1), cpus)
    if start <= 0.5 * cpus and end_load - own <= 0.5 * max(cpus - own, 1):
        return None
    return (
        f"Other processes shared this machine during the run (load average {start:.1f} at the start, "
        f"{end_load:.1f} at the end with this run's own {own} thread(s), on {cpus} CPUs), so absolute times are "
        "inflated and ratios noisier than on a quiet machine; interleaving keeps the ratios fair, the min-max "
        "ranges show the noise."
    )


def _no_backbone(key: str, title: str) -> Any:
    from benchmarks.common import Section

    sec = Section(key, title)
    sec.skip("skipped: not available yet: memkit.models.malt (the reference backbone) cannot be imported")
    return sec


def _section_group(key: str) -> str:
    """The ``--only`` name that measures section ``key``."""
    return {"rss": "cost_backbone", "attend_efficiency": "sparse", "retrieval": "quality"}.get(key, key)


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks import cost, length, overhead, quality, rss, sparse, swap
    from benchmarks.common import ROOT, SCHEMA, Section, machine, now_iso
    from benchmarks.report import all_finite
    from benchmarks.roster import describe, roster

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quick = args.quick
    p = plan(quick)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        print(f"unknown section(s) {sorted(unknown)}; expected some of {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    # a quick run never lands on the full run's results: it has its own default folder
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "quick" if quick else "full",
        "date": now_iso(),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "settings": {
            "threads": args.threads,
            "threads_note": "torch.set_num_threads(threads) at the start; every timing runs in this one process",
            "dtype": "float32",
            "device": "cpu",
            "batch_size": 1,
            "plan": {k: _plain(v) for k, v in p.items()},
        },
        "machine": machine(),
        "roster": describe(roster(p["layer_geometry"])),
        "sections": {},
    }
    crashed: list[str] = []
    if args.merge and (out / "results.json").is_file():
        # keep the sections this run does not measure: only the ones named by --only are replaced
        old = json.loads((out / "results.json").read_text())
        results["sections"] = {k: v for k, v in old.get("sections", {}).items() if _section_group(k) not in only}
        results["merged_into"] = {"date": old.get("date"), "mode": old.get("mode"), "kept": sorted(results["sections"])}

    def attempt(key: str, fn: Callable[[], Section | tuple[Section, ...]]) -> None:
        t0 = time.time()
        try:
            got = fn()
        except Exception as err:  # a broken section is reported, and the others still run
            traceback.print_exc()
            crashed.append(key)
            sec = Section(key, key, status="error", notes=[f"error: {type(err).__name__}: {err}"])
            results["sections"][key] = sec.to_dict()
            return
        for sec in got if isinstance(got, tuple) else (got,):
            sec.seconds = round(time.time() - t0, 1)
            results["sections"][sec.key] = {**sec.to_dict(), "date": now_iso()}

    if "cost_layer" in only:
        attempt(
            "cost_layer", lambda: cost.layer_cost(roster(p["layer_geometry"]), p["layer_geometry"], p["layer_stream"])
        )
    if "cost_backbone" in only:
        cfg = cost.backbone_config(p["backbone_cost_model"])
        ents = roster(cost.backbone_geometry(cfg, p["layer_geometry"].capacity)) if cfg is not None else []
        attempt("cost_backbone", lambda: cost.backbone_cost(ents, cfg, p["backbone_stream"]))
        names = [e.name for e in ents if e.available and e.name in p.get("rss_memories", [e.name])]
        skipped = {e.name: str(e.why) for e in ents if not e.available}
        if cfg is None:
            attempt("rss", lambda: _no_backbone("rss", "Resident memory over a long stream"))
        else:
            attempt(
                "rss",
                lambda: rss.rss_section(names, skipped, p["backbone_cost_model"], threads=args.threads, **p["rss"]),
            )
    if "overhead" in only:
        cfg = cost.backbone_config(p["overhead_model"])
        g = p["layer_geometry"]
        ents = roster(cost.backbone_geometry(cfg, g.capacity) if cfg is not None else g, full_history=False)
        attempt("overhead", lambda: overhead.overhead(ents, cfg, g, p["overhead"], g))
    if "wan" in only:
        from benchmarks import wan

        attempt("wan", lambda: wan.wan_section(p["wan"]))
    if "attend" in only:
        from benchmarks import attend

        attempt("attend", lambda: attend.attend_section(p["attend"]))
    if "sparse" in only:
        attempt("sparse", lambda: (sparse.sparse_vs_dense(p["sparse"]), sparse.attend_efficiency(p["sparse"])))
    if "quality" in only:
        attempt(
            "quality",
            lambda: (quality.checkpoint_psnr(p["quality"], quick), quality.prompt_bank_precision(p["quality"])),
        )
    if "length" in only:
        attempt("length", lambda: length.length_section(p["length"]))
    if "swap" in only:
        attempt("swap", lambda: swap.swap_section(p["swap"]))
    if "scenes" in only:
        from benchmarks import scenes

        attempt("scenes", lambda: scenes.scenes_section(p["scenes"]))

    results["duration_s"] = round(time.time() - started, 1)
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    caveat = load_caveat(results["machine"], results["load_average_end"])
    if caveat:
        results["caveat"] = caveat
    if not all_finite(results):
        print("internal error: a non-finite number reached the results", file=sys.stderr)
        crashed.append("results")
    docs = None if args.no_docs else (Path(args.docs) if args.docs else (None if quick else ROOT / "docs"))
    publish(results, out, docs)
    if crashed:
        print(f"sections that crashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


def publish(results: dict[str, Any], out: Path, docs: Path | None) -> None:
    """Judge the targets, then write results.json, the plots and the page (and the docs page)."""
    from benchmarks.report import evaluate_targets, make_plots, render_page, summary_lines

    results["targets"] = evaluate_targets(results)
    out.mkdir(parents=True, exist_ok=True)
    soak_file = out / "soak.json"
    soak = json.loads(soak_file.read_text()) if soak_file.is_file() else None
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    plots = make_plots(results, out / "plots")
    (out / "benchmarks.md").write_text(render_page(results, results["targets"], plots, "plots", soak))
    if docs is not None:
        assets = docs / "assets" / "benchmarks"
        assets.mkdir(parents=True, exist_ok=True)
        for old in assets.glob("*.png"):
            if old.name not in plots:
                old.unlink()
        for name in plots:
            shutil.copyfile(out / "plots" / name, assets / name)
        (docs / "benchmarks.md").write_text(render_page(results, results["targets"], plots, "assets/benchmarks", soak))
    print(f"\nbenchmarks ({results['mode']}, {results['duration_s'] / 60:.1f} min): results in {out}")
    if docs is not None:
        print(f"page regenerated: {docs / 'benchmarks.md'}")
    for line in summary_lines(results["targets"]):
        print(line)
    for key, sec in results["sections"].items():
        for note in sec.get("notes", []):
            print(f"note [{key}]: {note}")


def render(args: argparse.Namespace) -> int:
    """Re-judge and re-render an existing results.json (no measuring)."""
    from benchmarks.common import ROOT

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    results = json.loads((out / "results.json").read_text())
    docs = (
        None
        if args.no_docs
        else (Path(args.docs) if args.docs else (None if results["mode"] == "quick" else ROOT / "docs"))
    )
    publish(results, out, docs)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="memkit's benchmark suite")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure, write results.json, plots and the page")
    r.add_argument("--quick", action="store_true", help="a smoke run of every section (under 2 minutes)")
    r.add_argument(
        "--out", default=None, help="where results go (default: benchmarks/results/, or benchmarks/results/quick/)"
    )
    r.add_argument("--docs", default=None, help="docs folder to update (default: docs/ in a full run, none in quick)")
    r.add_argument("--no-docs", action="store_true", help="never touch the docs")
    r.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    r.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    r.add_argument(
        "--merge",
        action="store_true",
        help="with --only: keep the other sections of the results.json already in --out and replace these",
    )
    rr = sub.add_parser("render", help="re-judge and re-render an existing results.json (no measuring)")
    rr.add_argument("--out", default=None, help="folder holding results.json (default: benchmarks/results/)")
    rr.add_argument("--docs", default=None, help="docs folder to update (default: docs/ for a full run's results)")
    rr.add_argument("--no-docs", action="store_true", help="never touch the docs")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else render(args)


if __name__ == "__main__":
    sys.exit(main())
