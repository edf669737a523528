"""A stream tour: a tiny random host walks a stream of segments with each memory.

Prints, per memory, the state bytes (constant over the stream) and milliseconds per
segment (denoising steps reading the memory, then one clean pass writing it).
Run with ``python -m memkit.tour``.
"""

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

import memkit
from memkit.models.tiny import TinySegmentModel


def tour_memories(heads: int, head_dim: int, tokens_per_frame: int, dim: int) -> dict[str, Callable[[int], Any]]:
    """A factory per memory memkit offers, sized for the tour's host."""
    h, d, t = heads, head_dim, tokens_per_frame
    makers: dict[str, Callable[[int], Any]] = {
        "NoMemory": lambda i: memkit.NoMemory(),
        "FIFOMemory": lambda i: memkit.FIFOMemory(h, d, t, frames=8),
        "SinkWindowMemory": lambda i: memkit.SinkWindowMemory(h, d, t, sink_frames=2, window_frames=6),
    }
    # the learned memories land one by one; the tour shows those this install has
    optional: dict[str, Callable[[Any], Callable[[int], Any]]] = {
        "RecurrentMemory": lambda cls: lambda i: cls(dim, h, d, slots=16),
        "SparseKVMemory": lambda cls: lambda i: cls(h, d, t, capacity=64, top_k=8),
        "PromptBankMemory": lambda cls: lambda i: cls(h, d, t, bank_frames=3),
    }
    for name, make in optional.items():
        if name in vars(memkit):
            makers[name] = make(vars(memkit)[name])
    return makers


@torch.no_grad()
def run_tour(segments: int = 32, steps: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Stream ``segments`` segments through a tiny host with each memory; return one row each."""
    heads, head_dim, t, frames, dim = 4, 16, 16, 2, 64
    rows = []
    for name, make in tour_memories(heads, head_dim, t, dim).items():
        torch.manual_seed(seed)
        try:
            model = TinySegmentModel(8, 8, tokens_per_frame=t, dim=dim, depth=2, heads=heads, memory=make).eval()
        except TypeError as err:  # a memory whose constructor differs from the tour's guess
            print(f"skipping {name}: {err}")
            continue
        states = model.init_states(1)
        first_bytes = memkit.state_nbytes(states)
        start = time.perf_counter()
        for s in tqdm(range(segments), desc=f"{name:>17}", leave=False):
            pos = torch.arange(s * frames, (s + 1) * frames)[None]
            x = torch.randn(1, frames * t, 8)
            for _ in range(steps):  # denoising steps: read only
                x = x - 0.1 * model(x, states, pos)[0]
            _, states = model(x, states, pos, write=True)  # clean pass: write once
        ms = 1000 * (time.perf_counter() - start) / segments
        rows.append({"memory": name, "state_bytes": memkit.state_nbytes(states), "ms_per_segment": ms,
                     "bytes_constant": memkit.state_nbytes(states) == first_bytes})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    rows = run_tour(args.segments, args.steps)
    print(f"{'memory':>17}  {'state bytes':>11}  {'ms/segment':>10}  constant")
    for r in rows:
        print(f"{r['memory']:>17}  {r['state_bytes']:>11}  {r['ms_per_segment']:>10.2f}  {r['bytes_constant']}")


if __name__ == "__main__":
    main()
