"""Resident memory over a long stream, each memory in a fresh process.

In one long-lived process the allocator keeps whatever earlier measurements grew, so a
later stream's growth hides inside memory that is already resident. Here every memory
streams through the backbone in its own child process (``python -m benchmarks.rss``),
which reports its resident set size after warm-up and at the end, and its peak.
"""

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import benchmarks  # noqa: F401  (switches shape checking off before memkit is imported)
from benchmarks.common import ROOT, Section
from benchmarks.markdown import fmt, notes, skipped, table

MB = 1024.0 * 1024.0


def stream_rss(memory: str, model: str, segments: int, warmup: int, steps: int, budget_s: float) -> dict[str, Any]:
    """In this process: stream ``memory`` through the backbone; RSS after ``warmup`` segments and at the end."""
    import torch

    from benchmarks.common import peak_rss_bytes, rss_bytes
    from benchmarks.cost import BackboneHost, backbone_config, backbone_geometry, make_inputs
    from benchmarks.roster import roster

    cfg = backbone_config(model)
    entry = next(e for e in roster(backbone_geometry(cfg, 64)) if e.name == memory)
    shape = (1, cfg.frames_per_segment, cfg.channels, cfg.height, cfg.width)
    host = BackboneHost(entry, cfg, steps, make_inputs(shape, 8, cfg.prompt_dim, 0), 0)
    states = host.init_state()
    start_rss, done, started = None, 0, time.perf_counter()
    import memkit

    for s in range(segments):
        states = host.segment(states, s)
        done = s + 1
        if done == warmup:
            gc.collect()
            start_rss = rss_bytes()
        if time.perf_counter() - started > budget_s:
            break
    gc.collect()
    end_rss = rss_bytes()
    return {
        "memory": memory,
        "segments": done,
        "warmup": warmup,
        "rss_start": start_rss if start_rss is not None else end_rss,
        "rss_end": end_rss,
        "peak_rss": peak_rss_bytes(),
        "state_bytes": memkit.state_nbytes(states),
        "capped": done < segments,
        "threads": torch.get_num_threads(),
    }


def rss_section(
    names: list[str],
    skipped: dict[str, str],
    model: str,
    segments: int,
    steps: int,
    threads: int,
    budget_s: float,
    warmup: int = 16,
) -> Section:
    """Section 5: one child process per memory."""
    from tqdm import tqdm

    sec = Section("rss", "Resident memory over a long stream")
    sec.config = {
        "how": "each memory in a fresh process (python -m benchmarks.rss), so no other measurement's "
        "allocations are resident",
        "model": model,
        "segments": segments,
        "steps": steps,
        "warmup": warmup,
        "rss_start": f"after segment {warmup}",
        "rss_end": "after the last segment",
        "budget_s": budget_s,
    }
    for name, why in skipped.items():
        sec.notes.append(f"skipped {name}: {why}")
    for name in tqdm(names, desc="rss (one process each)", unit="memory"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.rss",
            "--memory",
            name,
            "--model",
            model,
            "--segments",
            str(segments),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            "--budget",
            str(budget_s),
            "--warmup",
            str(warmup),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s + 300)
        if proc.returncode != 0:
            sec.notes.append(f"skipped {name}: its process failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        p = {"memory": name, "from_segment": warmup, "to_segment": r["segments"]}
        sec.add("rss_start", r["rss_start"] / MB, "MiB", params=p)
        sec.add("rss_end", r["rss_end"] / MB, "MiB", params=p)
        sec.add("rss_growth", (r["rss_end"] - r["rss_start"]) / MB, "MiB", params=p)
        sec.add("peak_rss", r["peak_rss"] / MB, "MiB", params=p)
        sec.add("state_mb_end", r["state_bytes"] / MB, "MiB", params=p)
        if r["capped"]:
            sec.notes.append(
                f"{name} stopped at segment {r['segments']} of {segments}: its time budget of {budget_s:.0f} s ran out"
            )
    return sec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss", description=__doc__.splitlines()[0])
    parser.add_argument("--memory", required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--segments", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=60.0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        r = stream_rss(args.memory, args.model, args.segments, args.warmup, args.steps, args.budget)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- report


def render_rss(add: Callable[[str], None], sec: dict[str, Any] | None) -> None:
    title = "5. Resident memory over a long stream"
    if skipped(add, sec, title):
        return
    assert sec is not None
    add(f"## {title}\n")
    c = sec["config"]
    if "how" in c:
        add(
            f"Each memory streams through the backbone (`{c['model']}` size, {c['steps']} denoising step(s) per "
            f"segment, up to {c['segments']} segments or {c['budget_s']:.0f} s) in a fresh process, so no other "
            f"measurement's allocations are resident. RSS start: {c['rss_start']}; end: {c['rss_end']}.\n"
        )
    figs = sec["figures"]
    rows = []
    for f in figs:
        if f["name"] == "rss_start":
            p = f["params"]

            def get(name: str, p: dict[str, Any] = p) -> str:
                x = next((x for x in figs if x["name"] == name and x["params"] == p), None)
                return fmt(x["value"]) if x else "-"

            rows.append(
                [p["memory"], f"{p['from_segment']} -> {p['to_segment']}", fmt(f["value"]), get("rss_end"),
                 get("rss_growth"), get("peak_rss"), get("state_mb_end")]
            )  # fmt: skip
    headers = ["memory", "segments", "RSS start MiB", "RSS end MiB", "growth MiB", "peak MiB", "state MiB at end"]
    add(table(headers, rows) + "\n")
    notes(add, sec)
