"""Training checkpoints: save a resumable one atomically, recover from a crash mid-swap, resume, warm-start.

A run's folder holds the EMA model as a pretrained checkpoint (``config.json``,
``model.safetensors``, ``train_config.json``) and, under ``train/``, what a resume reads:
the raw weights, the EMA, the optimizer state and the step. :func:`save_training` replaces
``train/`` as a whole (see :func:`recover_training`), so a crash never mixes two steps.
"""

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memkit.errors import CheckpointError
from memkit.models.malt import MALTNetwork
from memkit.train.config import TrainConfig

__all__ = ["TRAIN_DIR", "save_training", "load_training", "recover_training", "init_weights_from"]

#: the folder of a run that holds what a resume reads
TRAIN_DIR = "train"


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from memkit.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _atomic_text(text: str, path: Path) -> None:
    from memkit.atomic import atomic_write_text

    atomic_write_text(path, text)


def recover_training(out: str | Path) -> bool:
    """Finish a checkpoint swap that a crash interrupted; returns whether ``out`` can resume.

    :func:`save_training` writes the new ``train/`` into ``.train-*.tmp`` (its
    ``state.json`` last), renames the old one aside to ``.train-*.old`` and renames the new
    one in. A crash between the two renames leaves no ``train/``: the newest complete folder
    (one with a ``state.json``) becomes ``train/`` again. Unfinished folders are removed.
    """
    import shutil

    out = Path(out)
    if not out.is_dir():
        return False
    current = out / TRAIN_DIR
    if not (current / "state.json").is_file():

        def step(folder: Path) -> int:
            try:
                return int(json.loads((folder / "state.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError):
                return -1

        complete = [f for f in (*out.glob(f".{TRAIN_DIR}-*.old"), *out.glob(f".{TRAIN_DIR}-*.tmp")) if step(f) >= 0]
        if complete:
            if current.exists():
                shutil.rmtree(current)
            os.replace(max(complete, key=step), current)
    for stale in [*out.glob(f".{TRAIN_DIR}-*.old"), *out.glob(f".{TRAIN_DIR}-*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)
    return (current / "state.json").is_file()


def save_training(
    out: Path, net: MALTNetwork, ema: dict[str, Tensor], opt: torch.optim.Optimizer, config: TrainConfig, step: int
) -> None:
    """Write a resumable checkpoint: the EMA model (``config.json``, ``model.safetensors``),
    ``train_config.json`` and, under ``train/``, the raw weights, EMA, optimizer state and step.

    A crash cannot leave a checkpoint that mixes two steps: everything a resume reads is
    written into a fresh temporary folder first, each file flushed to disk, and that folder
    replaces ``train/`` by renames (see :func:`recover_training`); the EMA model and configs
    for :meth:`MALTNetwork.from_pretrained` are then replaced file by file, atomically.
    """
    import shutil
    import tempfile

    from memkit.atomic import fsync_dir

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TRAIN_DIR}-", suffix=".tmp", dir=out))
    try:
        _save_resumable(staging, net, ema, opt, step)
        current, aside = out / TRAIN_DIR, staging.with_suffix(".old")
        if current.exists():
            os.replace(current, aside)
        os.replace(staging, current)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    _atomic_save(ema, out / "model.safetensors")
    _atomic_text(json.dumps(net.config.to_dict(), indent=2) + "\n", out / "config.json")
    _atomic_text(json.dumps(config.to_dict(), indent=2) + "\n", out / "train_config.json")


def _save_resumable(
    folder: Path, net: MALTNetwork, ema: dict[str, Tensor], opt: torch.optim.Optimizer, step: int
) -> None:
    _atomic_save(net.state_dict(), folder / "weights.safetensors")
    _atomic_save(ema, folder / "ema.safetensors")
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    _atomic_save(tensors, folder / "optimizer.safetensors")
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars}
    _atomic_text(json.dumps(meta, indent=2) + "\n", folder / "state.json")


def load_training(
    out: Path, net: MALTNetwork, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[int, dict[str, Tensor]]:
    """Restore what :func:`save_training` wrote into ``net`` and ``opt``; returns ``(step, ema)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((out / TRAIN_DIR / "state.json").read_text())
        weights = load_file(str(out / TRAIN_DIR / "weights.safetensors"), device=str(device))
        # checkpoints written before ema.safetensors existed kept the EMA only at the top level
        ema_file = out / TRAIN_DIR / "ema.safetensors"
        ema = load_file(str(ema_file if ema_file.is_file() else out / "model.safetensors"), device=str(device))
        opt_tensors = load_file(str(out / TRAIN_DIR / "optimizer.safetensors"), device=str(device))
        net.load_state_dict(weights)
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"cannot resume from {out}: {str(err).splitlines()[0]}") from err
    state: dict[int, dict[str, Any]] = {}
    for name, value in opt_tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"cannot resume from {out}: optimizer state does not fit the model: {err}") from err
    return int(meta["step"]), ema


def init_weights_from(net: MALTNetwork, source: str | Path, *, trust_remote_code: bool = False) -> int:
    """Copy into ``net`` every tensor of another checkpoint whose name and shape match; returns how many.

    ``source``: a checkpoint folder, or the name of a bundled one (``"demo-sparse_kv"``, in
    ``memkit/assets``). A backbone trained with one memory starts a model with another this
    way: the shared weights (patchify, blocks, attention projections) are copied, the new
    memory's parameters keep their initialisation.

    Example:
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> cfg = MALTConfig.preset("tiny", memory="fifo")
        >>> a, b = MALTNetwork(cfg), MALTNetwork(cfg)
        >>> import tempfile; folder = tempfile.mkdtemp(); _ = a.save_pretrained(folder)
        >>> init_weights_from(b, folder) == len(b.state_dict())
        True
    """
    folder = Path(source)
    if not folder.is_dir():
        from importlib import resources

        bundled = Path(str(resources.files("memkit") / "assets" / str(source)))
        if not bundled.is_dir():
            raise CheckpointError(f"init_from: {source} is neither a checkpoint folder nor a bundled checkpoint")
        folder = bundled
    src = MALTNetwork.from_pretrained(folder, trust_remote_code=trust_remote_code).state_dict()
    own = net.state_dict()
    take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict({**own, **take})
    return len(take)
