"""Saving, loading and memory swaps of a :class:`~memkit.models.malt.MALTNetwork`.

A checkpoint is a folder with ``model.safetensors`` (weights only: loading runs no code)
and ``config.json`` (a :class:`MALTConfig`, which may only name registered memories
unless ``trust_remote_code``). The network's methods ``save_pretrained``,
``from_pretrained`` and ``with_memory`` call these functions.
"""

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from memkit.errors import CheckpointError
from memkit.models.malt.config import MALTConfig, MemorySpec

if TYPE_CHECKING:
    from memkit.models.malt.network import MALTNetwork

__all__ = ["copy_with_memory", "load_pretrained", "save_pretrained"]

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def copy_with_memory(
    net: "MALTNetwork", memory: MemorySpec | dict[str, Any] | str, *, trust_remote_code: bool = False
) -> "MALTNetwork":
    """A copy of ``net`` with another memory (see :meth:`MALTNetwork.with_memory`).

    Example:
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> from memkit.models.malt.pretrained import copy_with_memory
        >>> copy_with_memory(MALTNetwork(MALTConfig.preset("tiny")), "fifo").config.memory.name
        'fifo'
    """
    spec = MemorySpec.from_dict(memory)
    other = type(net)(net.config.replace(memory=spec), trust_remote_code=trust_remote_code)
    other = other.to(device=net.spatial.device, dtype=net.spatial.dtype)
    own = net.state_dict()
    target = other.state_dict()
    # the old memory's own parameters are kept only when the memory is the same kind
    shared = {k: v for k, v in own.items() if k in target and ".attn.memory." not in k}
    for k, v in target.items():
        if k in own and ".attn.memory." in k and own[k].shape == v.shape and spec.name == net.config.memory.name:
            shared[k] = own[k]
    fresh = [k for k in target if k not in shared]
    other.load_state_dict(shared, strict=False)
    if fresh:
        shown = ", ".join(fresh[:3]) + (f", ... ({len(fresh)} in all)" if len(fresh) > 3 else "")
        warnings.warn(
            f"with_memory({spec.name!r}): {len(fresh)} parameter tensor(s) of the new memory were not in this "
            f"network and keep their fresh initialisation ({shown}); train them before relying on the memory",
            UserWarning,
            stacklevel=3,
        )
    other.train(net.training)
    return other


def save_pretrained(net: "MALTNetwork", directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` of ``net`` into ``directory`` (created), atomically.

    Example:
        >>> import tempfile
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> from memkit.models.malt.pretrained import save_pretrained
        >>> folder = save_pretrained(MALTNetwork(MALTConfig.preset("tiny")), tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    from safetensors.torch import save_file

    from memkit.atomic import atomic_path, atomic_write_text

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in (state_dict or net.state_dict()).items()}
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(path / CONFIG_FILE, json.dumps(net.config.to_dict(), indent=2) + "\n")
    return path


def load_pretrained(
    cls: "type[MALTNetwork]",
    directory: str | Path,
    *,
    memory: MemorySpec | dict[str, Any] | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> "MALTNetwork":
    """A ``cls`` network loaded from a folder written by :func:`save_pretrained`.

    See :meth:`MALTNetwork.from_pretrained` for the arguments and errors.

    Example:
        >>> import tempfile
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> from memkit.models.malt.pretrained import load_pretrained, save_pretrained
        >>> folder = save_pretrained(MALTNetwork(MALTConfig.preset("tiny")), tempfile.mkdtemp())
        >>> load_pretrained(MALTNetwork, folder, memory="fifo").config.memory.name
        'fifo'
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {name}")
    try:
        config = MALTConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE}: {err}") from err
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {path / WEIGHTS_FILE}: {err}") from err
    net = cls(config, trust_remote_code=trust_remote_code)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0:2]
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match its config: {' '.join(first)}") from err
    if device is not None:
        net = net.to(device)
    net.eval()
    if memory is not None:
        net = net.with_memory(memory, trust_remote_code=trust_remote_code)
    return net
