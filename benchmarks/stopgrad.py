"""Stop-gradient across segments (MALT) against backprop through the whole unroll, on the demo setting.

``MEMKIT_TYPECHECK=0 OMP_NUM_THREADS=1 python -m benchmarks.stopgrad [--steps N] [--batch B] [--memory recurrent]``

Trains the ``demo-<memory>`` preset (16x16 frames, one frame a segment, the revisit world)
for a few hundred steps twice from the same seed, once with ``truncate_segments=1`` (each
write trained only by the next segment's loss) and once with ``truncate_segments=None``
(BPTT), then scores both on the demo's return sweep (PSNR of the generated revisit, three
clips) and reports seconds per step. A short run: it compares the two settings at a matched
budget, it does not train a model to convergence.
"""

import argparse
import json
import tempfile
import time

import torch

from memkit.train import TrainConfig, train
from memkit.train.evaluate import evaluate_revisit


def run(memory: str, steps: int, segments: int, batch: int, seeds: tuple[int, ...]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, truncate in (("stop-gradient (truncate_segments=1)", 1), ("BPTT (truncate_segments=None)", None)):
        cfg = TrainConfig.preset(
            f"demo-{memory}",
            steps=steps,
            segments=segments,
            batch_size=batch,
            curriculum=[],
            truncate_segments=truncate,
            checkpoint_every=10 * steps,
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = train(cfg, tmp, progress=False)
            seconds = time.perf_counter() - start
        net = result.net.eval()
        net.load_state_dict(result.ema)
        with torch.no_grad():
            score = evaluate_revisit(net, segments=16, seeds=seeds, world=cfg.data.kwargs)
        out[label] = {
            "psnr_return_sweep_db": round(score.psnr, 2),
            "final_loss_mean_last_20": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4),
            "seconds_per_step": round(seconds / steps, 3),
        }
        print(label, out[label], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="recurrent")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.memory, args.steps, args.segments, args.batch, (100_000, 100_001, 100_002))
    print(json.dumps({**vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
