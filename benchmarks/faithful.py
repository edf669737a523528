"""The published memories' settings beside memkit's, swapped into one trained checkpoint.

``MEMKIT_TYPECHECK=0 OMP_NUM_THREADS=1 python -m benchmarks.faithful [--cost-only]``

Loads the bundled ``demo-sparse_kv`` checkpoint and swaps, at every memory layer, the
parameter-free memories of the roster (``benchmarks/roster.py``: LongLive's budget, MemFlow's
NAM and NAM + SMA, memkit's matched-budget sink + window, no memory) for the one it was
trained with; every other weight stays. Scores the demo task (:func:`evaluate_revisit`: the
outbound sweep as context, PSNR of the generated return sweep, three clips) and the
milliseconds per generated segment. A training-free swap measures what each memory gives a
model trained with another one, not what it would give a model trained with it.

Then the cost at one ``MemoryAttention`` of the full benchmarks' layer geometry (4 heads of 32,
16 tokens a frame, chunks of 3 frames as MemFlow's): one segment = a read plan (what no step's
queries change: windows, sinks, the prompt's bank, prepared once, as the MALT sampler does) +
4 denoising reads (MemFlow's 4 steps) + the clean pass that writes, from a state after 48
segments; the memories take turns
in every round and the ratios are medians of per-round ratios.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import memkit
from benchmarks.common import interleave, ratio_stats, stats
from benchmarks.cost import LayerHost, make_inputs
from benchmarks.quality import _geometry, _swap
from benchmarks.roster import LONGLIVE, Geometry, roster
from memkit.models.malt import MALTNetwork
from memkit.train import TrainConfig
from memkit.train.evaluate import evaluate_revisit

NAMES = ("NoMemory", "SinkWindowMemory", "LongLive", "MemFlow NAM", "MemFlow NAM+SMA")
COST_NAMES = (*NAMES, "SparseKVMemory", "PromptBank+SparseKV")


class PlannedLayerHost(LayerHost):
    """A layer segment as the MALT sampler runs it: reads planned once per segment, then the steps."""

    @torch.no_grad()
    def segment(self, state: Any, s: int) -> Any:
        pos = torch.arange(s * self.g.frames_per_segment, (s + 1) * self.g.frames_per_segment)[None]
        x = self.inputs.x[s % len(self.inputs.x)]
        prompt, mask = self.inputs.prompt(s)
        plan = self.attn.plan(state, pos, self.g.tokens_per_frame, prompt, mask)
        for _ in range(self.steps):
            self.attn(x, plan, pos, prompt, mask)
        _, state = self.attn.forward_and_write(x, plan, pos, prompt, mask)
        return state


def layer_cost(rounds: int = 30) -> dict[str, dict[str, float]]:
    g = Geometry(heads=4, head_dim=32, tokens_per_frame=16, dim=128, frames_per_segment=3, capacity=64)
    inputs = make_inputs((1, g.frames_per_segment * g.tokens_per_frame, g.dim), 8, g.heads * g.head_dim, 0)
    hosts = {
        e.name: PlannedLayerHost(e, g, 4, inputs, 0) for e in roster(g, full_history=False) if e.name in COST_NAMES
    }
    warmed = {}
    for name, host in hosts.items():
        state = host.init_state()
        for s in range(48):
            state = host.segment(state, s)
        warmed[name] = state

    def call(name: str) -> Callable[[], Any]:
        return lambda: hosts[name].segment(warmed[name], 48)

    samples = interleave({n: call(n) for n in hosts}, repeats=rounds, warmup=2)
    out = {}
    for name, xs in samples.items():
        out[name] = {
            "ms_per_segment": round(float(stats(xs, 1000.0)["median"]), 3),
            "x_NoMemory": round(float(ratio_stats(xs, samples["NoMemory"])["median"]), 3),
            "x_LongLive": round(float(ratio_stats(xs, samples[LONGLIVE])["median"]), 3),
        }
        print("layer", name, out[name], flush=True)
    return out


def quality() -> dict[str, dict[str, float]]:
    path = Path(memkit.__file__).parent / "assets" / "demo-sparse_kv"
    net = MALTNetwork.from_pretrained(path).eval()
    world = TrainConfig.load(path / "train_config.json").data.kwargs
    cfg = net.config
    layers = set(cfg.memory_layers())
    variants = [("SparseKVMemory (as trained)", net)]
    for e in roster(_geometry(cfg), full_history=False):
        if e.name in NAMES and e.make is not None:
            variants.append(
                (f"{e.name} {e.config}", _swap(net, [e.make() if i in layers else None for i in range(cfg.depth)]))
            )
    results: dict[str, dict[str, float]] = {}
    for name, model in variants:
        with torch.no_grad():
            r = evaluate_revisit(model, segments=16, seeds=(100_000, 100_001, 100_002), world=world)
        results[name] = {
            "psnr_db": round(r.psnr, 2),
            "ms_per_segment": round(r.ms_per_segment, 1),
            "state_bytes": r.state_bytes,
        }
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {} if args.cost_only else {"quality": quality()}
    results["layer_cost"] = layer_cost()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
