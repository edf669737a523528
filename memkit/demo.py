"""``memkit demo``: does memory bring back what the camera saw, 4x past the trained length?

The revisit world's sweep clips: a camera sweeps once over a canvas (the context, written
into memory through the clean pass), then moves over it along paths no model trained on
(back and forth, with pauses, fast, or dwelling on one half for a long time), and the model
generates every frame of that. Every generated frame shows a place the sweep showed; with
working memory the model copies it, without memory it can only guess.

The bundled checkpoints trained on clips whose excursion after the sweep was ``L = 8``
frames long; the demo generates ``4 L = 32`` frames and prints PSNR at 1x (frames 1-8) and
at 4x (frames 17-32), beside three references on the same weights: no memory, a flat grey
frame (the context's mean colour), and full-history attention. It writes a GIF per memory
(ground truth left, generated right), ``all.gif``, plots of PSNR against length and against
revisit lag, and ``results.json``.
"""

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEMO_MEMORIES", "asset_dir", "run_demo"]

_VARIANT_NAMES = {
    "full": "full history",
    "fifo-3": "local window 3",
    "sink-8": "sparse_kv + sink 8",
}

#: Checkpoints the demo loads, one per memory it was trained with.
DEMO_MEMORIES: tuple[str, ...] = ("sparse_kv", "recurrent")


def asset_dir(memory: str) -> Path:
    """Folder of the bundled checkpoint trained with ``memory`` (``memkit/assets/demo-<memory>``)."""
    return Path(str(resources.files("memkit") / "assets" / f"demo-{memory}"))


def run_demo(out: Path, *, clips: int = 1, steps: int = 8, multiple: int = 4) -> list[dict[str, Any]]:
    """Run the comparison, print the table, write GIFs, plots and ``results.json`` into ``out``.

    Args:
        out: output folder.
        clips: clips per path family and canvas kind (procedural, unseen photograph).
        steps: Euler steps per generated frame.
        multiple: generate ``multiple x`` the trained length (at least 4).
    """
    import torch

    from memkit.typing import set_typecheck

    _check_video_extra()
    # the models are tiny (16 tokens a frame): a second thread only adds synchronisation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    checking = set_typecheck(False)  # shapes are fixed here; the checks would double the run time
    try:
        return _run(out, clips, steps, multiple)
    finally:
        set_typecheck(checking)
        torch.set_num_threads(threads)


def _check_video_extra() -> None:
    from memkit.errors import MemkitError

    missing = []
    for module in ("imageio", "matplotlib", "pytorch_msssim", "skimage"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MemkitError(
            f"memkit demo needs the video extra ({', '.join(missing)} not installed): pip install 'memkit-video[video]'"
        )


def _run(out: Path, clips: int, steps: int, multiple: int) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from memkit.data import EVAL_PATHS, TEST_PHOTOS
    from memkit.errors import MemkitError
    from memkit.media import save_gif
    from memkit.models.malt import MALTNetwork
    from memkit.train import TrainConfig
    from memkit.train.long_eval import evaluate_long, trained_length

    found = [m for m in DEMO_MEMORIES if (asset_dir(m) / "model.safetensors").is_file()]
    if not found:
        raise MemkitError(f"no demo checkpoints found under {asset_dir('x').parent}; reinstall memkit")
    out.mkdir(parents=True, exist_ok=True)
    seeds = tuple(100_000 + i for i in range(clips))
    results: dict[str, Any] = {}
    L = 0
    bar = tqdm(found, desc="demo", unit="checkpoint")
    for memory in bar:
        path = asset_dir(memory)
        net = MALTNetwork.from_pretrained(path).eval()
        train_config = TrainConfig.load(path / "train_config.json")
        L = trained_length(train_config)
        world = dict(train_config.data.kwargs)
        refs = ("none", "grey", "full") if memory == found[0] else ("none",)
        variants = (
            {
                "fifo-3": {"name": "fifo", "kwargs": {"frames": 3}},
                "sink-8": {"name": "sparse_kv", "kwargs": {"capacity": 16, "top_k": 4, "always_frames": 8}},
            }
            if memory == "sparse_kv"
            else {}
        )
        for kind, sources in (("procedural", ("procedural",)), ("photos", TEST_PHOTOS)):
            bar.set_postfix(memory=memory, canvases=kind)
            res = evaluate_long(
                net,
                name=memory,
                trained_length=L,
                world={**world, "sources": sources},
                multiple=multiple,
                families=EVAL_PATHS,
                seeds=seeds,
                steps=steps,
                references=refs,
                variants=variants,
            )
            for label, r in res.items():
                key = label if label == memory or label == "grey" else f"{label} ({memory} weights)"
                if label in _VARIANT_NAMES:
                    key = f"{_VARIANT_NAMES[label]} ({memory} weights)"
                results.setdefault(key, {})[kind] = r
    bar.close()
    rows = [_row(name, by_kind) for name, by_kind in results.items()]
    _print_table(rows, L, multiple)
    _write_gifs(out, results, save_gif)
    _plot(rows, L, out)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("wrote one GIF per memory (left: ground truth, right: generated), all.gif, psnr_by_length.png,")
    print(f"psnr_by_lag.png and results.json to {out}")
    return rows


def _row(name: str, by_kind: dict[str, Any]) -> dict[str, Any]:
    proc, photos = by_kind["procedural"], by_kind.get("photos")
    return {
        "memory": name,
        "trained_length": proc.trained_length,
        "procedural": proc.summary(),
        "unseen_photos": None if photos is None else photos.summary(),
        "state_bytes": proc.state_bytes // max(1, proc.psnr.shape[0]),
        "ms_per_frame": proc.ms_per_frame,
    }


def _fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _print_table(rows: list[dict[str, Any]], L: int, multiple: int) -> None:
    def at(row: dict[str, Any], kind: str, m: int, metric: str = "psnr") -> float:
        summary = row[kind]
        return float("nan") if summary is None else summary["by_length"].get(f"{m}x", {}).get(metric, float("nan"))

    print()
    print(f"trained length L = {L} generated frames; 1x = frames 1-{L}, {multiple}x = frames "
          f"{L * multiple // 2 + 1}-{L * multiple}")  # fmt: skip
    head = (
        f"{'memory':<40}{'PSNR 1x':>9}{'PSNR 4x':>9}{'SSIM 4x':>9}{'recall 4x':>10}{'photos 4x':>11}{'state bytes':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['memory']:<40}{_fmt(at(r, 'procedural', 1)):>9}{_fmt(at(r, 'procedural', 4)):>9}"
            f"{_fmt(at(r, 'procedural', 4, 'ssim')):>9}{_fmt(at(r, 'procedural', 4, 'recall'), '.0%'):>10}"
            f"{_fmt(at(r, 'unseen_photos', 4)):>11}{r['state_bytes']:>13,}"
        )
    print("(PSNR in dB on procedural canvases; 'photos 4x' on photographs no model trained on;")
    print(" recall: share of frames whose nearest context frame shows the right place)")
    print()


def _write_gifs(out: Path, results: dict[str, Any], save_gif: Any) -> None:
    """One GIF per memory of the first clip: ground truth left, the context sweep then generated right."""
    import torch

    named = {k: v["procedural"] for k, v in results.items() if v["procedural"].video is not None}
    if not named:
        return
    truth = next(iter(named.values())).truth
    panels = [truth]
    for name, res in named.items():
        shown = torch.cat([truth[: truth.shape[0] - res.video.shape[0]], res.video])
        save_gif(out / f"{_slug(name)}.gif", torch.cat([truth, _divider(truth), shown], dim=-1), fps=4)
        panels += [_divider(truth), shown]
    save_gif(out / "all.gif", torch.cat(panels, dim=-1), fps=4)


def _divider(frames: Any) -> Any:
    """A one-pixel white column between GIF panels ``(T C H 1)``."""
    return frames.new_ones(*frames.shape[:-1], 1)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_").replace("__", "_")


def _plot(rows: list[dict[str, Any]], L: int, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'memkit-video[video]'): no plots")
        return
    lengths = {r["memory"]: {int(k[:-1]): v["psnr"] for k, v in r["procedural"]["by_length"].items()} for r in rows}
    shown = sorted({m for curve in lengths.values() for m in curve})
    ax = _lines(plt, lengths, "quality along length (procedural canvases)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shown)
    ax.set_xticklabels([f"{m}x" for m in shown])
    ax.set_xlabel(f"generated length, in multiples of the trained length (L = {L} frames)")
    ax.set_ylabel("PSNR of the frames in that bucket (dB)")
    _save(plt, ax, out / "psnr_by_length.png")
    lags = {r["memory"]: {d["lag"]: d["psnr"] for d in r["procedural"]["by_lag"]} for r in rows}
    ax = _lines(plt, lags, "quality along revisit lag (procedural canvases)")
    ax.set_xlabel("revisit lag: frames since the place was last on screen")
    ax.set_ylabel("PSNR (dB)")
    _save(plt, ax, out / "psnr_by_lag.png")


def _lines(plt: Any, curves: dict[str, dict[Any, float]], title: str) -> Any:
    """One line per memory: ``curves[memory] = {x: PSNR}``."""
    _, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        if curve:
            ax.plot(list(curve), list(curve.values()), marker="o", label=name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def _save(plt: Any, ax: Any, path: Path) -> None:
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)
    plt.close(ax.figure)
