"""memkit.attend against one raw ``scaled_dot_product_attention`` call over the same keys (issue 15).

For each shape the suite measures (the reference backbone's reads, the layer level, the
sparse section's routed and dense reads, the Wan-shaped block's reads), the segment's own
queries, keys and values and the memory contexts of that shape (every slot valid: a memory
whose buffers are full, as in the overhead sections) are attended three ways, taking turns
in every round:

* **attend**: ``memkit.attend(q, k, v, *contexts)``, as a host calls it (checks at the door,
  the contexts' keys and values concatenated after the segment's, backend dispatch);
* **cat + SDPA**: what a host writes by hand without memkit: ``torch.cat`` of the segment's
  keys and values with the contexts', then one ``F.scaled_dot_product_attention`` call;
* **SDPA alone**: that one call over keys and values concatenated beforehand (untimed).

The target (``attend / (cat + SDPA) <= 1.05``) is memkit's cost over the hand-written call;
``attend / SDPA alone`` shows what the concatenation itself costs, which no caller that
receives the memory's keys separately avoids.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import memkit
from benchmarks.common import Section, interleave, ratio_stats, stats
from benchmarks.markdown import notes, skipped, table, value_range

#: name -> (heads, head_dim, queries, context lengths in slots): the reads the suite's sections make
REFERENCE_SHAPES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    # the bench backbone (4 heads of 64, 3 frames of 32 tokens): SinkWindow (sink 3 + window 9 frames)
    "backbone SinkWindow": (4, 64, 96, (96, 288)),
    # PromptBank (3 frames) + SparseKV (sink 3 + top 6 routed)
    "backbone PromptBank+SparseKV": (4, 64, 96, (96, 96, 192)),
    # RecurrentMemory: one frame's worth of latent slots
    "backbone RecurrentMemory": (4, 64, 96, (32,)),
    # the layer level (4 heads of 32, 3 frames of 16 tokens): sink 3 + window 9
    "layer SinkWindow": (4, 32, 48, (48, 144)),
    # section 3 (4 heads of 64, 3 frames of 32): SparseKV's top 8 of 256, and dense over all 256
    "sparse k=8": (4, 64, 96, (256,)),
    "dense capacity 256": (4, 64, 96, (8192,)),
}
#: the Wan-shaped block (12 heads of 128, 3 frames of 390 tokens; window 9 past frames, sink 3, bank 3)
WAN_SHAPES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "Wan SinkWindow": (12, 128, 1170, (1170, 3510)),
    "Wan PromptBank+SparseKV": (12, 128, 1170, (1170, 1170, 3510)),
}


@dataclasses.dataclass
class AttendSettings:
    shapes: dict[str, tuple[int, int, int, tuple[int, ...]]] = dataclasses.field(
        default_factory=lambda: dict(REFERENCE_SHAPES)
    )
    rounds: int = 60  # per shape (a reference-shape call takes ~1 ms)
    wan_shapes: dict[str, tuple[int, int, int, tuple[int, ...]]] = dataclasses.field(
        default_factory=lambda: dict(WAN_SHAPES)
    )
    wan_rounds: int = 6  # a Wan-shaped call takes ~0.2-1 s
    warmup: int = 2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _calls(h: int, d: int, n: int, parts: tuple[int, ...], g: torch.Generator) -> dict[str, Callable[[], Any]]:
    q, k, v = (torch.randn((1, h, n, d), generator=g) for _ in range(3))
    contexts = [
        memkit.Context(
            torch.randn((1, h, m, d), generator=g),
            torch.randn((1, h, m, d), generator=g),
            torch.ones((1, h, m), dtype=torch.bool),
            torch.zeros((1, h, m), dtype=torch.long),
        )
        for m in parts
    ]
    keys = torch.cat([k, *(c.k for c in contexts)], dim=2)
    values = torch.cat([v, *(c.v for c in contexts)], dim=2)

    def by_hand() -> Any:
        kk = torch.cat([k, *(c.k for c in contexts)], dim=2)
        vv = torch.cat([v, *(c.v for c in contexts)], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv)

    return {
        "attend": lambda: memkit.attend(q, k, v, *contexts),
        "cat + SDPA": by_hand,
        "SDPA alone": lambda: F.scaled_dot_product_attention(q, keys, values),
    }


@torch.no_grad()
def attend_section(st: AttendSettings) -> Section:
    """Section 2d: memkit.attend's time over the hand-written call, per shape."""
    sec = Section("attend", "memkit.attend vs one raw scaled_dot_product_attention call")
    sec.config = {
        "settings": st.to_dict(),
        "attend": "memkit.attend(q, k, v, *contexts), every context slot valid",
        "by_hand": "torch.cat of keys and values + one F.scaled_dot_product_attention call",
        "sdpa_alone": "one F.scaled_dot_product_attention call over keys concatenated beforehand (untimed)",
        "threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
    }
    g = torch.Generator().manual_seed(st.seed)
    groups = [(st.shapes, st.rounds), (st.wan_shapes, st.wan_rounds)]
    total = sum(len(shapes) * rounds for shapes, rounds in groups)
    with tqdm(total=total, desc="attend vs SDPA", unit="round") as bar:
        for shapes, rounds in groups:
            for name, (h, d, n, parts) in shapes.items():
                samples = interleave(_calls(h, d, n, parts, g), repeats=rounds, warmup=st.warmup, progress=bar)
                p = {"shape": name, "heads": h, "head_dim": d, "queries": n, "keys": n + sum(parts)}
                for what, xs in samples.items():
                    s = stats(xs, 1000.0)
                    sec.add("ms", s["median"], "ms", spread=s, params={**p, "call": what})
                r = ratio_stats(samples["attend"], samples["cat + SDPA"])
                sec.add("ratio_vs_by_hand", r["median"], "x", spread=r, params=p, note="attend / (cat + SDPA)")
                r = ratio_stats(samples["attend"], samples["SDPA alone"])
                sec.add("ratio_vs_sdpa", r["median"], "x", spread=r, params=p, note="attend / SDPA alone")
    sec.config["load_average_end"] = list(os.getloadavg())
    sec.notes.append(
        f"{st.rounds} rounds per reference shape, {st.wan_rounds} per Wan shape, after {st.warmup} warm-up rounds; "
        f"load average {sec.config['load_average_start'][0]:.1f} at the start, "
        f"{sec.config['load_average_end'][0]:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    return sec


def render_attend(add: Callable[[str], None], sec: dict[str, Any] | None) -> None:
    """The section's Markdown."""
    title = "2d. memkit.attend vs one raw scaled_dot_product_attention call"
    if skipped(add, sec, title):
        return
    assert sec is not None
    add(f"## {title}\n")
    cfg = sec["config"]
    add(
        f"attend: `{cfg['attend']}`. By hand: {cfg['by_hand']}. SDPA alone: {cfg['sdpa_alone']}. "
        "The three take turns in every round. attend / by hand is memkit's own cost (checks, dispatch, the "
        "mask when a slot is invalid); SDPA alone shows what concatenating the keys costs, which a caller that "
        "gets the memory's keys separately pays either way.\n"
    )
    figs = sec["figures"]
    rows = []
    for f in figs:
        if f["name"] != "ratio_vs_by_hand":
            continue
        p = f["params"]

        def get(name: str, call: str | None = None, p: dict[str, Any] = p) -> dict[str, Any] | None:
            return next(
                (
                    x
                    for x in figs
                    if x["name"] == name
                    and x["params"]["shape"] == p["shape"]
                    and (call is None or x["params"].get("call") == call)
                ),
                None,
            )

        rows.append(
            [
                p["shape"],
                f"{p['heads']} x {p['head_dim']}",
                str(p["queries"]),
                str(p["keys"]),
                value_range(get("ms", "attend")),
                value_range(get("ms", "cat + SDPA")),
                value_range(get("ms", "SDPA alone")),
                value_range(f),
                value_range(get("ratio_vs_sdpa")),
            ]
        )
    add(
        table(
            ["shape", "heads x dim", "queries", "keys", "attend ms", "cat + SDPA ms", "SDPA alone ms",
             "attend / by hand", "attend / SDPA alone"],
            rows,
        )
        + "\n"
    )  # fmt: skip
    notes(add, sec)
