"""``memkit demo``: does memory bring back what the camera saw? The revisit world, three ways.

A camera pans out over a canvas and comes back. The outbound sweep is given as context
(written into memory through the clean pass); the model then generates the return sweep,
where every frame shows a place already seen. With a memory it can copy what it saw; without
one it can only guess. The demo prints PSNR of the revisited frames against the ground
truth, milliseconds per segment and memory-state bytes, and saves a GIF per memory
(ground truth left, generated right) and a PNG plot of PSNR per segment.

The checkpoints are small models (about a megabyte each) trained with ``memkit train`` on
the revisit world, one per memory; docs/guides/generating.md has the exact commands.
"""

import json
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MEMORIES", "asset_dir", "run_demo"]

#: Memories the demo compares, each with the checkpoint trained with it.
DEMO_MEMORIES: tuple[str, ...] = ("sparse_kv", "recurrent", "fifo", "none")


def asset_dir(memory: str) -> Path:
    """Folder of the bundled checkpoint trained with ``memory`` (``memkit/assets/demo-<memory>``)."""
    return Path(str(resources.files("memkit") / "assets" / f"demo-{memory}"))


def run_demo(out: Path, *, clips: int = 8, steps: int = 8, segments: int | None = None) -> list[dict[str, Any]]:
    """Run the comparison, print the table, write GIFs, plot and ``results.json`` into ``out``."""
    import torch

    from memkit.typing import set_typecheck

    # the models are tiny (16 tokens a frame): a second thread only adds synchronisation, and on a
    # busy machine OpenMP threads spinning against each other made the demo 30x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    checking = set_typecheck(False)  # shapes are fixed here; the checks would double the run time
    try:
        return _run(out, clips, steps, segments)
    finally:
        set_typecheck(checking)
        torch.set_num_threads(threads)


def _run(out: Path, clips: int, steps: int, segments: int | None) -> list[dict[str, Any]]:
    import torch

    from memkit.cli import CLIError, _save_gif
    from memkit.data import TEST_PHOTOS
    from memkit.models.malt import MALTNetwork
    from memkit.train import TrainConfig
    from memkit.train.evaluate import evaluate_revisit, revisit_task

    found = [m for m in DEMO_MEMORIES if (asset_dir(m) / "model.safetensors").is_file()]
    if not found:
        raise CLIError(f"no demo checkpoints found under {asset_dir('x').parent}; reinstall memkit")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    panels: list[Any] = []
    seeds = tuple(100_000 + i for i in range(clips))
    print(f"revisit world: outbound sweep given as context, return sweep generated ({clips} clips, {steps} steps)")
    for memory in found:
        path = asset_dir(memory)
        net = MALTNetwork.from_pretrained(path).eval()
        train_config = TrainConfig.load(path / "train_config.json")
        clip_segments = segments or train_config.max_segments()
        world = train_config.data.kwargs  # the clips the model was trained on (held-out seeds)
        res = evaluate_revisit(net, segments=clip_segments, seeds=seeds, steps=steps, world=world)
        # the same task on photographs no model saw in training (it trained on procedural canvases)
        photo_world = {**world, "sources": TEST_PHOTOS}
        photos = evaluate_revisit(net, segments=clip_segments, seeds=seeds, steps=steps, world=photo_world)
        # whole clip: the outbound sweep (context, the same on both sides), then the return sweep
        truth, _ = revisit_task(net, seeds[0], clip_segments, world=world)
        truth = truth[0]
        context = truth[: truth.shape[0] - res.video.shape[0]]
        shown = torch.cat([context, res.video.cpu()])
        _save_gif(out / f"{memory}.gif", torch.cat([truth, _divider(truth), shown], dim=-1), fps=2)
        if not panels:
            panels.append(truth)
        panels += [_divider(truth), shown]
        rows.append(
            {
                "memory": memory,
                "psnr": res.psnr,
                "psnr_per_segment": res.psnr_per_segment,
                "psnr_unseen_photos": photos.psnr,
                "ms_per_segment": res.ms_per_segment,
                "state_bytes": res.state_bytes,
            }
        )
        print(f"  {memory:<10} done", flush=True)
    _save_gif(out / "all.gif", torch.cat(panels, dim=-1), fps=2)
    _print_table(rows)
    _plot(rows, out / "psnr_per_segment.png")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = ", ".join(r["memory"] + ".gif" for r in rows)
    print(f"wrote {names} (left: ground truth, right: generated), all.gif (truth, then {', '.join(found)}),")
    print(f"psnr_per_segment.png and results.json to {out}")
    return rows


def _divider(frames: Any) -> Any:
    """A one-pixel white column between GIF panels ``(T C H 1)``."""
    return frames.new_ones(*frames.shape[:-1], 1)


def _print_table(rows: list[dict[str, Any]]) -> None:
    base = next((r["psnr"] for r in rows if r["memory"] == "none"), None)
    print()
    print(
        f"{'memory':<12}{'PSNR revisited (dB)':>21}{'vs none':>10}{'unseen photos (dB)':>20}"
        f"{'ms / segment':>15}{'state bytes':>14}"
    )
    for r in rows:
        gap = f"{r['psnr'] - base:+.2f}" if base is not None else "-"
        print(
            f"{r['memory']:<12}{r['psnr']:>21.2f}{gap:>10}{r['psnr_unseen_photos']:>20.2f}"
            f"{r['ms_per_segment']:>15.1f}{r['state_bytes']:>14,}"
        )
    print()


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'memkit[video]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        ax.plot(range(1, len(r["psnr_per_segment"]) + 1), r["psnr_per_segment"], marker="o", label=r["memory"])
    ax.set_xticks(range(1, 1 + max(len(r["psnr_per_segment"]) for r in rows)))
    ax.set_xlabel("generated segment of the return sweep")
    ax.set_ylabel("PSNR vs ground truth (dB)")
    ax.set_title("revisited frames: memory vs none")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
