"""Saving and loading memory states: safetensors for tensors, a JSON header for the rest.

A stream can be stopped and resumed: :func:`save_states` writes any pytree of memory
states (one state, or a model's tuple of per-layer states) to one file, atomically (a
temporary file renamed over the target, so a crash mid-save leaves the previous file
intact). :func:`load_states` refuses, saying what differs, when the file was made by
another format version, another memory class or configuration, holds other shapes or
dtypes than the template, or is truncated or corrupted (a SHA-256 of every tensor's bytes
is stored and checked). It never loads part of a file.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from memkit.errors import CheckpointError

__all__ = ["save_states", "load_states", "memory_config", "FORMAT_VERSION", "atomic_write_bytes"]

FORMAT = "memkit-state"
FORMAT_VERSION = 1
S = TypeVar("S")


def memory_config(memory: Any) -> dict[str, Any]:
    """A memory's identity: its class and the plain (int/float/str/bool) settings it was built with.

    A memory may define ``config() -> dict`` to say it explicitly.
    """
    if hasattr(memory, "config") and callable(memory.config):
        settings = dict(memory.config())
    else:
        settings = {
            k: v
            for k, v in sorted(vars(memory).items())
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))
        }
        if isinstance(memory, torch.nn.Module):
            settings.pop("training", None)
        for k, v in sorted(vars(memory).items()):
            if isinstance(v, (list, tuple)) and all(hasattr(m, "init_state") for m in v):
                settings[k] = [memory_config(m) for m in v]  # a combinator's members
    return {"class": type(memory).__qualname__, "settings": settings}


def _flatten(tree: Any) -> list[tuple[str, Tensor]]:
    leaves, _ = pytree.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise CheckpointError(f"state leaf {pytree.keystr(path)} is a {type(leaf).__name__}, not a tensor")
        out.append((pytree.keystr(path) or "[]", leaf))
    return out


def _digest(named: list[tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_states(path: str | os.PathLike[str], states: Any, memories: Any | Sequence[Any] | None = None) -> None:
    """Save a pytree of memory states to ``path`` (safetensors + JSON header), atomically.

    Args:
        path: the file to write.
        states: one state or any pytree of states (e.g. a model's tuple of per-layer states).
        memories: the memory (or sequence of memories, one per layer) that made them; its
            class and configuration are recorded and checked on load.

    Example:
        >>> import torch, memkit, tempfile, os
        >>> mem = memkit.FIFOMemory(heads=2, head_dim=4, tokens_per_frame=1, frames=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.safetensors")
        >>> memkit.save_states(path, mem.init_state(1), mem)
        >>> memkit.load_states(path, mem.init_state(1), mem).win_k.shape
        torch.Size([1, 2, 2, 1, 4])
    """
    from safetensors.torch import save

    named = _flatten(states)
    mems = [] if memories is None else list(memories) if isinstance(memories, (list, tuple)) else [memories]
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memories": [memory_config(m) for m in mems],
        "state_types": sorted({type(s).__qualname__ for s in pytree.tree_leaves(states, is_leaf=_is_state)}),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in named},
        "sha256": _digest(named),
    }
    # safetensors keys must be unique strings; keep order in the header
    blobs = {f"t{i:05d}": t.detach().cpu().contiguous() for i, (_, t) in enumerate(named)}
    header["keys"] = [name for name, _ in named]
    atomic_write_bytes(path, save(blobs, metadata={"memkit": json.dumps(header)}))


def _is_state(x: Any) -> bool:
    from memkit.state import MemoryState

    return isinstance(x, MemoryState)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupted, not a readable safetensors file ({err})") from err
    if "memkit" not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without a memkit header (not saved by memkit.save_states)")
    try:
        header = json.loads(metadata["memkit"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the memkit header is not valid JSON ({err})") from err
    return header, tensors


def load_states(path: str | os.PathLike[str], like: S, memories: Any | Sequence[Any] | None = None) -> S:
    """Load states saved by :func:`save_states` into the structure of ``like``.

    ``like`` is a template with the expected structure, shapes and dtypes (typically
    ``memory.init_state(batch_size)``, or a model's per-layer states); tensors land on
    ``like``'s devices. Raises :class:`memkit.CheckpointError` naming what differs.
    """
    path = Path(path)
    header, blobs = _read(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {header.get('format_version')}, this memkit reads version {FORMAT_VERSION}"
        )
    if memories is not None:
        mems = list(memories) if isinstance(memories, (list, tuple)) else [memories]
        want = [memory_config(m) for m in mems]
        got = header.get("memories", [])
        if len(want) != len(got):
            raise CheckpointError(f"{path}: saved with {len(got)} memories, expected {len(want)}")
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            if w["class"] != g["class"]:
                raise CheckpointError(f"{path}: memory {i} was a {g['class']}, expected a {w['class']}")
            if w["settings"] != g["settings"]:
                diff = {
                    k: (g["settings"].get(k), w["settings"].get(k))
                    for k in sorted(set(w["settings"]) | set(g["settings"]))
                    if w["settings"].get(k) != g["settings"].get(k)
                }
                details = ", ".join(f"{k}: saved {a!r}, expected {b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(f"{path}: memory {i} ({w['class']}) has another configuration: {details}")
    names = header.get("keys", [])
    if len(names) != len(blobs) or any(f"t{i:05d}" not in blobs for i in range(len(names))):
        raise CheckpointError(f"{path}: the header lists {len(names)} tensors but the file holds {len(blobs)}")
    saved = dict(zip(names, (blobs[f"t{i:05d}"] for i in range(len(names))), strict=True))
    if _digest(list(saved.items())) != header.get("sha256"):
        raise CheckpointError(f"{path}: corrupted: the tensors' checksum does not match the one saved with them")
    expected = _flatten(like)
    missing = [n for n, _ in expected if n not in saved]
    extra = [n for n in saved if n not in dict(expected)]
    if missing or extra:
        raise CheckpointError(
            f"{path}: the saved states have another structure: missing {missing or 'nothing'}, "
            f"unexpected {extra or 'nothing'}"
        )
    for name, t in expected:
        s = saved[name]
        if tuple(s.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(s.shape)}, expected {tuple(t.shape)}")
        if s.dtype != t.dtype:
            raise CheckpointError(f"{path}: {name} has dtype {s.dtype}, expected {t.dtype}")
    leaves, spec = pytree.tree_flatten(like)
    loaded = iter(saved[name].to(t.device) for name, t in expected)
    return pytree.tree_unflatten([next(loaded) if isinstance(x, Tensor) else x for x in leaves], spec)
