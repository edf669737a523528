"""Shared pieces of the benchmarks: timing, statistics, result records, machine facts, RSS.

Every timing is ``time.perf_counter`` around a call that runs to completion (CPU work is
synchronous; on CUDA the callers synchronise). Ratios come from interleaved runs: the
measured alternatives take turns (A, B, A, B, ...; with more than two the order rotates
every round), after warm-up rounds that are not recorded, so a change in machine load hits
all of them alike. A figure reports the median with the min and max.
"""

import dataclasses
import datetime
import gc
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import benchmarks

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "memkit-benchmarks/1"


# --------------------------------------------------------------------------- timing


def checkpoint_folders(roots: Sequence[Path]) -> list[Path]:
    """Every folder under ``roots`` holding a MALT checkpoint (``config.json`` + ``model.safetensors``), once."""
    found: list[Path] = []
    for root in roots:
        if not root.exists():
            continue
        for cfg in sorted(root.rglob("config.json")):
            if (cfg.parent / "model.safetensors").is_file() and cfg.parent not in found:
                found.append(cfg.parent)
    return found


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1, progress: Any = None
) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, taking turns; the order rotates each round.

    ``warmup`` untimed rounds go first. Returns seconds per call, per name, in round order,
    so ``samples[a][r] / samples[b][r]`` is the ratio measured in round ``r``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection in the middle of one call would land on whichever ran then
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(timed(fns[name]))
            if progress is not None:
                progress.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def stats(samples: Sequence[float], scale: float = 1.0) -> dict[str, float | int]:
    """Median, min, max and count of ``samples`` (each multiplied by ``scale``)."""
    xs = [x * scale for x in samples]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio_stats(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int]:
    """``median(a) / median(b)``, with the min and max of the per-round ratios ``a[r] / b[r]``."""
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "median": statistics.median(a) / statistics.median(b),
        "min": min(per_round),
        "max": max(per_round),
        "n": len(per_round),
    }


def rolling_median(xs: Sequence[float], window: int) -> list[float]:
    """Median of each centred window of ``xs`` (shorter at the ends)."""
    half = window // 2
    return [statistics.median(xs[max(0, i - half) : i + half + 1]) for i in range(len(xs))]


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def rss_source() -> str:
    try:
        import psutil  # noqa: F401

        return "psutil"
    except ImportError:
        return "/proc/self/statm" if Path("/proc/self/statm").exists() else "getrusage (peak only)"


# --------------------------------------------------------------------------- records


def finite(x: float) -> float:
    """``x`` as a float; refuses NaN/Inf so that no result file ever holds one."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite figure {x}")
    return x


def figure(name: str, value: float, unit: str, *, params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One measured number: ``value`` in ``unit``, what it was measured with (``params``),
    and optional ``min``/``max``/``n`` (pass a :func:`stats` dict as ``spread``)."""
    record: dict[str, Any] = {"name": name, "value": finite(value), "unit": unit, "params": dict(params or {})}
    spread = extra.pop("spread", None)
    if spread is not None:
        record.update(min=finite(spread["min"]), max=finite(spread["max"]), n=int(spread["n"]))
    record.update(extra)
    return record


@dataclasses.dataclass
class Section:
    """The results of one part of the suite.

    ``status`` is ``"ok"``, ``"partial"`` (some parts skipped; ``notes`` say which and why)
    or ``"skipped"``. ``config`` holds every setting the figures depend on; ``series``
    holds the curves the plots draw.
    """

    key: str
    title: str
    status: str = "ok"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    figures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    series: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        rec = figure(*args, **kwargs)
        self.figures.append(rec)
        return rec

    def skip(self, note: str) -> None:
        """Record that a part of this section did not run, and why."""
        self.notes.append(note)
        self.status = "partial" if self.figures else "skipped"

    def find(self, name: str, **params: Any) -> dict[str, Any] | None:
        """The first figure called ``name`` whose params include ``params``."""
        for f in self.figures:
            if f["name"] == name and all(f["params"].get(k) == v for k, v in params.items()):
                return f
        return None

    def to_dict(self) -> dict[str, Any]:
        if self.status != "skipped" and not self.figures:
            self.status = "skipped"
        if self.status == "ok" and self.notes and any(n.startswith("skipped") for n in self.notes):
            self.status = "partial"
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- machine


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare two result files."""
    import memkit
    import memkit.typing

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.is_available(),
        "memkit": memkit.__version__,
        "git_commit": git_commit(),
        "typecheck": memkit.typing.typecheck_enabled(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rss_source": rss_source(),
        "malloc": benchmarks.MALLOC,
    }


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
