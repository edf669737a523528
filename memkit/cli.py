"""The ``memkit`` command: ``train``, ``generate`` and ``demo``.

Every refusal (bad arguments, missing or unreadable files) is one line on stderr and a
non-zero exit status, never a traceback.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from memkit.errors import CLIError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({err.msg})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


_TRUST_HELP = (
    "allow a config or checkpoint whose memory is 'module:Class' (memkit imports that module, running its code); "
    "only for files whose origin you trust"
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memkit", description="Memory modules for long video generation: train, generate, demo.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train a MALT model (also under torchrun --nproc_per_node=N)")
    tr.add_argument("--config", default="tiny", help="a preset name (tiny, demo-sparse_kv, ...) or a JSON file")
    tr.add_argument("--steps", type=_positive, help="train up to this many steps (default: the config's)")
    tr.add_argument("--out", required=True, help="output folder (resumes from a checkpoint found there)")
    tr.add_argument("--batch-size", type=_positive, help="clips per process per step")
    tr.add_argument("--memory", help="memory name, overriding the config's (see memkit.memories.memory_names)")
    tr.add_argument("--memory-kwargs", type=_json_arg, help="the memory's options as JSON, e.g. '{\"capacity\": 16}'")
    tr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    tr.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out instead of resuming")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)

    ge = sub.add_parser("generate", help="generate a long video from a checkpoint, with a memory of your choice")
    ge.add_argument("--checkpoint", required=True, help="folder with config.json and model.safetensors")
    ge.add_argument("--segments", type=_positive, default=16, help="segments to generate after the context")
    ge.add_argument("--memory", help="memory name (default: the checkpoint's)")
    ge.add_argument("--memory-kwargs", type=_json_arg, help="the memory's options as JSON")
    ge.add_argument("--out", required=True, help="output folder for video.gif and metrics.json")
    ge.add_argument(
        "--context-segments",
        type=_non_negative,
        help="ground-truth segments written first (default: the outbound sweep, or the sweep of a sweep world)",
    )
    ge.add_argument("--steps", type=_positive, default=8, help="Euler steps per segment")
    ge.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (models with a prompt)")
    ge.add_argument("--seed", type=_non_negative, default=0, help="noise seed (same seed, same video)")
    ge.add_argument(
        "--clip-seed", type=_non_negative, default=10_000, help="which world clip gives context and actions"
    )
    ge.add_argument("--fps", type=_positive, default=8, help="GIF frame rate")
    ge.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    ge.add_argument("--no-progress", action="store_true", help="no progress bar")
    ge.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)

    de = sub.add_parser(
        "demo", help="memory past the trained length on the revisit world, with the bundled checkpoints"
    )
    de.add_argument("--out", default="memkit-demo", help="folder for the GIFs, plots and results.json")
    de.add_argument(
        "--clips", type=_positive, default=1, help="clips per path family, on procedural canvases and on photographs"
    )
    de.add_argument("--steps", type=_positive, default=8, help="Euler steps per segment")
    de.add_argument(
        "--multiple", type=_positive, default=4, help="generate this many times the trained length (at least 4)"
    )
    return parser


# ------------------------------------------------------------------------------------------ train
def _cmd_train(args: argparse.Namespace) -> int:
    from memkit.train import TrainConfig, train
    from memkit.train.trainer import recover_training

    path = Path(args.config)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise CLIError(f"config file {args.config!r} does not exist")
        config = TrainConfig.load(path)
    else:
        config = TrainConfig.preset(args.config)
    if args.batch_size:
        config = config.replace(batch_size=args.batch_size)
    if args.memory or args.memory_kwargs:
        spec = config.model.memory
        name = args.memory or spec.name
        kwargs = args.memory_kwargs if args.memory_kwargs is not None else (spec.kwargs if name == spec.name else {})
        config = config.replace(
            model=config.model.replace(memory={"name": name, "kwargs": kwargs, "layers": spec.layers})
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} exists and is not a folder")
    resume = not args.fresh and recover_training(out)
    if resume:
        saved = out / "train_config.json"
        if saved.is_file():
            config = TrainConfig.load(saved).replace(batch_size=config.batch_size)
        if _speaks():
            print(f"memkit: resuming from {out}", file=sys.stderr)
    _check_memory(config.model, args.trust_remote_code)
    result = train(
        config,
        out,
        steps=args.steps,
        device=args.device,
        progress=not args.no_progress,
        resume=resume,
        trust_remote_code=args.trust_remote_code,
    )
    if not _speaks():  # under torchrun every rank gets here; rank 0 reports for all
        return 0
    if result.losses:
        tail = result.losses[-min(20, len(result.losses)) :]
        print(f"trained to step {result.step}; mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
    else:
        print(f"nothing to do: {out} is already at step {result.step}")
    print(f"checkpoint: {out}")
    return 0


def _speaks() -> bool:
    """Whether this process prints reports: a single process, or rank 0 of a ``torchrun`` job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _check_memory(model: Any, trust_remote_code: bool) -> None:
    """Build the memory once so a bad name or option fails before any work starts."""
    from memkit.memories.registry import build_from_spec

    try:
        spec = model.memory
        build_from_spec(spec.name, spec.kwargs, model.layer_geometry, trust_remote_code=trust_remote_code)
    except TypeError as err:
        raise CLIError(f"memory {model.memory.name!r}: {err}") from err


# ------------------------------------------------------------------------------------------ generate
def _load(
    checkpoint: str,
    memory: str | None,
    memory_kwargs: dict[str, Any] | None,
    device: str | None,
    trust_remote_code: bool = False,
) -> Any:
    import torch

    from memkit.models.malt import MALTNetwork

    spec: dict[str, Any] | None = None
    if memory is not None or memory_kwargs is not None:
        cfg_path = Path(checkpoint) / "config.json"
        base: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                base = json.loads(cfg_path.read_text()).get("memory", {}) or {}
            except (json.JSONDecodeError, AttributeError):
                base = {}
        name = memory or base.get("name", "none")
        kwargs = (
            memory_kwargs if memory_kwargs is not None else (base.get("kwargs", {}) if name == base.get("name") else {})
        )
        spec = {"name": name, "kwargs": kwargs, "layers": base.get("layers")}
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net = MALTNetwork.from_pretrained(checkpoint, memory=spec, device=dev, trust_remote_code=trust_remote_code)
    except TypeError as err:
        raise CLIError(f"memory {spec['name'] if spec else ''!r}: {err}") from err
    return net.eval()


def _world_task(checkpoint: str, net: Any, total_segments: int, clip_seed: int) -> dict[str, Any]:
    """Ground truth, actions and prompt for ``total_segments``: one training-length clip, repeated
    (for the revisit world's sweep paths: one clip that long, whose sweep is the context)."""
    import torch

    from memkit.train import DataSpec, TrainConfig, build_world, prepare_sample

    cfg = net.config
    spec, clip_segments = DataSpec(), 8
    saved = Path(checkpoint) / "train_config.json"
    if saved.is_file():
        tc = TrainConfig.load(saved)
        spec, clip_segments = tc.data, tc.max_segments()
    path = spec.kwargs.get("path", "out_and_back") if spec.world == "revisit" else "out_and_back"
    if path != "out_and_back":
        # sweep worlds: one clip as long as asked, the sweep (context) then one long excursion
        places = int(spec.kwargs.get("places", 8))
        frames_needed = max(total_segments * cfg.frames_per_segment, places)
        segments = -(-frames_needed // cfg.frames_per_segment)
        sample = prepare_sample(build_world(spec, cfg, segments).sample(clip_seed), spec, cfg)
        out_sweep: dict[str, Any] = {k: v[:total_segments] for k, v in sample.items()}
        out_sweep["clip_segments"] = -(-places // cfg.frames_per_segment) * 2  # context = the sweep
        return out_sweep
    world = build_world(spec, cfg, clip_segments)
    sample = prepare_sample(world.sample(clip_seed), spec, cfg)
    reps = -(-total_segments // clip_segments)

    def tile(x: torch.Tensor) -> torch.Tensor:
        return x.repeat(reps, *([1] * (x.ndim - 1)))[:total_segments]

    out: dict[str, Any] = {k: tile(v) for k, v in sample.items()}
    out["clip_segments"] = clip_segments
    return out


def _require_imageio(command: str) -> None:
    """Refuse before any work when the GIF writer is missing (not after minutes of generating)."""
    import importlib.util

    if importlib.util.find_spec("imageio") is None:
        raise CLIError(f"memkit {command} writes a GIF and needs imageio: pip install 'memkit-video[video]'")


def _cmd_generate(args: argparse.Namespace) -> int:
    import math

    import torch

    from memkit.media import save_gif
    from memkit.models.malt import EulerSampler, generate
    from memkit.train.evaluate import psnr

    net = _load(args.checkpoint, args.memory, args.memory_kwargs, args.device, args.trust_remote_code)
    _require_imageio("generate")  # before generating, not after
    cfg = net.config
    f = cfg.frames_per_segment
    # a first pass with no context to learn the clip length
    probe = _world_task(args.checkpoint, net, 1, args.clip_seed)
    n_ctx = probe["clip_segments"] // 2 if args.context_segments is None else args.context_segments
    task = _world_task(args.checkpoint, net, n_ctx + args.segments, args.clip_seed)
    video = task["video"].flatten(0, 1)[None]  # (1 T C H W)
    dev = net.spatial.device
    kwargs: dict[str, Any] = {}
    if "actions" in task:
        kwargs["actions"] = task["actions"].flatten(0, 1)[None].to(dev)
    if "prompt" in task:
        prompts, masks = task["prompt"].to(dev), task["prompt_mask"].to(dev)
        kwargs["prompt"] = lambda i: prompts[i][None]
        kwargs["prompt_mask"] = lambda i: masks[i][None]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = generate(
        net,
        args.segments,
        context=video[:, : n_ctx * f] if n_ctx else None,
        sampler=EulerSampler(steps=args.steps, cfg_scale=args.cfg),
        seed=args.seed,
        progress=not args.no_progress,
        **kwargs,
    )
    gen = result.video[0].cpu()
    truth = video[0, n_ctx * f :]
    per_frame = psnr(gen, truth)
    per_segment = per_frame.reshape(-1, f).mean(-1)
    save_gif(out_dir / "video.gif", torch.cat([truth, gen], dim=-1), fps=args.fps)
    metrics = {
        "checkpoint": str(args.checkpoint),
        "memory": cfg.memory.to_dict(),
        "segments": args.segments,
        "context_segments": n_ctx,
        "frames": int(gen.shape[0]),
        "finite": bool(torch.isfinite(gen).all()),
        "psnr_mean": float(per_segment.mean()),
        "psnr_per_segment": [round(float(x), 3) for x in per_segment],
        "ms_per_segment_mean": sum(result.ms_per_segment) / len(result.ms_per_segment),
        "state_bytes": result.state_bytes[-1],
        "state_bytes_constant": len(set(result.state_bytes)) == 1,
        "steps": args.steps,
        "seed": args.seed,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"generated {args.segments} segments ({metrics['frames']} frames) with {cfg.memory.name}: "
        f"PSNR vs ground truth {metrics['psnr_mean']:.2f} dB, {metrics['ms_per_segment_mean']:.1f} ms/segment, "
        f"state {metrics['state_bytes']} bytes{'' if math.isfinite(metrics['psnr_mean']) else ' (non-finite!)'}"
    )
    print(f"wrote {out_dir / 'video.gif'} (left: ground truth, right: generated) and {out_dir / 'metrics.json'}")
    return 0


# ------------------------------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from memkit.demo import run_demo

    run_demo(Path(args.out), clips=args.clips, steps=args.steps, multiple=args.multiple)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memkit`` console script; returns the exit status."""
    from memkit.errors import MemkitError

    args = _parser().parse_args(argv)
    if "MEMKIT_TYPECHECK" not in os.environ:
        # long jobs: jaxtyping checks cost more than small models' arithmetic; ask with MEMKIT_TYPECHECK=1
        from memkit.typing import set_typecheck

        set_typecheck(False)
    handlers = {"train": _cmd_train, "generate": _cmd_generate, "demo": _cmd_demo}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("memkit: interrupted", file=sys.stderr)
        return 130
    except (CLIError, MemkitError, OSError, ValueError) as err:
        message = " ".join(str(err).split("\n", 1)[0].split()) or type(err).__name__
        print(f"memkit {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
