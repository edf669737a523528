"""Writing a file that must never be seen half-written: a temporary file renamed over the target.

memkit's one way of writing saved states (:func:`memkit.save_states`), ``save_pretrained`` and
training checkpoints. Also importable from :mod:`memkit.io`, where it lived first.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``directory`` survive a power cut (a no-op where unsupported)."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open a directory
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # read, not set: os.umask() would change the process's mask for a moment under other threads
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on success it replaces ``path`` atomically.

    memkit's one way of writing a file that must never be seen half-written (saved states,
    ``save_pretrained``, training checkpoints): the temporary file gets a unique name in
    the target's folder (so concurrent writers never share one, and the rename stays on one
    file system), is flushed to disk, then renamed over the target with ``os.replace``, and
    the folder is synced. A crash or an exception leaves the old file (or none) and no
    temporary file. The new file keeps the old one's permissions (a new file gets the
    usual ``0o666`` less the umask, not ``mkstemp``'s private ``0o600``).

    Example:
        >>> import tempfile, pathlib
        >>> from memkit.atomic import atomic_path
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "weights.bin"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"new")
        >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
        (b'new', ['weights.bin'])
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path``: a crash leaves either the old file or the new one (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))
