"""Smoke test of the benchmark suite: ``python -m benchmarks run --quick`` into a temporary folder.

Checks the schema of results.json and that every figure is finite, not that targets hold
(timings on a shared test machine mean nothing). The quick run must leave the committed
docs page and its plots untouched.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "cost_layer",
    "cost_backbone",
    "rss",
    "overhead",
    "attend",
    "sparse",
    "attend_efficiency",
    "quality",
    "retrieval",
    "length",
    "swap",
    "scenes",
}


def _refuse_nonfinite(token: str) -> float:
    raise AssertionError(f"results.json holds a non-finite number: {token}")


def _docs_snapshot() -> dict[str, tuple[int, int]]:
    paths = [ROOT / "docs" / "benchmarks.md", *sorted((ROOT / "docs" / "assets" / "benchmarks").glob("*"))]
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in paths if p.exists()}


def test_quick_run_writes_a_complete_finite_report(tmp_path: Path) -> None:
    before = _docs_snapshot()
    env = {**os.environ, "MEMKIT_BENCH_TYPECHECK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _docs_snapshot() == before, "a quick run must not touch docs/benchmarks.md or its plots"

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse_nonfinite)
    assert results["schema"] == "memkit-benchmarks/1"
    assert results["mode"] == "quick"
    assert results["date"] and results["duration_s"] > 0
    for key in ("platform", "cpu_count", "torch", "torch_threads", "typecheck"):
        assert key in results["machine"], key
    assert results["machine"]["typecheck"] is False
    assert results["settings"]["threads"] >= 1 and results["settings"]["plan"]
    assert SECTIONS <= set(results["sections"])

    n_figures = 0
    for key, sec in results["sections"].items():
        assert sec["status"] in ("ok", "partial", "skipped"), (key, sec["notes"])
        assert isinstance(sec["config"], dict) and isinstance(sec["notes"], list)
        if sec["status"] == "skipped":
            assert sec["notes"], f"{key} was skipped without saying why"
        for fig in sec["figures"]:
            assert {"name", "value", "unit", "params"} <= set(fig), fig
            for k in ("value", "min", "max"):
                if k in fig:
                    assert math.isfinite(fig[k]), (key, fig)
            n_figures += 1
    assert n_figures > 50
    for key in ("cost_layer", "cost_backbone", "overhead", "sparse", "retrieval"):
        assert results["sections"][key]["status"] in ("ok", "partial"), key

    for t in results["targets"]:
        assert t["status"] in ("holds", "falls short", "not measured"), t
        assert t["name"] and t["target"] and t["op"] in ("<=", ">=")
        if t["status"] == "falls short":
            assert t["why"], f"a missed target needs its why: {t['name']}"
        if t["value"] is not None:
            assert math.isfinite(t["value"])
    names = " ".join(t["name"] for t in results["targets"])
    for expected in (
        "cost flat (layer)",
        "overhead",
        "sparse vs dense",
        "attend efficiency",
        "attend vs raw SDPA",
        "retrieval precision",
    ):
        assert expected in names, expected
    # the length section (issue 11) runs on the bundled sweep-world checkpoints; with none bundled it says why
    length = results["sections"]["length"]
    if length["status"] == "skipped":
        assert any("sweep path family" in n for n in length["notes"]), length["notes"]
    else:
        assert {f["params"]["bucket"] for f in length["figures"] if f["name"] == "psnr"} == {"1x", "2x"}
        assert any(f["name"] == "target" for f in length["figures"])
        assert (tmp_path / "plots" / "length_psnr_per_byte.png").is_file()
    assert "procedural: best bounded memory - max(none, grey)" in names
    # the prompt-switch section (issue 14) runs on a checkpoint trained on the scenes world, or says why not
    scenes = results["sections"]["scenes"]
    if scenes["status"] == "skipped":
        assert any("scenes world" in n for n in scenes["notes"]), scenes["notes"]
    else:
        got = {(f["name"], f["params"]["memory"]) for f in scenes["figures"]}
        assert ("psnr_long_return", "none") in got and ("precision", "PromptBank B3 (as trained)") in got

    page = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets" in page and "](plots/" in page
    plots = list((tmp_path / "plots").glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 for p in plots)


def test_full_history_baseline_grows_and_reads_everything() -> None:
    from benchmarks.baselines import FullHistoryMemory

    mem = FullHistoryMemory(heads=2, head_dim=8)
    state = mem.init_state(1)
    sizes = [memkit.state_nbytes(state)]
    for s in range(3):
        k = torch.randn(1, 2, 6, 8)
        state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 6, 4), torch.tensor([[2 * s, 2 * s + 1]]), 3))
        sizes.append(memkit.state_nbytes(state))
    assert sizes == sorted(set(sizes)), "the unbounded baseline's state must grow with every write"
    ctx = mem.read(state, memkit.Query(torch.randn(1, 2, 6, 8), torch.tensor([[6, 7]]), 3))
    assert ctx.k.shape == (1, 2, 18, 8) and bool(ctx.mask.all())
    assert ctx.positions[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]


@settings(max_examples=200, deadline=None)
@given(
    cpus=st.integers(1, 64),
    threads=st.integers(1, 64),
    start=st.floats(0, 100),
    others_end=st.floats(0, 100),
)
def test_load_caveat_counts_only_load_beyond_the_runs_own_threads(
    cpus: int, threads: int, start: float, others_end: float
) -> None:
    """The page warns of a shared machine when the start load, or the end load beyond the run's
    own threads, exceeds half of the CPUs left to others; the run's own load never triggers it."""
    from benchmarks.__main__ import load_caveat

    own = min(threads, cpus)
    machine = {"load_average_start": [start, 0.0, 0.0], "cpus_usable": cpus, "torch_threads": threads}
    caveat = load_caveat(machine, [own + others_end, 0.0, 0.0])
    shared = start > 0.5 * cpus or others_end > 0.5 * max(cpus - own, 1)
    assert (caveat is not None) == shared
    if caveat:
        assert "Other processes shared this machine" in caveat
    # a run alone on a quiet machine: no warning
    assert load_caveat({**machine, "load_average_start": [0.0]}, [float(own)]) is None
