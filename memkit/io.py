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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from memkit.atomic import atomic_path, atomic_write_bytes, atomic_write_text, fsync_dir
from memkit.errors import CheckpointError

__all__ = [
    "save_states",
    "load_states",
    "read_header",
    "memory_config",
    "FORMAT_VERSION",
    "V1_NAMES",
    "legacy_names",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
]

FORMAT = "memkit-state"
#: 2: frame memories hold :class:`memkit.memories.frames.FrameBuffer` sub-states (``.sink.k``, was ``.sink_k``)
FORMAT_VERSION = 2
#: the versions :func:`load_states` reads (older ones through :data:`V1_NAMES`)
READABLE_VERSIONS = (1, 2)
S = TypeVar("S")

_BUFFER = r"\.(k|v|pos|valid)"
#: How format version 1 named the tensors of states whose fields changed in version 2, per state class:
#: ``(pattern over the tensor's path inside the state, its version-1 path)``, first match wins;
#: paths that match no pattern (and states not listed) were spelled the same in version 1.
V1_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "SinkWindowState": ((r"\.sink" + _BUFFER, r".sink_\1"), (r"\.window" + _BUFFER, r".win_\1")),
    "CompressedWindowState": ((r"\.sink" + _BUFFER, r".sink_\1"), (r"\.window" + _BUFFER, r".win_\1")),
    "PromptBankState": ((r"\.pool" + _BUFFER, r".\1"),),
    "PoseRetrievalState": ((r"\.frames" + _BUFFER, r".\1"),),
    "PackedHistoryState": ((r"\.levels\[(\d+)\]\.(k|v|pos|valid)", r".\2[\1]"),),
    "SparseKVState": ((r"\.ring" + _BUFFER, r".\1"), (r"\.sink" + _BUFFER, r".sink_\1")),
}


def legacy_names(tree: Any, version: int = 1) -> list[tuple[str, str]]:
    """``(name today, name in a format-``version`` file)`` of every tensor of a pytree of states, in order.

    The explicit map of :data:`V1_NAMES` applied to each state it lists, wherever it sits in
    the tree (a model's tuple, a :class:`memkit.ComposeState`'s members, a quantized state's
    codes). :func:`load_states` reads a version-1 file through it.

    Example:
        >>> import memkit
        >>> state = memkit.SinkWindowMemory(1, 2, 1, sink_frames=1, window_frames=1).init_state(1)
        >>> legacy_names((state,))[:2], legacy_names((state,))[-1]
        ([('[0].sink.k', '[0].sink_k'), ('[0].sink.v', '[0].sink_v')], ('[0].frames_seen', '[0].frames_seen'))
    """
    from memkit.state import MemoryState, tensor_paths

    if version == FORMAT_VERSION:
        return [(p, p) for p, _ in tensor_paths(tree)]
    if version != 1:
        raise CheckpointError(f"no name map from format version {version} (this memkit reads {READABLE_VERSIONS})")
    out: list[tuple[str, str]] = []

    from memkit.state import _children

    def visit(node: Any, new: str, old: str) -> None:
        if isinstance(node, torch.Tensor):
            out.append((new or "[]", old or "[]"))
            return
        if node is None:
            return
        renames = V1_NAMES.get(type(node).__name__) if isinstance(node, MemoryState) else None
        if renames:
            for rel, _ in tensor_paths(node):
                hit = next((m.expand(rep) for pat, rep in renames if (m := re.fullmatch(pat, rel))), None)
                spelled = rel if hit is None else hit
                out.append((new + rel, old + spelled))
            return
        for suffix, child, _ in _children(node, ""):
            visit(child, new + suffix, old + suffix)

    _flatten(tree)  # refuses a tree that is not made of states, as for today's names
    visit(tree, "", "")
    return out


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


def _later_defaults(memory: Any, names: set[str]) -> dict[str, Any]:
    """The constructor defaults of settings ``names`` (ones a file saved before they existed lacks).

    Example:
        >>> import memkit
        >>> _later_defaults(memkit.SparseKVMemory(2, 8, 4), {"top_k", "not_a_parameter"})
        {'top_k': 3}
    """
    import inspect

    try:
        params = inspect.signature(type(memory)).parameters
    except (TypeError, ValueError):  # pragma: no cover - a class without a signature
        return {}
    return {n: params[n].default for n in names if n in params and params[n].default is not inspect.Parameter.empty}


def _with_later_defaults(memory: Any, want: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """The saved settings ``got``, with the settings ``memory`` gained since at their defaults.

    The same, recursively, for a combinator's members (``settings["memories"]``: a file that
    saved a composition before one of its members gained a setting still loads).
    """
    saved = {**_later_defaults(memory, set(want) - set(got)), **got}
    for key, value in got.items():
        members = getattr(memory, key, None)
        if (
            isinstance(value, list)
            and isinstance(want.get(key), list)
            and isinstance(members, (list, tuple))
            and len(value) == len(want[key]) == len(members)
            and all(isinstance(c, dict) and isinstance(c.get("settings"), dict) for c in [*value, *want[key]])
        ):
            saved[key] = [
                {**g, "settings": _with_later_defaults(m, w["settings"], g["settings"])}
                for m, w, g in zip(members, want[key], value, strict=True)
            ]
    return saved


def _flatten(tree: Any) -> list[tuple[str, Tensor]]:
    """Every tensor of a pytree of states with memkit's own field path (:func:`memkit.state.tensor_paths`).

    The names in a file never depend on how a torch version formats pytree keys; they are
    spelled as format version 1 has always spelled them, so older files load unchanged.
    """
    from memkit.errors import StateError
    from memkit.state import tensor_paths

    try:
        return tensor_paths(tree)
    except StateError as err:
        raise CheckpointError(f"cannot save or load this state: {err}") from err


def _state_types(tree: Any) -> list[str]:
    from memkit.state import MemoryState

    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, MemoryState):
            found.add(type(node).__qualname__)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(tree)
    return sorted(found)


def _digest(named: list[tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
        >>> memkit.load_states(path, mem.init_state(1), mem).window.k.shape
        torch.Size([1, 2, 2, 1, 4])
    """
    from safetensors.torch import save

    target = _as_path("save_states", path)
    if target.is_dir():
        raise CheckpointError(
            f"{target}: is a directory; save_states writes one file, e.g. {target / 'stream.safetensors'}"
        )
    named = _flatten(states)
    mems = _memory_list("save_states", memories)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memories": [memory_config(m) for m in mems],
        "state_types": _state_types(states),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in named},
        "sha256": _digest(named),
    }
    # safetensors keys must be unique strings; keep order in the header
    blobs = {f"t{i:05d}": t.detach().cpu().contiguous() for i, (_, t) in enumerate(named)}
    header["keys"] = [name for name, _ in named]
    try:
        atomic_write_bytes(target, save(blobs, metadata={"memkit": json.dumps(header)}))
    except OSError as err:
        raise CheckpointError(f"{target}: cannot write the file ({type(err).__name__}: {err})") from err


def _as_path(where: str, path: Any) -> Path:
    """``path`` as a Path, or a CheckpointError naming what was given instead."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise CheckpointError(f"{where}: path must be a str or os.PathLike naming a file, got {type(path).__name__}")
    return Path(path)


def _memory_list(where: str, memories: Any) -> list[Any]:
    """``memories`` as a list of memkit memories (one, or a list/tuple of them), or a CheckpointError."""
    from memkit.protocol import Memory

    mems = [] if memories is None else list(memories) if isinstance(memories, (list, tuple)) else [memories]
    for i, m in enumerate(mems):
        if not isinstance(m, Memory):
            raise CheckpointError(
                f"{where}: memories must be a memkit Memory or a list of them (one per state), but "
                f"{'memories' if len(mems) == 1 and not isinstance(memories, (list, tuple)) else f'memories[{i}]'} "
                f"is a {type(m).__name__}"
            )
    return mems


def _parse_header(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The memkit header of a safetensors file's metadata, with every field it needs checked."""
    if "memkit" not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without a memkit header (not saved by memkit.save_states)")
    try:
        header = json.loads(metadata["memkit"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the memkit header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the memkit header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: format version {header.get('format_version')}, this memkit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )

    def bad(field: str, want: str) -> CheckpointError:
        return CheckpointError(f"{path}: the memkit header's {field!r} is not {want} (a damaged or edited header)")

    keys, tensors, mems = header.get("keys"), header.get("tensors"), header.get("memories", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise bad("keys", "a list of tensor names")
    if len(set(keys)) != len(keys):
        raise bad("keys", "a list of distinct tensor names")
    if not isinstance(tensors, dict) or set(tensors) != set(keys):
        raise bad("tensors", "an object describing every tensor named in 'keys'")
    for name, desc in tensors.items():
        shape = desc.get("shape") if isinstance(desc, dict) else None
        if not (isinstance(shape, list) and all(isinstance(n, int) for n in shape) and isinstance(desc["dtype"], str)):
            raise bad(f"tensors[{name!r}]", "an object with an integer 'shape' list and a 'dtype' string")
    if not isinstance(mems, list) or not all(
        isinstance(m, dict) and isinstance(m.get("class"), str) and isinstance(m.get("settings"), dict) for m in mems
    ):
        raise bad("memories", "a list of {class, settings} objects")
    if not isinstance(header.get("sha256"), str):
        raise bad("sha256", "a checksum string")
    return header


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a state file saved by memkit.save_states")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a file saved by :func:`save_states` (its tensors are not read).

    Holds ``memories`` (each memory's class and settings), ``keys`` (every tensor's field
    path, in order) and ``tensors`` (``{path: {"shape": [...], "dtype": "torch.float32"}}``).
    Raises :class:`memkit.CheckpointError` for a file memkit did not save or a damaged header.

    Example:
        >>> import memkit, tempfile, os
        >>> from memkit.io import read_header
        >>> mem = memkit.FIFOMemory(heads=2, head_dim=4, tokens_per_frame=1, frames=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.safetensors")
        >>> memkit.save_states(path, mem.init_state(3), mem)
        >>> read_header(path)["tensors"][".window.k"]
        {'shape': [3, 2, 2, 1, 4], 'dtype': 'torch.float32'}
    """
    from safetensors import SafetensorError, safe_open

    file = _as_path("read_header", path)
    _check_file(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: truncated or corrupted, not a readable safetensors file ({err})") from err
    return _parse_header(file, metadata)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    _check_file(path)
    data = path.read_bytes()
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupted, not a readable safetensors file ({err})") from err
    return _parse_header(path, metadata), tensors


def load_states(path: str | os.PathLike[str], like: S, memories: Any | Sequence[Any] | None = None) -> S:
    """Load states saved by :func:`save_states` into the structure of ``like``.

    ``like`` is a template with the expected structure, shapes and dtypes (typically
    ``memory.init_state(batch_size)``, or a model's per-layer states); tensors land on
    ``like``'s devices. Raises :class:`memkit.CheckpointError` naming what differs.
    """
    path = _as_path("load_states", path)
    mems = _memory_list("load_states", memories)
    header, blobs = _read(path)
    if memories is not None:
        want = [memory_config(m) for m in mems]
        got = header.get("memories", [])
        if len(want) != len(got):
            raise CheckpointError(f"{path}: saved with {len(got)} memories, expected {len(want)}")
        for i, (w, g, memory) in enumerate(zip(want, got, mems, strict=True)):
            if w["class"] != g["class"]:
                raise CheckpointError(f"{path}: memory {i} was a {g['class']}, expected a {w['class']}")
            # a setting the memory gained after the file was saved matches when it is at its default
            saved = _with_later_defaults(memory, w["settings"], g["settings"])
            if w["settings"] != saved:
                diff = {
                    k: (saved.get(k), w["settings"].get(k))
                    for k in sorted(set(w["settings"]) | set(saved))
                    if w["settings"].get(k) != saved.get(k)
                }
                details = ", ".join(f"{k}: saved {a!r}, expected {b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(f"{path}: memory {i} ({w['class']}) has another configuration: {details}")
    names = header["keys"]
    listed = {f"t{i:05d}" for i in range(len(names))}
    if listed != set(blobs):
        missing, unexpected = sorted(listed - set(blobs)), sorted(set(blobs) - listed)
        raise CheckpointError(
            f"{path}: the header lists {len(names)} tensors (t00000 ... t{len(names) - 1:05d}), the file holds "
            f"{len(blobs)}: missing {missing[:5] or 'none'}, unexpected {unexpected[:5] or 'none'} "
            "(a damaged or edited file)"
        )
    saved = dict(zip(names, (blobs[f"t{i:05d}"] for i in range(len(names))), strict=True))
    if _digest(list(saved.items())) != header.get("sha256"):
        raise CheckpointError(f"{path}: corrupted: the tensors' checksum does not match the one saved with them")
    expected = _flatten(like)
    version = header["format_version"]
    # a file of an older version names some tensors as that version did: read them by those names
    spelled = dict(legacy_names(like, version)) if version != FORMAT_VERSION else {n: n for n, _ in expected}
    missing = [spelled[n] for n, _ in expected if spelled[n] not in saved]
    extra = [n for n in saved if n not in set(spelled.values())]
    if missing or extra:
        hint = "" if version == FORMAT_VERSION else f" (format version {version} names, memkit.io.V1_NAMES)"
        if extra and not missing:
            hint += (
                "; a template with None in place of a state (e.g. a MemorySession's states before its first "
                "segment) has no place for them: load a session's states with session.load_states(path)"
            )
        raise CheckpointError(
            f"{path}: the saved states have another structure: missing {missing or 'nothing'}, "
            f"unexpected {extra or 'nothing'}{hint}"
        )
    for name, t in expected:
        s = saved[spelled[name]]
        if tuple(s.shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(s.shape)}, expected {tuple(t.shape)}")
        if s.dtype != t.dtype:
            raise CheckpointError(f"{path}: {name} has dtype {s.dtype}, expected {t.dtype}")
    from memkit.state import map_tensor_paths

    result: S = map_tensor_paths(lambda name, t: saved[spelled[name]].to(t.device), like)
    return result
