"""The soak script, short: 300 segments per bounded memory, every check must hold."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_quick_every_bounded_memory_holds(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "MEMKIT_BENCH_TYPECHECK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert {"NoMemory", "FIFOMemory", "SinkWindowMemory", "SparseKVMemory", "RecurrentMemory"} <= set(
        report["memories"]
    )
    for name, r in report["memories"].items():
        assert r["segments"] == 300, name
        assert all(r["checks"].values()), (name, r["checks"])
        assert r["state_bytes"] == r["state_bytes_end"], name
        assert 0 <= r["rss_growth"] < 0.05, name
    assert "FullHistory (baseline)" not in report["memories"]
    assert "ok" in proc.stdout  # the table


def test_soak_catches_a_growing_state() -> None:
    from benchmarks.baselines import FullHistoryMemory
    from benchmarks.soak import GEOMETRY, soak_one

    r = soak_one(lambda: FullHistoryMemory(GEOMETRY.heads, GEOMETRY.head_dim), 20, check_every=10)
    assert r["checks"]["constant_state_bytes"] is False
    assert r["first_state_size_change"] == 1
    assert r["ok"] is False
