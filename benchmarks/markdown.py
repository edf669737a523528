"""What every section's report uses: looking figures up in the results, and writing Markdown.

Each benchmark section renders its own part of the page (``render_*`` in its module, next
to the code that measures it); :mod:`benchmarks.report` judges the targets and puts the page
together. This module sits below both, so no section imports the report.
"""

from collections.abc import Callable
from typing import Any

__all__ = [
    "figures",
    "find",
    "primary_steps",
    "overhead_host",
    "fmt",
    "value_range",
    "table",
    "STATUS",
    "fmt_load",
    "notes",
    "skipped",
    "image",
]

# --------------------------------------------------------------------------- lookups


def figures(results: dict[str, Any], section: str) -> list[dict[str, Any]]:
    sec = results["sections"].get(section)
    return list(sec["figures"]) if sec else []


def find(results: dict[str, Any], section: str, name: str, **params: Any) -> dict[str, Any] | None:
    for f in figures(results, section):
        if f["name"] == name and all(f["params"].get(k) == v for k, v in params.items()):
            return f
    return None


def primary_steps(results: dict[str, Any]) -> int | None:
    sec = results["sections"].get("overhead")
    if not sec or not sec.get("config", {}).get("settings"):
        return None
    return int(sec["config"]["settings"]["steps"][0])


def overhead_host(results: dict[str, Any]) -> str:
    for f in figures(results, "overhead"):
        if f["params"].get("host") in ("backbone", "tiny"):
            return str(f["params"]["host"])
    return "backbone"


# --------------------------------------------------------------------------- Markdown


def fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if unit == "fraction":
            return f"{x:.0%}"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def value_range(f: dict[str, Any] | None, unit: str = "") -> str:
    if f is None:
        return "-"
    if "min" in f:
        return f"{fmt(f['value'], unit)} ({fmt(f['min'], unit)}-{fmt(f['max'], unit)})"
    return fmt(f["value"], unit)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


STATUS = {"holds": "holds", "falls short": "**falls short**", "not measured": "not measured"}


def fmt_load(x: Any) -> str:
    return "n/a" if not x else " / ".join(f"{v:.1f}" for v in x)


def notes(add: Callable[[str], None], sec: dict[str, Any] | None) -> None:
    if sec and sec.get("notes"):
        add("Notes:\n")
        for n in sec["notes"]:
            add(f"- {n}")
        add("")


def skipped(add: Callable[[str], None], sec: dict[str, Any] | None, title: str) -> bool:
    if sec is None or sec.get("status") == "skipped":
        add(f"## {title}\n")
        reason = "; ".join(sec.get("notes", [])) if sec else "this section did not run"
        add(f"Not measured: {reason}.\n")
        return True
    return False


def image(add: Callable[[str], None], plots: list[str], name: str, image_dir: str, alt: str) -> None:
    if name in plots:
        add(f"![{alt}]({image_dir}/{name})\n")
