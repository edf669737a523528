"""Sparse vs dense: routing to the top-k frames against attending to the whole buffer.

For a full :class:`memkit.SparseKVMemory` ring of ``C`` frames:

* **sparse** = ``memory.read(state, query)`` (pool the queries, score every frame, rank,
  gather the top ``k`` frames per head) + :func:`memkit.attend` over the segment and them;
* **dense** = :func:`memkit.attend` over the segment and all ``C`` frames, the context built
  beforehand (untimed), so dense pays for attention only.

Rotary embedding is left out of both (it would add a cost proportional to the keys read,
which favours sparse further). The two take turns (A, B, A, B, ...).

Attention efficiency: GFLOP/s achieved by :func:`memkit.attend` (``4 b h n m d`` flops for
the two matmuls) against this machine's fp32 matmul peak, measured in the same run as the
best of ``torch.mm`` on square matrices of a few sizes.
"""

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

import memkit
from benchmarks.common import Section, interleave, ratio_stats, stats
from benchmarks.markdown import figures, fmt, image, notes, skipped, table
from memkit.memories.frames import FrameBuffer


@dataclasses.dataclass
class SparseSettings:
    heads: int = 4
    head_dim: int = 64
    tokens_per_frame: int = 32
    frames_per_segment: int = 3
    capacities: tuple[int, ...] = (64, 128, 256, 512, 1024)
    top_ks: tuple[int, ...] = (2, 4, 8, 16)
    rounds: int = 9
    # the target pair (capacity, k) is measured once more after every capacity of the grid: separate runs
    # spread over the section, so "holds in every run" is read off several runs, not off one
    target: tuple[int, int] = (256, 8)
    # attention efficiency: (queries n, keys m) pairs at the geometry above
    attend_sizes: tuple[tuple[int, int], ...] = ((96, 480), (96, 8192), (384, 4096), (1024, 4096))
    mm_sizes: tuple[int, ...] = (512, 1024, 2048)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _full_state(mem: Any, st: SparseSettings, capacity: int, g: torch.Generator) -> Any:
    """A ring with every slot filled with random keys (as after ``capacity`` written frames)."""
    state = mem.init_state(1)
    b, h, c, t, d = state.ring.k.shape
    k = torch.randn((b, h, c, t, d), generator=g)
    ring = FrameBuffer(
        k=k,
        v=torch.randn((b, h, c, t, d), generator=g),
        pos=torch.arange(c)[None],
        valid=torch.ones((b, c), dtype=torch.bool),
    )
    return state.replace(ring=ring, desc=k.mean(dim=3), frames_seen=torch.full((b,), c))


@torch.no_grad()
def sparse_vs_dense(st: SparseSettings) -> Section:
    """Section 3a: speed-up of SparseKV read + attend over dense attention, per capacity and k."""
    sec = Section("sparse", "Sparse vs dense attention over the memory")
    h, d, t, f = st.heads, st.head_dim, st.tokens_per_frame, st.frames_per_segment
    n = f * t
    sec.config = {
        "settings": st.to_dict(),
        "queries_per_segment": n,
        "sparse": "SparseKVMemory.read + memkit.attend(q, k, v, context)",
        "dense": "memkit.attend(q, k, v, context of all C frames) (context prebuilt, untimed)",
        "rotary": "excluded from both",
        "backend": "auto",
    }
    g = torch.Generator().manual_seed(st.seed)
    q, k, v = (torch.randn((1, h, n, d), generator=g) for _ in range(3))
    pos = torch.arange(f)[None] + 100_000
    query = memkit.Query(q, pos, t)
    grid = [(c, kk) for c in st.capacities for kk in st.top_ks if kk <= c]
    tc, tk = st.target
    target_on = tk <= tc
    bar = tqdm(
        total=(len(grid) + (len(st.capacities) if target_on else 0)) * st.rounds, desc="sparse vs dense", unit="round"
    )

    def speedup(mem: Any, state: Any, dense_ctx: Any) -> tuple[dict[str, Any], dict[str, list[float]]]:
        def sparse() -> Any:
            return memkit.attend(q, k, v, mem.read(state, query))

        def dense() -> Any:
            return memkit.attend(q, k, v, dense_ctx)

        samples = interleave({"sparse": sparse, "dense": dense}, repeats=st.rounds, warmup=2, progress=bar)
        return ratio_stats(samples["dense"], samples["sparse"]), samples

    target: tuple[Any, Any] | None = None
    if target_on:
        target_mem = memkit.SparseKVMemory(h, d, t, capacity=tc, top_k=tk)
        target = (target_mem, _full_state(target_mem, st, tc, g))
    run_medians: list[float] = []
    for c in st.capacities:
        state = _full_state(memkit.SparseKVMemory(h, d, t, capacity=c, top_k=1), st, c, g)
        dense_ctx = state.ring.to_context()
        for kk in [kk for kk in st.top_ks if kk <= c]:
            r, samples = speedup(memkit.SparseKVMemory(h, d, t, capacity=c, top_k=kk), state, dense_ctx)
            p = {"capacity": c, "top_k": kk}
            sec.add("speedup", r["median"], "x", spread=r, params=p, note="dense time / sparse time")
            s_sp, s_de = stats(samples["sparse"], 1000.0), stats(samples["dense"], 1000.0)
            sec.add("sparse_ms", s_sp["median"], "ms", spread=s_sp, params=p)
            sec.add("dense_ms", s_de["median"], "ms", spread=s_de, params=p)
        del state, dense_ctx
        if target is not None:
            r, _ = speedup(target[0], target[1], target[1].ring.to_context())
            run_medians.append(r["median"])
    if run_medians:
        sec.add(
            "speedup_runs_lowest",
            min(run_medians),
            "x",
            spread={
                "median": statistics.median(run_medians),
                "min": min(run_medians),
                "max": max(run_medians),
                "n": len(run_medians),
            },
            params={"capacity": tc, "top_k": tk},
            note=f"the lowest median of {len(run_medians)} separate runs ({st.rounds} rounds each), one after "
            "each capacity of the grid",
        )
    bar.close()
    return sec


@torch.no_grad()
def attend_efficiency(st: SparseSettings) -> Section:
    """Section 3b: GFLOP/s of memkit.attend against the fp32 matmul peak measured now."""
    sec = Section("attend_efficiency", "Attention efficiency against the matmul peak")
    h, d = st.heads, st.head_dim
    sec.config = {
        "heads": h,
        "head_dim": d,
        "flops": "4 b h n m d (q k^T and attention x v)",
        "peak": f"best torch.mm GFLOP/s over square sizes {list(st.mm_sizes)} (2 N^3 flops), fp32",
        "attend": "memkit.attend(q, k, v, context): the segment's own n keys + a context of m - n valid keys",
        "backend": "auto",
    }
    g = torch.Generator().manual_seed(st.seed)
    mm_fns = {}
    for size in st.mm_sizes:
        a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
        mm_fns[f"mm{size}"] = lambda a=a, b=b: torch.mm(a, b)
    att_fns, flops = {}, {}
    for n, m in st.attend_sizes:
        q, k, v = (torch.randn((1, h, n, d), generator=g) for _ in range(3))
        mc = m - n
        ctx = memkit.Context(
            torch.randn((1, h, mc, d), generator=g),
            torch.randn((1, h, mc, d), generator=g),
            torch.ones((1, h, mc), dtype=torch.bool),
            torch.zeros((1, h, mc), dtype=torch.long),
        )
        name = f"n{n}_m{m}"
        att_fns[name] = lambda q=q, k=k, v=v, ctx=ctx: memkit.attend(q, k, v, ctx)
        flops[name] = 4.0 * h * n * m * d
    rounds = st.rounds
    with tqdm(total=rounds, desc="attend efficiency", unit="round") as bar:
        samples = interleave({**mm_fns, **att_fns}, repeats=rounds, warmup=2, progress=bar)
    peak = 0.0
    for size in st.mm_sizes:
        s = stats(samples[f"mm{size}"])
        gflops = 2.0 * size**3 / s["median"] / 1e9
        sec.add("matmul_gflops", gflops, "GFLOP/s", params={"size": size})
        peak = max(peak, gflops)
    sec.add("matmul_peak_gflops", peak, "GFLOP/s", params={})
    for n, m in st.attend_sizes:
        name = f"n{n}_m{m}"
        s = stats(samples[name])
        gflops = flops[name] / s["median"] / 1e9
        p = {"queries": n, "keys": m}
        sec.add("attend_gflops", gflops, "GFLOP/s", params=p)
        sec.add("attend_efficiency", gflops / peak, "fraction", params=p, note="attend GFLOP/s / matmul peak")
    return sec


# --------------------------------------------------------------------------- report


def sparse_plot(results: dict[str, Any], save: Callable[[Any, str], None], plt: Any) -> None:
    """The sparse speed-up against capacity, one line per top-k."""
    sp = [f for f in figures(results, "sparse") if f["name"] == "speedup"]
    if sp:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in sorted({f["params"]["top_k"] for f in sp}):
            pts = sorted((f["params"]["capacity"], f["value"]) for f in sp if f["params"]["top_k"] == k)
            ax.plot([c for c, _ in pts], [v for _, v in pts], "o-", label=f"k = {k}")
        ax.axhline(8.0, color="#e53935", ls="--", lw=1, label="target 8x (at capacity 256, k = 8)")
        ax.set(xscale="log", yscale="log", xlabel="capacity (frames in the ring)", ylabel="dense time / sparse time")
        ax.set_title("SparseKV read + attend vs dense attention")
        ax.legend(fontsize=7)
        save(fig, "sparse.png")


def render_sparse(
    add: Callable[[str], None],
    sec: dict[str, Any] | None,
    eff: dict[str, Any] | None,
    plots: list[str],
    image_dir: str,
) -> None:
    title = "3. Sparse vs dense attention over the memory"
    if not skipped(add, sec, title):
        assert sec is not None
        add(f"## {title}\n")
        cfg = sec["config"]
        s = cfg["settings"]
        add(
            f"Sparse: {cfg['sparse']}. Dense: {cfg['dense']}. Rotary {cfg['rotary']}. {s['heads']} heads of "
            f"{s['head_dim']}, {s['tokens_per_frame']} tokens per frame, {cfg['queries_per_segment']} queries "
            "(one segment), a full ring of random keys.\n"
        )
        image(add, plots, "sparse.png", image_dir, "sparse speed-up")
        figs = [f for f in sec["figures"] if f["name"] != "speedup_runs_lowest"]
        caps = sorted({f["params"]["capacity"] for f in figs})
        ks = sorted({f["params"]["top_k"] for f in figs})
        rows = []
        for c in caps:
            dense = next((f for f in figs if f["name"] == "dense_ms" and f["params"]["capacity"] == c), None)
            row = [str(c), fmt(dense["value"]) if dense else "-"]
            for k in ks:
                f = next(
                    (f for f in figs if f["name"] == "speedup" and f["params"] == {"capacity": c, "top_k": k}), None
                )
                row.append(f"{fmt(f['value'])}x" if f else "-")
            rows.append(row)
        add(table(["capacity", "dense ms", *[f"k = {k}" for k in ks]], rows) + "\n")
        runs = next((f for f in sec["figures"] if f["name"] == "speedup_runs_lowest"), None)
        if runs is not None:
            p = runs["params"]
            add(
                f"Capacity {p['capacity']}, k = {p['top_k']} again in {runs['n']} separate runs, one after each "
                f"capacity above: run medians {fmt(runs['min'])}-{fmt(runs['max'])}x.\n"
            )
        notes(add, sec)
    title = "3b. Attention efficiency"
    if not skipped(add, eff, title):
        assert eff is not None
        add(f"## {title}\n")
        add(f"FLOPs: {eff['config']['flops']}. Peak: {eff['config']['peak']}.\n")
        figs = eff["figures"]
        peak = next((f for f in figs if f["name"] == "matmul_peak_gflops"), None)
        rows = []
        for f in figs:
            if f["name"] == "attend_gflops":
                e = next(x for x in figs if x["name"] == "attend_efficiency" and x["params"] == f["params"])
                rows.append(
                    [
                        str(f["params"]["queries"]),
                        str(f["params"]["keys"]),
                        fmt(f["value"]),
                        fmt(e["value"], "fraction"),
                    ]
                )
        add(f"Matmul peak this run: {fmt(peak['value']) if peak else '-'} GFLOP/s.\n")
        add(table(["queries", "keys", "GFLOP/s", "of peak"], rows) + "\n")
