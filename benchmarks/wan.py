"""Overhead at the anchors' geometry: one Wan-2.1-1.3B-shaped DiT block with MemFlow's budgets.

The reference backbone is small (width 256, 96 tokens a segment), so fixed per-call costs
weigh more there than in the models people run. This level measures one block shaped like
Wan 2.1 1.3B (width 1536, 12 heads of 128, MLP 8960; self-attention with memory,
cross-attention to a 512-token text prompt, MLP, adaLN-style modulation) at a resolution
that fits a CPU (390 tokens a frame, 3 frames a chunk), with MemFlow's released budgets:
frame sink 3, bank 3, local window 12 frames of keys (the chunk's own 3 and 9 past), SMA
top-k 3. A segment is ``steps`` denoising passes (each reads the memory through the
segment's read plan) and the clean pass that writes it.

The memory-free baseline is what MemFlow compares against: the local window alone
(LongLive/Self-Forcing's rolling KV cache). Each memory is compared with the baseline and
with a dense control that attends to the same number of key frames without choosing them
(a FIFO window of that size): ``control / baseline`` is the price of the extra keys,
``memory / control`` the price of everything else (selection, gathers, rotation, the
write, Python). All of them take turns in every round (interleaved in one process). Each
memory's write and read plan (once per segment each) are then timed alone, so the part of
``memory / control`` that is the write shows separately.
"""

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import memkit
from benchmarks.common import Section, interleave, ratio_stats, stats
from benchmarks.markdown import fmt, notes, skipped, table, value_range


@dataclasses.dataclass
class WanSettings:
    dim: int = 1536
    heads: int = 12
    mlp: int = 8960
    tokens_per_frame: int = 390
    frames: int = 3  # per chunk
    prompt_tokens: int = 512
    steps: int = 4  # denoising steps per segment (MemFlow and LongLive sample with 4)
    sink: int = 3
    bank: int = 3
    window: int = 12  # frames of keys in the local window, the chunk's own included
    top_k: int = 3
    capacity: int = 24  # SparseKV ring (frames)
    # timed rounds; 0: as many full rotations (every memory once in every position of a round) as fit in
    # budget_s, at least one, sized from each memory's untimed first segment
    rounds: int = 0
    budget_s: float = 840.0
    warmup_rounds: int = 0
    warm_segments: int = 10  # segments written into each memory before timing (chunks, no block pass)
    warm_pass: bool = True  # one untimed segment per memory before the rounds (first-call allocations; sizing)
    # also time these memories with each step's read + rotary + attention compiled
    # (MemoryAttention.compile_read_attend: torch.compile fullgraph, inductor); their untimed first segment compiles
    compiled: tuple[str, ...] = ()
    # then each memory's write and read plan alone (the same state, a chunk of the segment's shape), interleaved
    part_rounds: int = 5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class WanBlock(nn.Module):
    """One Wan-2.1-shaped DiT block: modulated self-attention with memory, cross-attention, MLP."""

    def __init__(self, s: WanSettings, memory: Any) -> None:
        super().__init__()
        d = s.dim
        self.heads = s.heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = memkit.MemoryAttention(d, s.heads, memory, qk_norm=True)
        self.norm3 = nn.LayerNorm(d, eps=1e-6)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, s.mlp), nn.GELU(approximate="tanh"), nn.Linear(s.mlp, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: Tensor, state: Any, pos: Tensor, prompt: Tensor, e: Tensor, write: bool) -> tuple[Tensor, Any]:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).chunk(6, dim=1)
        a, state = self.attn.step(self.norm1(x) * (1 + scale1) + shift1, state, pos, prompt, write=write)
        x = x + gate1 * a
        b, n, d = x.shape
        q = self.cross_q(self.norm3(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.cross_kv(prompt).view(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        c = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.cross_out(c)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x, state


def memories(s: WanSettings) -> dict[str, tuple[Callable[[], Any], int, str]]:
    """name -> (factory, key frames attended besides the chunk's own, the dense control it is compared with)."""
    h, d, t = s.heads, s.dim // s.heads, s.tokens_per_frame
    past = s.window - s.frames  # the local window's past frames

    def fifo(frames: int) -> Callable[[], Any]:
        return lambda: memkit.FIFOMemory(h, d, t, frames=frames)

    out: dict[str, tuple[Callable[[], Any], int, str]] = {
        f"local window {s.window}": (fifo(past), past, ""),
        f"dense {s.window + 1}": (fifo(past + 1), past + 1, ""),
        f"dense {s.window + s.sink}": (fifo(past + s.sink), past + s.sink, ""),
        f"dense {s.window + s.sink + s.bank}": (fifo(past + s.sink + s.bank), past + s.sink + s.bank, ""),
        "SinkWindow": (
            lambda: memkit.SinkWindowMemory(h, d, t, sink_frames=s.sink, window_frames=past),
            s.sink + past,
            f"dense {s.window + s.sink}",
        ),
        "PromptBank+SparseKV": (
            lambda: memkit.compose(
                memkit.PromptBankMemory(h, d, t, bank_frames=s.bank),
                memkit.SparseKVMemory(h, d, t, capacity=s.capacity, top_k=past, always_frames=s.sink),
            ),
            s.bank + s.sink + past,
            f"dense {s.window + s.sink + s.bank}",
        ),
        "RecurrentMemory + window": (
            lambda: memkit.compose(
                memkit.FIFOMemory(h, d, t, frames=past), memkit.RecurrentMemory(s.dim, h, d, slots=t)
            ),
            past + 1,
            f"dense {s.window + 1}",
        ),
    }
    if hasattr(memkit, "MemFlowMemory"):
        out["MemFlow NAM+SMA"] = (
            lambda: memkit.MemFlowMemory(
                h, d, t, sink_frames=s.sink, window_frames=past, bank_frames=s.bank, top_k=s.top_k
            ),
            s.top_k + past,
            f"dense {s.window + s.sink}",
        )
    return out


class _Host:
    """One block with one memory, warmed; ``segment()`` runs one segment from the same state."""

    def __init__(
        self, s: WanSettings, make: Callable[[], Any], inputs: dict[str, Tensor], compiled: bool = False
    ) -> None:
        torch.manual_seed(s.seed)  # the same block weights for every memory
        self.block = WanBlock(s, make()).eval()
        if compiled:
            self.block.attn.compile_read_attend()
        self.s, self.inputs = s, inputs
        h, d, t, f = s.heads, s.dim // s.heads, s.tokens_per_frame, s.frames
        g = torch.Generator().manual_seed(s.seed + 1)
        mem = self.block.attn.memory
        state = self.block.attn.init_state(1)
        with torch.no_grad():
            for i in range(s.warm_segments):  # fill every buffer with written chunks (no block pass: cheap)
                k = torch.randn(1, h, f * t, d, generator=g)
                hidden = torch.randn(1, f * t, s.dim, generator=g)
                pos = (i * f + torch.arange(f))[None]
                state = mem.write(state, memkit.Chunk(k, k, hidden, pos, t, inputs["prompt"]))
        self.state = state
        self.pos = (s.warm_segments * f + torch.arange(f))[None]
        k = torch.randn(1, h, f * t, d, generator=g)
        self.chunk = memkit.Chunk(k, k, torch.randn(1, f * t, s.dim, generator=g), self.pos, t, inputs["prompt"])
        self.first_s = 0.0
        if s.warm_pass:  # one untimed segment: first-call allocations stay out of the timed rounds
            start = time.perf_counter()
            self.segment()
            self.first_s = time.perf_counter() - start

    @torch.no_grad()
    def write_alone(self) -> Any:
        """The memory's write of one chunk (what the clean pass hands it), without the block."""
        return self.block.attn.memory.write(self.state, self.chunk)

    @torch.no_grad()
    def plan_alone(self) -> Any:
        """The segment's read plan (once per segment), without the block."""
        return self.block.attn.plan(self.state, self.pos, self.s.tokens_per_frame, self.inputs["prompt"])

    @torch.no_grad()
    def segment(self) -> Any:
        x, prompt, e = self.inputs["x"], self.inputs["prompt"], self.inputs["e"]
        plan = self.block.attn.plan(self.state, self.pos, self.s.tokens_per_frame, prompt)
        for _ in range(self.s.steps):
            out, _ = self.block(x, plan, self.pos, prompt, e, False)
        _, state = self.block(x, plan, self.pos, prompt, e, True)
        return out, state


def wan_section(s: WanSettings) -> Section:
    """Section 2b: per-segment time of each memory in a Wan-shaped block, interleaved, with its dense control."""
    sec = Section("wan", "Overhead at the anchors' geometry (a Wan-2.1-1.3B-shaped block)")
    mems = memories(s)
    sec.config = {
        "settings": s.to_dict(),
        "block": f"width {s.dim}, {s.heads} heads of {s.dim // s.heads}, MLP {s.mlp}; self-attention with memory "
        f"(qk RMS norm, rotary), cross-attention to {s.prompt_tokens} prompt tokens, MLP, adaLN modulation",
        "segment": f"{s.frames} frames of {s.tokens_per_frame} tokens; {s.steps} denoising passes through the "
        "segment's read plan + the clean pass that writes",
        "baseline": f"local window {s.window}: a FIFO of {s.window - s.frames} past frames (+ the chunk's own "
        f"{s.frames}), LongLive/Self-Forcing's rolling KV cache",
        "memories": {name: {"key_frames_besides_own": kf, "control": c or None} for name, (_, kf, c) in mems.items()},
        "threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
    }
    g = torch.Generator().manual_seed(s.seed)
    n = s.frames * s.tokens_per_frame
    inputs = {
        "x": torch.randn(1, n, s.dim, generator=g),
        "prompt": torch.randn(1, s.prompt_tokens, s.dim, generator=g),
        "e": torch.randn(1, 6, s.dim, generator=g) * 0.1,
    }
    hosts = {name: _Host(s, make, inputs) for name, (make, _, _) in mems.items()}
    compiled = {f"{name} compiled": name for name in s.compiled if name in mems}
    for name, eager in compiled.items():
        hosts[name] = _Host(s, mems[eager][0], inputs, compiled=True)  # its untimed first segment compiles
    fns = {name: h.segment for name, h in hosts.items()}
    rounds = s.rounds
    if rounds <= 0:
        # a round runs every memory once: fit whole rotations (len(hosts) rounds each) into the budget
        # (a compiled memory's first segment is its compilation: sized from its eager twin)
        per_round = sum(hosts[compiled.get(n, n)].first_s for n in hosts) or 1.0
        rotations = max(1, math.floor(s.budget_s / (per_round * len(hosts))))
        rounds = rotations * len(hosts)
        sec.config["sizing"] = {
            "first_segment_s": {n: round(h.first_s, 2) for n, h in hosts.items()},
            "round_s": round(per_round, 1),
            "rotations": rotations,
            "budget_s": s.budget_s,
        }
    if compiled:
        sec.config["compile_s"] = {n: round(hosts[n].first_s, 1) for n in compiled}
    sec.config["rounds"] = rounds
    with tqdm(total=rounds, desc="wan block", unit="round") as bar:
        samples = interleave(fns, repeats=rounds, warmup=s.warmup_rounds, progress=bar)
    sec.config["load_average_end"] = list(os.getloadavg())
    base = f"local window {s.window}"
    for name, xs in samples.items():
        st = stats(xs, 1000.0)
        sec.add("ms_per_segment", st["median"], "ms", spread=st, params={"memory": name})
        if name != base:
            r = ratio_stats(xs, samples[base])
            sec.add("ratio_vs_window", r["median"], "x", spread=r, params={"memory": name})
        if name in compiled:
            r = ratio_stats(xs, samples[compiled[name]])
            sec.add("compiled_ratio", r["median"], "x", spread=r, params={"memory": compiled[name]})
            continue
        control = mems[name][2]
        if control:
            r = ratio_stats(samples[control], samples[base])
            sec.add("extra_keys_ratio", r["median"], "x", spread=r, params={"memory": name, "control": control})
            r = ratio_stats(xs, samples[control])
            sec.add("beyond_keys_ratio", r["median"], "x", spread=r, params={"memory": name, "control": control})
    # where the time beyond the keys goes: the write and the plan (once per segment each), timed alone
    uncompiled = [n for n in hosts if n not in compiled]
    parts = {f"{n}: {what}": getattr(hosts[n], f"{what}_alone") for n in uncompiled for what in ("write", "plan")}
    with tqdm(total=s.part_rounds, desc="wan write + plan", unit="round") as bar:
        part_samples = interleave(parts, repeats=s.part_rounds, warmup=1, progress=bar)
    for name in uncompiled:
        segment_ms = stats(samples[name], 1000.0)["median"]
        for what in ("write", "plan"):
            st = stats(part_samples[f"{name}: {what}"], 1000.0)
            sec.add(f"{what}_ms", st["median"], "ms", spread=st, params={"memory": name})
            sec.add(f"{what}_share", st["median"] / segment_ms, "fraction", params={"memory": name})
    if "SinkWindow" in samples:
        r = ratio_stats(samples["PromptBank+SparseKV"], samples["SinkWindow"])
        sec.add("ratio_vs_sinkwindow", r["median"], "x", spread=r, params={"memory": "PromptBank+SparseKV"})
        if "MemFlow NAM+SMA" in samples:
            r = ratio_stats(samples["MemFlow NAM+SMA"], samples["SinkWindow"])
            sec.add("ratio_vs_sinkwindow", r["median"], "x", spread=r, params={"memory": "MemFlow NAM+SMA"})
    sec.notes.append(
        f"{rounds} rounds after {s.warmup_rounds} warm-up round(s) and one untimed segment per memory, every "
        "memory once per round (order rotating); "
        f"load average {sec.config['load_average_start'][0]:.1f} at the start, "
        f"{sec.config['load_average_end'][0]:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    return sec


def render_wan(add: Callable[[str], None], sec: dict[str, Any] | None) -> None:
    """The section's Markdown."""
    if skipped(add, sec, "2b. Overhead at the anchors' geometry (a Wan-2.1-1.3B-shaped block)"):
        return
    assert sec is not None
    add("## 2b. Overhead at the anchors' geometry (a Wan-2.1-1.3B-shaped block)\n")
    cfg = sec["config"]
    add(f"Block: {cfg['block']}. Segment: {cfg['segment']}. Baseline: {cfg['baseline']}.\n")
    add(
        "Each memory is compared with the baseline and with a dense control: a FIFO window that attends to the "
        "same number of key frames without choosing them. Control / baseline is the price of the extra keys; "
        "memory / control is the price of everything else (selection, gathers, rotation, the write, Python).\n"
    )
    figs = sec["figures"]

    def get(name: str, memory: str) -> dict[str, Any] | None:
        return next((f for f in figs if f["name"] == name and f["params"].get("memory") == memory), None)

    rows = []
    for memory, info in cfg["memories"].items():
        ms = get("ms_per_segment", memory)

        def part(what: str, memory: str = memory) -> str:
            took, share = get(f"{what}_ms", memory), get(f"{what}_share", memory)
            return f"{fmt(took['value'])} ({share['value']:.1%})" if took and share else "-"

        rows.append(
            [
                memory,
                str(info["key_frames_besides_own"]),
                value_range(ms) if ms else "-",
                value_range(get("ratio_vs_window", memory)) if get("ratio_vs_window", memory) else "1",
                (f"{value_range(get('extra_keys_ratio', memory))} ({info['control']})" if info["control"] else "-"),
                value_range(get("beyond_keys_ratio", memory)) if info["control"] else "-",
                part("write"),
                part("plan"),
            ]
        )
    add(
        table(
            ["memory", "key frames (past)", "ms per segment", "x window", "extra keys (control / window)",
             "beyond the keys (memory / control)", "write alone, ms (of its segment)",
             "read plan alone, ms (of its segment)"],
            rows,
        )
        + "\n"
    )  # fmt: skip
    if any(f["name"] == "write_ms" for f in figs):
        add(
            "The write and the read plan run once per segment; each is also timed alone (the same warmed state, a "
            "chunk of the segment's shape; interleaved, medians), so a reader can see which part of what a memory "
            "costs beyond its keys is its write.\n"
        )
    for f in figs:
        if f["name"] == "ratio_vs_sinkwindow":
            add(f"- {f['params']['memory']} vs SinkWindow: {fmt(f['value'])}x ({value_range(f)}).")
    compile_note(add, figs, cfg.get("compile_s", {}), "`MemoryAttention.compile_read_attend()`")
    add("")
    notes(add, sec)


def compile_note(add: Callable[[str], None], figs: list[dict[str, Any]], compile_s: dict[str, float], how: str) -> None:
    """One line per memory timed with its reads compiled: compiled / eager per segment, and the compile time."""
    lines = 0
    for f in figs:
        if f["name"] == "compiled_ratio":
            mem = f["params"]["memory"]
            took = compile_s.get(f"{mem} compiled")
            steps = f" at {f['params']['steps']} steps" if "steps" in f["params"] else ""
            add(
                f"- {mem} with {how} (torch.compile fullgraph, inductor){steps}: compiled / eager per segment "
                f"{fmt(f['value'])}x ({value_range(f)})"
                + (f"; its first segment, which compiles, took {took:.0f} s." if took is not None else ".")
            )
            lines += 1
    if lines:
        add("")
