"""Cost against video length, and resident memory over a long stream.

Two levels:

* **layer**: one :class:`memkit.MemoryAttention` per memory. A segment is ``steps`` reads
  (denoising steps) and one clean pass that writes. The memories advance in lockstep
  (segment ``s`` of every memory, then segment ``s + 1``), so a change in machine load lands
  on all of them at the same segment.
* **backbone**: the reference :class:`memkit.models.malt.MALTNetwork` with the memory at every
  block; a segment is the Euler sampler's ``steps`` network calls plus the clean pass.
  Memories run one after another so each has its own resident-memory record.

The per-segment curve is what the stream measured. The target ratio ``time at the last
segment / time at segment 16`` comes from replays: memory states are immutable, so the
states before a window of segments around segment 16 and before the last segments are
kept, and the same segments are re-run from them, early and late windows taking turns
(A, B, A, B, ...). The ratio is the median of the late replays over the median of the early ones.
"""

import dataclasses
import gc
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

import memkit
from benchmarks.common import Section, interleave, ratio_stats, rolling_median
from benchmarks.markdown import fmt, image, notes, skipped, table, value_range
from benchmarks.roster import FULL_HISTORY, Entry, Geometry


@dataclasses.dataclass
class StreamSettings:
    """How long a stream runs and how the ratio is measured."""

    segments: int  # L, segments per stream
    steps: int  # reads (denoising steps) per segment
    reference: int = 16  # the early point of the ratio (1-based segment number)
    window: int = 8  # segments per replay window
    replay_rounds: int = 4  # passes over each window
    full_history_budget_s: float = 60.0  # stop the unbounded baseline after this much time
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def early(self) -> list[int]:
        """0-based indices of the segments around segment ``reference``."""
        start = max(0, self.reference - 1 - self.window // 2)
        return list(range(start, min(start + self.window, self.segments)))

    def late(self) -> list[int]:
        return list(range(max(0, self.segments - self.window), self.segments))


@dataclasses.dataclass
class Inputs:
    """Fixed inputs the streams cycle through (made once, outside every timing)."""

    x: list[Tensor]
    prompts: list[tuple[Tensor, Tensor]]

    def prompt(self, s: int) -> tuple[Tensor, Tensor]:
        # a scene changes every 4 segments and scenes come back: a prompt bank has work to do
        return self.prompts[(s // 4) % len(self.prompts)]


def make_inputs(shape: tuple[int, ...], prompt_tokens: int, prompt_dim: int, seed: int, pool: int = 8) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) for _ in range(pool)]
    prompts = []
    for i in range(3):
        real = prompt_tokens - i % 2  # some prompts padded
        mask = torch.arange(prompt_tokens) < real
        p = torch.randn(1, prompt_tokens, prompt_dim, generator=g) * mask[None, :, None]
        prompts.append((p, mask[None]))
    return Inputs(xs, prompts)


def _positions(s: int, f: int) -> Tensor:
    return (s * f + torch.arange(f))[None]


# --------------------------------------------------------------------------- hosts


class LayerHost:
    """One MemoryAttention with one memory; ``segment(state, s)`` runs segment ``s``."""

    def __init__(self, entry: Entry, g: Geometry, steps: int, inputs: Inputs, seed: int) -> None:
        assert entry.make is not None
        memory = entry.make()
        torch.manual_seed(seed)  # same projections for every memory
        self.attn = memkit.MemoryAttention(g.dim, g.heads, memory, head_dim=g.head_dim, qk_norm=True).eval()
        self.g, self.steps, self.inputs = g, steps, inputs

    def init_state(self) -> Any:
        return self.attn.init_state(1)

    @torch.no_grad()
    def segment(self, state: Any, s: int) -> Any:
        pos = _positions(s, self.g.frames_per_segment)
        x = self.inputs.x[s % len(self.inputs.x)]
        prompt, mask = self.inputs.prompt(s)
        for _ in range(self.steps):
            self.attn(x, state, pos, prompt, mask)
        _, state = self.attn.forward_and_write(x, state, pos, prompt, mask)
        return state


def backbone_config(kind: str) -> Any:
    """A MALT configuration for the backbone benchmarks (``None`` if MALT cannot be imported).

    ``tiny``: the smoke-test size. ``demo``: the size of the demo checkpoint (16x16 frames, 16
    tokens per frame, 2 frames per segment, 4 blocks of width 64), plus a prompt. ``bench``: 32
    tokens per frame, 3 frames per segment (MemFlow's chunk), 4 blocks of width 256.
    """
    try:
        from memkit.models.malt import MALTConfig
    except ImportError:
        return None
    sizes: dict[str, dict[str, Any]] = {
        "tiny": dict(channels=3, height=8, width=8, frames_per_segment=2, dim=32, depth=2, heads=2, prompt_dim=16),
        "demo": dict(channels=3, height=16, width=16, frames_per_segment=2, dim=64, depth=4, heads=4, prompt_dim=16),
        "bench": dict(channels=4, height=32, width=16, frames_per_segment=3, dim=256, depth=4, heads=4, prompt_dim=64),
    }
    return MALTConfig(patch_size=4, **sizes[kind])


def backbone_geometry(cfg: Any, capacity: int) -> Geometry:
    return Geometry(cfg.heads, cfg.head_dim, cfg.tokens_per_frame, cfg.dim, cfg.token_frames, capacity)


class BackboneHost:
    """A MALTNetwork with ``entry``'s memory at every block; a segment = sampler + clean pass."""

    def __init__(self, entry: Entry, cfg: Any, steps: int, inputs: Inputs, seed: int) -> None:
        from memkit.models.malt import EulerSampler, MALTNetwork

        assert entry.make is not None
        memories = [entry.make() for _ in range(cfg.depth)]
        torch.manual_seed(seed)  # the same network weights for every memory
        self.net = MALTNetwork(cfg, memories).eval()
        self.sampler = EulerSampler(steps=steps)
        self.cfg, self.inputs = cfg, inputs

    def set_steps(self, steps: int) -> None:
        from memkit.models.malt import EulerSampler

        self.sampler = EulerSampler(steps=steps)

    def init_state(self) -> Any:
        return self.net.init_states(1)

    @torch.no_grad()
    def segment(self, states: Any, s: int) -> Any:
        pos = self.net.segment_positions(s, 1)
        noise = self.inputs.x[s % len(self.inputs.x)]
        prompt, mask = self.inputs.prompt(s)
        # as memkit's stream runs a segment: one read plan for the denoising steps and the clean pass
        plans = self.net.plan_reads(states, pos, prompt=prompt, prompt_mask=mask)
        x = self.sampler.sample(self.net, noise, plans, pos, prompt=prompt, prompt_mask=mask)
        return self.net.write(x, plans, pos, prompt=prompt, prompt_mask=mask)


class TinyHost:
    """Fallback host when MALT is not available: memkit's TinySegmentModel."""

    def __init__(self, entry: Entry, g: Geometry, steps: int, inputs: Inputs, seed: int) -> None:
        from memkit.models.tiny import TinySegmentModel

        assert entry.make is not None
        make = entry.make
        torch.manual_seed(seed)
        self.model = TinySegmentModel(
            g.dim,
            g.dim,
            tokens_per_frame=g.tokens_per_frame,
            dim=g.dim,
            depth=2,
            heads=g.heads,
            memory=lambda i: make(),
        ).eval()
        self.g, self.steps, self.inputs = g, steps, inputs

    def set_steps(self, steps: int) -> None:
        self.steps = steps

    def init_state(self) -> Any:
        return self.model.init_states(1)

    @torch.no_grad()
    def segment(self, states: Any, s: int) -> Any:
        pos = _positions(s, self.g.frames_per_segment)
        x = self.inputs.x[s % len(self.inputs.x)]
        prompt, mask = self.inputs.prompt(s)
        for _ in range(self.steps):
            x = x - 0.1 * self.model(x, states, pos, prompt=prompt, prompt_mask=mask)[0]
        return self.model(x, states, pos, write=True, prompt=prompt, prompt_mask=mask)[1]


# --------------------------------------------------------------------------- streaming


@dataclasses.dataclass
class Stream:
    ms: list[float] = dataclasses.field(default_factory=list)
    nbytes: list[int] = dataclasses.field(default_factory=list)
    snapshots: dict[int, Any] = dataclasses.field(default_factory=dict)
    capped_at: int | None = None


def _advance(host: Any, stream: Stream, state: Any, s: int, keep: set[int]) -> Any:
    if s in keep:
        stream.snapshots[s] = state  # immutable: keeping the reference keeps the state
    start = time.perf_counter()
    state = host.segment(state, s)
    stream.ms.append(1000.0 * (time.perf_counter() - start))
    stream.nbytes.append(memkit.state_nbytes(state))
    return state


def run_lockstep(hosts: dict[str, Any], bounded: set[str], st: StreamSettings, desc: str) -> dict[str, Stream]:
    """Stream every host segment by segment, all advancing together."""
    keep = set(st.early()) | set(st.late())
    streams = {name: Stream() for name in hosts}
    states = {name: host.init_state() for name, host in hosts.items()}
    active = list(hosts)
    spent = dict.fromkeys(hosts, 0.0)
    gc.collect()
    gc.disable()
    try:
        for s in tqdm(range(st.segments), desc=desc, unit="seg"):
            for name in list(active):
                states[name] = _advance(hosts[name], streams[name], states[name], s, keep if name in bounded else set())
                spent[name] += streams[name].ms[-1] / 1000.0
                if name not in bounded and spent[name] > st.full_history_budget_s:
                    streams[name].capped_at = s + 1
                    active.remove(name)
                    states[name] = None
            if s % 64 == 63:
                gc.collect()
    finally:
        gc.enable()
    return streams


def run_one(host: Any, st: StreamSettings, desc: str, bounded: bool) -> Stream:
    """Stream one host alone (the unbounded baseline stops when its time budget runs out)."""
    keep = set(st.early()) | set(st.late()) if bounded else set()
    stream = Stream()
    state = host.init_state()
    spent = 0.0
    gc.collect()
    for s in tqdm(range(st.segments), desc=desc, unit="seg", leave=False):
        state = _advance(host, stream, state, s, keep)
        spent += stream.ms[-1] / 1000.0
        if not bounded and spent > st.full_history_budget_s:
            stream.capped_at = s + 1
            break
    return stream


def replay_ratio(host: Any, stream: Stream, st: StreamSettings) -> dict[str, float | int]:
    """``late / early`` per-segment time from interleaved replays of the kept states."""
    early, late = st.early(), st.late()
    cycle_a, cycle_b = itertools.cycle(early), itertools.cycle(late)

    def run(cycle: Any) -> Callable[[], Any]:
        def fn() -> Any:
            s = next(cycle)
            return host.segment(stream.snapshots[s], s)

        return fn

    samples = interleave(
        {"early": run(cycle_a), "late": run(cycle_b)}, repeats=st.replay_rounds * len(early), warmup=len(early)
    )
    return ratio_stats(samples["late"], samples["early"])


def _window_median(ms: list[float], idx: list[int]) -> float | None:
    vals = [ms[i] for i in idx if i < len(ms)]
    return statistics.median(vals) if vals else None


def _points(segments: int) -> list[int]:
    pts = [1]
    while pts[-1] * 2 <= segments:
        pts.append(pts[-1] * 2)
    if pts[-1] != segments:
        pts.append(segments)
    return pts


def _summarise(section: Section, name: str, stream: Stream, st: StreamSettings, bounded: bool) -> None:
    """Figures and series of one stream."""
    n = len(stream.ms)
    smooth = rolling_median(stream.ms, 9)
    for p in _points(n):
        section.add("ms_per_segment", smooth[p - 1], "ms", params={"memory": name, "segment": p}, kind="stream")
    section.add("state_bytes_first", stream.nbytes[0], "bytes", params={"memory": name})
    section.add("state_bytes_last", stream.nbytes[-1], "bytes", params={"memory": name, "segment": n})
    section.add(
        "state_bytes_distinct",
        len(set(stream.nbytes)),
        "count",
        params={"memory": name},
        note="number of different state sizes seen over the stream (1 = constant)",
    )
    a = _window_median(stream.ms, st.early())
    late_idx = list(range(max(0, n - st.window), n))
    b = _window_median(stream.ms, late_idx)
    if a and b:
        section.add(
            "stream_ratio_last_vs_ref",
            b / a,
            "x",
            params={"memory": name, "last": n, "reference": st.reference},
            note="median stream time over the last window / over the window around the reference segment",
        )
    section.series[name] = {
        "segment": list(range(1, n + 1)),
        "ms": [round(x, 4) for x in stream.ms],
        "ms_smooth": [round(x, 4) for x in smooth],
        "state_bytes": stream.nbytes,
        "bounded": bounded,
        "capped_at": stream.capped_at,
    }
    if stream.capped_at is not None:
        section.notes.append(
            f"{name} stopped at segment {stream.capped_at} of {st.segments}: it had used its time budget of "
            f"{st.full_history_budget_s:.0f} s (its cost grows with every segment)"
        )


# --------------------------------------------------------------------------- sections


def layer_cost(entries: list[Entry], g: Geometry, st: StreamSettings) -> Section:
    """Section 1a: per-segment time and state bytes at one MemoryAttention, segment 1 .. L."""
    sec = Section("cost_layer", "Cost vs video length: one memory layer")
    n_tokens = g.frames_per_segment * g.tokens_per_frame
    sec.config = {
        "level": "one memkit.MemoryAttention (qk_norm, rotary), batch 1, float32",
        "geometry": g.to_dict(),
        "tokens_per_segment": n_tokens,
        "stream": st.to_dict(),
        "segment": f"{st.steps} reads (denoising steps) + 1 clean pass that reads and writes",
        "prompt": "3 prompts of 8 tokens (one padded), switching every 4 segments",
    }
    inputs = make_inputs((1, n_tokens, g.dim), 8, g.heads * g.head_dim, st.seed)
    hosts, bounded = {}, set()
    for e in entries:
        if not e.available:
            sec.notes.append(f"skipped {e.name}: {e.why}")
            continue
        hosts[e.name] = LayerHost(e, g, st.steps, inputs, st.seed)
        if e.bounded:
            bounded.add(e.name)
    streams = run_lockstep(hosts, bounded, st, "cost/layer")
    for name, stream in streams.items():
        _summarise(sec, name, stream, st, name in bounded)
    for name in tqdm(sorted(bounded), desc="cost/layer replays"):
        r = replay_ratio(hosts[name], streams[name], st)
        sec.add(
            "ratio_last_vs_ref",
            r["median"],
            "x",
            spread=r,
            params={"memory": name, "last": st.segments, "reference": st.reference},
            note="interleaved replays of the segments around the last and the reference segment",
        )
    return sec


def backbone_cost(entries: list[Entry], cfg: Any, st: StreamSettings) -> Section:
    """Section 1b: per-segment time and state bytes of the whole backbone, segment 1 .. L."""
    sec = Section("cost_backbone", "Cost vs video length: whole backbone")
    if cfg is None:
        sec.skip("skipped: not available yet: memkit.models.malt (the reference backbone) cannot be imported")
        return sec
    sec.config = {
        "level": "memkit.models.malt.MALTNetwork, memory at every block, batch 1, float32",
        "model": cfg.to_dict(),
        "tokens_per_frame": cfg.tokens_per_frame,
        "frames_per_segment": cfg.token_frames,
        "stream": st.to_dict(),
        "segment": f"EulerSampler(steps={st.steps}) + the clean pass (net.write)",
    }
    shape = (1, cfg.frames_per_segment, cfg.channels, cfg.height, cfg.width)
    inputs = make_inputs(shape, 8, cfg.prompt_dim, st.seed)
    for e in entries:
        if not e.available:
            sec.notes.append(f"skipped {e.name}: {e.why}")
            continue
        host = BackboneHost(e, cfg, st.steps, inputs, st.seed)
        stream = run_one(host, st, f"cost/backbone {e.name}", e.bounded)
        _summarise(sec, e.name, stream, st, e.bounded)
        if e.bounded:
            r = replay_ratio(host, stream, st)
            sec.add(
                "ratio_last_vs_ref",
                r["median"],
                "x",
                spread=r,
                params={"memory": e.name, "last": st.segments, "reference": st.reference},
                note="interleaved replays of the segments around the last and the reference segment",
            )
        stream.snapshots.clear()
        del host
        gc.collect()
    return sec


# --------------------------------------------------------------------------- report


def cost_plots(
    results: dict[str, Any], save: Callable[[Any, str], None], plt: Any, color: Callable[[str], Any]
) -> None:
    """The two cost plots (time per segment and state bytes against length), one per level."""
    for key, title in (("cost_layer", "one memory layer"), ("cost_backbone", "whole backbone")):
        series = results["sections"].get(key, {}).get("series", {})
        if not series:
            continue
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, s in series.items():
            style = "--" if name == FULL_HISTORY else "-"
            ax_t.plot(s["segment"], s["ms_smooth"], style, color=color(name), label=name, lw=1.2)
            nz = [(x, y) for x, y in zip(s["segment"], s["state_bytes"], strict=True) if y > 0]
            if nz:
                ax_b.plot([x for x, _ in nz], [y for _, y in nz], style, color=color(name), lw=1.6)
        ax_t.set(xscale="log", yscale="log", xlabel="segment", ylabel="ms per segment (rolling median of 9)")
        ax_t.set_title(f"Time per segment: {title}")
        ax_b.set(xscale="log", yscale="log", xlabel="segment", ylabel="state bytes")
        ax_b.set_title("State size (NoMemory: 0 bytes, not drawn)")
        ax_t.legend(loc="upper left", fontsize=7)
        save(fig, f"{key}.png")


def render_cost(
    add: Callable[[str], None], sec: dict[str, Any] | None, key: str, plots: list[str], image_dir: str, title: str
) -> None:
    if skipped(add, sec, title):
        return
    assert sec is not None
    cfg = sec["config"]
    st = cfg["stream"]
    add(f"## {title}\n")
    add(f"Level: {cfg['level']}. A segment: {cfg['segment']}. Segments 1 to {st['segments']}.\n")
    image(add, plots, f"{key}.png", image_dir, title)
    figs = sec["figures"]
    mems = list(sec["series"])
    points = sorted({f["params"]["segment"] for f in figs if f["name"] == "ms_per_segment"})
    show = [p for p in points if p in (1, 4, 16, 64, 256, 1024, st["reference"]) or p == points[-1]]
    rows = []
    for mem in mems:

        def get(name: str, mem: str = mem, **p: Any) -> dict[str, Any] | None:
            return next(
                (
                    f
                    for f in figs
                    if f["name"] == name
                    and f["params"].get("memory") == mem
                    and all(f["params"].get(k) == v for k, v in p.items())
                ),
                None,
            )

        ms = [fmt((get("ms_per_segment", segment=p) or {}).get("value")) for p in show]
        ratio = get("ratio_last_vs_ref")
        stream_ratio = get("stream_ratio_last_vs_ref")
        first, last = get("state_bytes_first"), get("state_bytes_last")
        distinct = get("state_bytes_distinct")
        capped = sec["series"][mem].get("capped_at")
        rows.append(
            [
                mem + (f" (stopped at {capped})" if capped else ""),
                *ms,
                value_range(ratio),
                value_range(stream_ratio),
                fmt(int(first["value"]) if first else None),
                fmt(int(last["value"]) if last else None),
                "yes" if distinct and distinct["value"] == 1 else "**no**",
            ]
        )
    headers = [
        "memory",
        *[f"ms @ {p}" for p in show],
        f"replay ratio last/{st['reference']}",
        "stream ratio",
        "state bytes @ 1",
        "state bytes @ last",
        "constant",
    ]
    add(table(headers, rows) + "\n")
    add(
        f"ms @ N: rolling median of 9 segments around segment N, as streamed. Replay ratio: the segments "
        f"around the last one and around segment {st['reference']} re-run from kept states, taking turns "
        f"({st['window']}-segment windows, {st['replay_rounds']} pass(es) each); this is the figure the target uses. "
        "Stream ratio: the same from the stream itself (not interleaved, so load changes show).\n"
    )
    notes(add, sec)
