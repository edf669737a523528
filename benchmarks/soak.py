"""Soak test: stream thousands of segments through a tiny model with every bounded memory.

``python -m benchmarks.soak [--segments 10000] [--quick] [--out FILE]``

For each bounded memory a :class:`memkit.models.tiny.TinySegmentModel` (tiny dimensions,
memory at every block) generates ``--segments`` segments: one denoising step that reads the
memory, then the clean pass that writes it; prompts switch every 4 segments. Checked:

* **finite**: every output, and every state tensor at every check, holds no NaN/Inf;
* **constant state**: ``memkit.state_nbytes`` of the states is the same after every segment;
* **no leak**: resident memory (psutil if installed, else ``/proc/self/statm``) at most 5%
  above its level after warm-up (the first 10% of segments, at least 100).

Prints a table and writes the figures as JSON (stdout's last block, or ``--out``). Exits 1
when any check fails for any memory.
"""

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

import benchmarks  # noqa: F401  (switches shape checking off before memkit is imported)
import memkit
from benchmarks import markdown
from benchmarks.common import machine, now_iso, rss_bytes
from benchmarks.markdown import fmt
from benchmarks.roster import Geometry, roster
from memkit.models.tiny import TinySegmentModel

RSS_LIMIT = 0.05
GEOMETRY = Geometry(heads=2, head_dim=8, tokens_per_frame=4, dim=16, frames_per_segment=2, capacity=16)


def _state_finite(states: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(states)
    return all(bool(torch.isfinite(x).all()) for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point())


@torch.no_grad()
def soak_one(make: Any, segments: int, *, check_every: int = 100, seed: int = 0, desc: str = "") -> dict[str, Any]:
    """Stream ``segments`` segments with one memory; returns the figures and the checks."""
    g = GEOMETRY
    torch.manual_seed(seed)
    model = TinySegmentModel(
        8, 8, tokens_per_frame=g.tokens_per_frame, dim=g.dim, depth=1, heads=g.heads, memory=lambda i: make()
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    e = g.heads * g.head_dim
    prompts = [torch.randn(1, 6, e, generator=gen) for _ in range(3)]
    mask = torch.ones(1, 6, dtype=torch.bool)
    f, n = g.frames_per_segment, g.frames_per_segment * g.tokens_per_frame
    states = model.init_states(1)
    first_bytes = memkit.state_nbytes(states)
    warm = min(segments, max(100, segments // 10))
    bad_output_at = bad_state_at = bad_bytes_at = None
    rss_warm = rss_max = None
    absmax = absmax_warm = 0.0
    gc.collect()
    start = time.perf_counter()
    for s in tqdm(range(segments), desc=desc, unit="seg", mininterval=1.0):
        pos = (s * f + torch.arange(f))[None]
        prompt = prompts[(s // 4) % 3]
        x = torch.randn((1, n, 8), generator=gen)
        y, _ = model(x, states, pos, prompt=prompt, prompt_mask=mask)  # a denoising step: read only
        x = x - 0.1 * y
        y, states = model(x, states, pos, write=True, prompt=prompt, prompt_mask=mask)  # the clean pass
        if bad_output_at is None and not bool(torch.isfinite(y).all()):
            bad_output_at = s + 1
        if bad_bytes_at is None and memkit.state_nbytes(states) != first_bytes:
            bad_bytes_at = s + 1
        if (s + 1) % check_every == 0 or s + 1 == segments or s + 1 == warm:
            if bad_state_at is None and not _state_finite(states):
                bad_state_at = s + 1
            absmax = max(absmax, _state_absmax(states))
            if s + 1 == warm:
                absmax_warm = _state_absmax(states)
            if s + 1 >= warm:
                gc.collect()
                rss = rss_bytes()
                if rss_warm is None:
                    rss_warm = rss
                rss_max = rss if rss_max is None else max(rss_max, rss)
    seconds = time.perf_counter() - start
    assert rss_warm is not None and rss_max is not None
    growth = (rss_max - rss_warm) / rss_warm
    checks = {
        "finite_outputs": bad_output_at is None,
        "finite_state": bad_state_at is None,
        "constant_state_bytes": bad_bytes_at is None,
        "rss_growth_under_5pct": growth < RSS_LIMIT,
    }
    return {
        "segments": segments,
        "seconds": round(seconds, 2),
        "ms_per_segment": round(1000 * seconds / segments, 4),
        "state_bytes": first_bytes,
        "state_bytes_end": memkit.state_nbytes(states),
        # not a check, a symptom to watch: the largest |value| in the state after warm-up, at the end, ever
        "state_absmax_after_warmup": absmax_warm,
        "state_absmax_end": _state_absmax(states),
        "state_absmax_seen": absmax,
        "warmup_segments": warm,
        "rss_after_warmup_mib": round(rss_warm / 2**20, 3),
        "rss_max_after_warmup_mib": round(rss_max / 2**20, 3),
        "rss_growth": growth,
        "first_nonfinite_output": bad_output_at,
        "first_nonfinite_state": bad_state_at,
        "first_state_size_change": bad_bytes_at,
        "checks": checks,
        "ok": all(checks.values()),
    }


def _state_absmax(states: Any) -> float:
    m = 0.0
    for x in torch.utils._pytree.tree_leaves(states):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            v = float(x.abs().max())
            m = max(m, v if math.isfinite(v) else float("inf"))
    return m if math.isfinite(m) else -1.0  # -1 flags a non-finite state (also in first_nonfinite_state)


def soak(segments: int, *, threads: int = 1) -> dict[str, Any]:
    """Every bounded memory of the roster, one after another; the report as a dict."""
    torch.set_num_threads(threads)
    report: dict[str, Any] = {
        "schema": "memkit-soak/1",
        "date": now_iso(),
        "machine": machine(),
        "threads": threads,
        "geometry": GEOMETRY.to_dict(),
        "model": "TinySegmentModel(8, 8, dim=16, depth=1, heads=2): one block with the memory",
        "segment": "one denoising step (read) + the clean pass (read + write); prompts switch every 4 segments",
        "rss_limit": RSS_LIMIT,
        "memories": {},
        "skipped": {},
    }
    for entry in roster(GEOMETRY, full_history=False):
        if entry.make is None:
            report["skipped"][entry.name] = entry.why
            continue
        res = soak_one(entry.make, segments, desc=f"soak {entry.name}")
        res["config"] = entry.config
        report["memories"][entry.name] = res
    report["ok"] = all(r["ok"] for r in report["memories"].values())
    return report


def table(report: dict[str, Any]) -> str:
    head = (
        f"{'memory':<22} {'segments':>8} {'ms/seg':>7} {'state B':>8} {'RSS MiB':>8} {'growth':>7} "
        f"{'|state| max warm->end':>22}  checks"
    )
    lines = [head, "-" * len(head)]
    for name, r in report["memories"].items():
        failed = [k for k, ok in r["checks"].items() if not ok]
        verdict = "ok" if not failed else "FAILED: " + ", ".join(failed)
        lines.append(
            f"{name:<22} {r['segments']:>8} {r['ms_per_segment']:>7.2f} {r['state_bytes']:>8} "
            f"{r['rss_after_warmup_mib']:>8.1f} {r['rss_growth']:>7.2%} "
            f"{r['state_absmax_after_warmup']:>10.3g} -> {r['state_absmax_end']:<9.3g}  {verdict}"
        )
    for name, why in report["skipped"].items():
        lines.append(f"{name:<22} skipped: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="300 segments per memory")
    parser.add_argument("--out", default=None, help="write the JSON report here (default: print it)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    segments = 300 if args.quick else args.segments
    report = soak(segments, threads=args.threads)
    text = json.dumps(report, indent=1, allow_nan=False)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(table(report))
    if not args.out:
        print(text)
    print("soak: all checks hold" if report["ok"] else "soak: SOME CHECKS FAILED", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())


# --------------------------------------------------------------------------- report


def render_soak(add: Callable[[str], None], soak: dict[str, Any] | None) -> None:
    add("## 6. Soak: thousands of segments per memory\n")
    if not soak:
        add("Not in this report: run `python -m benchmarks.soak --out benchmarks/results/soak.json`.\n")
        return
    add(
        f"`python -m benchmarks.soak` ({soak['date']}): {soak['model']}; {soak['segment']}. Checks: no NaN/Inf in "
        f"any output or state, the same state bytes after every segment, resident memory less than "
        f"{soak['rss_limit']:.0%} above its level after warm-up. Verdict: "
        f"**{'every check holds' if soak['ok'] else 'some checks fail'}**.\n"
    )
    rows = []
    for name, r in soak["memories"].items():
        failed = [k for k, ok in r["checks"].items() if not ok]
        rows.append(
            [name, f"{r['segments']:,}", fmt(r["ms_per_segment"]), f"{r['state_bytes']:,}",
             fmt(r["rss_after_warmup_mib"]), f"{r['rss_growth']:.2%}",
             f"{r.get('state_absmax_after_warmup', 0):.3g} -> {r.get('state_absmax_end', 0):.3g}",
             "ok" if not failed else ", ".join(failed)]
        )  # fmt: skip
    headers = ["memory", "segments", "ms/segment", "state bytes", "RSS after warm-up MiB", "RSS growth",
               "max abs value in the state, warm-up -> end", "checks"]  # fmt: skip
    add(markdown.table(headers, rows) + "\n")
    for name, why in soak.get("skipped", {}).items():
        add(f"- {name} skipped: {why}")
    add("")
