"""Train on your own latents: tensors on disk, cut into segments.

Files hold ``(b t c h w)`` latents (``b`` videos of ``t`` frames, from any video VAE):

* ``.pt`` / ``.pth``: ``torch.save(tensor)`` or ``torch.save({"latents": tensor, ...})``,
  loaded with ``torch.load(weights_only=True)`` (no pickled code runs) and memory-mapped;
* ``.safetensors``: one tensor, or one named ``latents`` (or pass ``key=``), read lazily;
* ``.npy``: one array, memory-mapped.

Every file is checked when the dataset is built, and every problem is a
:class:`memkit.DataError` naming the file. Frames are never dropped silently.
"""

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from memkit.data._common import check_int
from memkit.errors import DataError

__all__ = ["LATENT_SUFFIXES", "LatentDataset"]

#: File types :class:`LatentDataset` reads; other files in a directory are ignored.
LATENT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".safetensors", ".npy")

PathLike = str | os.PathLike[str]


def _pick(path: Path, names: Sequence[str], key: str | None) -> str:
    if key is not None:
        if key not in names:
            raise DataError(f"{path}: no tensor named {key!r}; the file holds {sorted(names)}")
        return key
    if len(names) == 1:
        return names[0]
    if "latents" in names:
        return "latents"
    raise DataError(
        f"{path}: holds several tensors {sorted(names)} and none is named 'latents'; pass key= to choose one"
    )


class _LatentFile:
    """One file: its shape and dtype now, its data on demand.

    The file is opened anew (memory-mapped) for every read rather than kept open, so a
    directory of thousands of files never holds thousands of descriptors.
    """

    def __init__(self, path: Path, key: str | None) -> None:
        self.path, self.key = path, key
        self._legacy: Tensor | None = None  # a non-zip .pt cannot be mapped: kept after the first load
        try:
            self.shape, self.dtype = self._probe()
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{path}: could not read it as a {path.suffix} latent file ({type(err).__name__}: {err})"
            ) from err

    def _open(self) -> Any:
        suffix = self.path.suffix
        if suffix == ".npy":
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        if suffix == ".safetensors":
            try:
                from safetensors import safe_open
            except ImportError as err:
                raise DataError(
                    f"{self.path}: reading .safetensors files needs the safetensors package: pip install safetensors"
                ) from err
            handle = safe_open(str(self.path), framework="pt")
            return handle.get_slice(_pick(self.path, list(handle.keys()), self.key))
        if self._legacy is not None:
            return self._legacy
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            legacy = False
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
            legacy = True
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
            obj = tensors[_pick(self.path, list(tensors), self.key)]
        if not isinstance(obj, Tensor):
            raise DataError(f"{self.path}: expected a tensor or a dict of tensors, found a {type(obj).__name__}")
        if legacy:
            self._legacy = obj
        return obj

    def _probe(self) -> tuple[tuple[int, ...], str]:
        data = self._open()
        if self.path.suffix == ".safetensors":
            shape, dtype = tuple(data.get_shape()), str(data.get_dtype())
            floating = dtype.startswith(("F", "BF"))
        elif isinstance(data, np.ndarray):
            shape, dtype = tuple(data.shape), str(data.dtype)
            floating = np.issubdtype(data.dtype, np.floating)
        else:
            shape, dtype = tuple(data.shape), str(data.dtype)
            floating = data.is_floating_point()
        if not floating:
            raise DataError(f"{self.path}: expected floating-point latents, got dtype {dtype}")
        return shape, dtype

    def read(self, video: int, start: int, stop: int) -> Tensor:
        """Frames ``start:stop`` of video ``video``, ``(t c h w)``, copied out of the file."""
        try:
            part = self._open()[video, start:stop]
            part = torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part.clone()
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{self.path}: could not read video {video}, frames {start}..{stop - 1} ({err})") from err
        return part

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy: send the path, not a loaded tensor
        return {**self.__dict__, "_legacy": None}


class LatentDataset(Dataset[dict[str, Tensor]]):
    """Latent videos on disk, cut into training samples of ``segments x segment_frames`` frames.

    Each video of ``t`` frames gives ``t // (segments * segment_frames)`` consecutive,
    non-overlapping samples. If ``t`` is not a multiple of ``segments * segment_frames`` the
    dataset refuses it, unless ``drop_last=True``, which drops each video's last
    ``t % (segments * segment_frames)`` frames. Videos may differ in length across files;
    ``(c h w)`` may not.

    Raises :class:`memkit.DataError` (naming the file) for a missing path, an unreadable or
    corrupt file, a tensor of rank other than 5, integer latents, too few frames, a frame
    count that does not divide (without ``drop_last``), non-finite values, or files whose
    ``(c h w)`` differ.

    Args:
        path: a file, a directory (every file directly in it with a suffix in
            :data:`LATENT_SUFFIXES`, in sorted order), or a list of files.
        segment_frames: ``F``, frames per segment.
        segments: ``S``, segments per sample.
        drop_last: allow dropping each video's trailing frames that do not fill a sample.
        key: which tensor to read from a ``.safetensors`` or dict ``.pt`` file holding several
            (default: the only one, else the one named ``latents``).
        dtype: dtype of the returned latents.
        check_finite: read every file once at construction to refuse nan/inf early
            (items are checked when read either way).

    Items are dicts with ``video (S F c h w)``.

    Example:
        >>> import tempfile, torch
        >>> from memkit.data import LatentDataset
        >>> folder = tempfile.mkdtemp()
        >>> torch.save(torch.randn(2, 12, 4, 8, 8), f"{folder}/a.pt")  # 2 videos of 12 frames
        >>> data = LatentDataset(folder, segment_frames=3, segments=2)
        >>> len(data), {key: tuple(value.shape) for key, value in data[0].items()}
        (4, {'video': (2, 3, 4, 8, 8)})
    """

    def __init__(
        self,
        path: PathLike | Sequence[PathLike],
        segment_frames: int,
        segments: int,
        *,
        drop_last: bool = False,
        key: str | None = None,
        dtype: torch.dtype = torch.float32,
        check_finite: bool = True,
    ) -> None:
        owner = "LatentDataset"
        self.segment_frames = check_int(owner, "segment_frames", segment_frames)
        self.segments = check_int(owner, "segments", segments)
        self.drop_last, self.dtype = drop_last, dtype
        self.files = [_LatentFile(p, key) for p in _list_files(path)]
        window = self.segment_frames * self.segments
        first: _LatentFile | None = None
        counts = []
        for f in self.files:
            if len(f.shape) != 5:
                raise DataError(f"{f.path}: expected 5 dimensions (b t c h w), got {len(f.shape)} with shape {f.shape}")
            b, t = f.shape[:2]
            if b == 0:
                raise DataError(f"{f.path}: holds no videos (dimension b is 0, shape {f.shape})")
            if t < window:
                raise DataError(
                    f"{f.path}: too few frames: dimension t is {t}, but one sample needs segments x "
                    f"segment_frames = {self.segments} x {self.segment_frames} = {window} (shape {f.shape})"
                )
            if t % window and not drop_last:
                raise DataError(
                    f"{f.path}: dimension t is {t}, not a multiple of segments x segment_frames = {window}; "
                    f"the last {t % window} frames of each video would not fit a sample. Trim the videos, "
                    f"change segments/segment_frames, or pass drop_last=True to drop them"
                )
            if first is None:
                first = f
            elif f.shape[2:] != first.shape[2:]:
                raise DataError(
                    f"{f.path}: mismatched shapes across files: (c h w) is {f.shape[2:]} but {first.path} has "
                    f"{first.shape[2:]}"
                )
            counts.append(b * (t // window))
            if check_finite:
                for video in range(b):
                    self._check_finite(f, video, 0, t)
        self._ends = np.cumsum(counts).tolist()

    def _check_finite(self, f: _LatentFile, video: int, start: int, stop: int) -> Tensor:
        x = f.read(video, start, stop)
        finite = torch.isfinite(x).flatten(1).all(1)
        if not bool(finite.all()):
            frame = start + int((~finite).nonzero()[0, 0])
            raise DataError(f"{f.path}: non-finite values (nan or inf) in video {video}, frame {frame}")
        return x

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"LatentDataset: index {index} out of range for {len(self)} items")
        index %= len(self)
        which = bisect.bisect_right(self._ends, index)
        f = self.files[which]
        local = index - (self._ends[which - 1] if which else 0)
        per_video = f.shape[1] // (self.segment_frames * self.segments)
        video, sample = divmod(local, per_video)
        start = sample * self.segment_frames * self.segments
        x = self._check_finite(f, video, start, start + self.segment_frames * self.segments)
        return {"video": x.to(self.dtype).reshape(self.segments, self.segment_frames, *x.shape[1:])}

    def __repr__(self) -> str:
        return (
            f"LatentDataset({len(self.files)} files, {len(self)} samples of {self.segments} x "
            f"{self.segment_frames} frames, drop_last={self.drop_last})"
        )


def _list_files(path: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(path, str | os.PathLike):
        root = Path(path)
        if not root.exists():
            raise DataError(f"LatentDataset: {root} does not exist")
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in LATENT_SUFFIXES)
            if not files:
                raise DataError(f"LatentDataset: no latent files ({', '.join(LATENT_SUFFIXES)}) in directory {root}")
            return files
        paths = [root]
    else:
        paths = [Path(p) for p in path]
        if not paths:
            raise DataError("LatentDataset: the list of files is empty")
    for p in paths:
        if not p.is_file():
            raise DataError(f"LatentDataset: {p} does not exist" if not p.exists() else f"{p} is not a file")
        if p.suffix not in LATENT_SUFFIXES:
            raise DataError(f"LatentDataset: {p} has unsupported type {p.suffix!r}; use one of {LATENT_SUFFIXES}")
    return paths
