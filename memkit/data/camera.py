"""The camera of the revisit world: its path over a canvas, the actions that move it, and where it came back.

A path is a sequence of ``(y, x)`` top-left positions in canvas pixels, shape ``(t, 2)``.
"""

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memkit.data._common import (
    FrameSize,
    check_int,
    frame_hw,
)
from memkit.errors import DataError

__all__ = ["pan_path", "camera_actions", "find_revisits"]


def pan_path(
    canvas_width: int,
    frame_size: FrameSize,
    num_frames: int,
    out_and_back: bool = True,
    speed: float | None = None,
    *,
    y: float = 0.0,
    start: float = 0.0,
) -> np.ndarray:
    """A horizontal camera path; out and exactly back by default.

    Out and back, frame ``i`` sits at ``x = start + speed * min(i, T - 1 - i)``: frames ``i``
    and ``T - 1 - i`` show the same place. With an even ``T`` the camera rests one frame at
    the far end.

    Args:
        canvas_width: ``W`` of the canvas the path is for.
        frame_size: ``int`` or ``(height, width)`` of a frame.
        num_frames: ``T``.
        out_and_back: come back to the start (True) or keep going (False).
        speed: pixels per frame; default the largest whole number that keeps the frame on the
            canvas (a fraction when less than one pixel fits). Fractional positions are
            rendered by bilinear interpolation.
        y: the row of the frame's top edge, constant along the path.
        start: ``x`` of the first frame.

    Returns:
        ``(T, 2)`` float64 array of ``(y, x)`` top-left positions.

    Example:
        >>> from memkit.data import pan_path
        >>> pan_path(canvas_width=20, frame_size=8, num_frames=6)[:, 1].tolist()
        [0.0, 6.0, 12.0, 12.0, 6.0, 0.0]
        >>> pan_path(20, 8, 4, out_and_back=False, speed=2)[:, 1].tolist()
        [0.0, 2.0, 4.0, 6.0]
    """
    owner = "pan_path"
    canvas_width = check_int(owner, "canvas_width", canvas_width)
    _, fw = frame_hw(owner, frame_size)
    num_frames = check_int(owner, "num_frames", num_frames)
    room = canvas_width - fw - start
    if start < 0 or room < 0:
        raise DataError(
            f"{owner}: a frame {fw} pixels wide starting at x={start} does not fit a canvas {canvas_width} wide"
        )
    steps = np.arange(num_frames, dtype=np.float64)
    if out_and_back:
        steps = np.minimum(steps, num_frames - 1 - steps)
    far = float(steps.max())
    if speed is None:
        speed = room / far if far > 0 else 0.0
        if speed >= 1:
            speed = math.floor(speed)
    if speed < 0 or speed * far > room + 1e-9:
        raise DataError(
            f"{owner}: speed {speed} pixels per frame for {int(far)} steps moves {speed * far:g} pixels, but the "
            f"canvas leaves only {room:g} (canvas width {canvas_width}, frame width {fw}, start {start})"
        )
    path = np.stack([np.full(num_frames, float(y)), start + speed * steps], axis=1)
    return path


def _path_array(owner: str, path: Any) -> np.ndarray:
    array = np.asarray(path.detach().cpu().numpy() if isinstance(path, Tensor) else path, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 1:
        raise DataError(f"{owner}: path must be a sequence of (y, x) positions, shape (t, 2), got {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{owner}: path has non-finite positions")
    return array


def camera_actions(positions: Any, frame_size: FrameSize) -> Tensor:
    """Per-frame camera motion, normalised by the frame size.

    ``actions[i] = (positions[i] - positions[i - 1]) / (h, w)`` and ``actions[0] = 0``, so
    ``positions[i] = positions[0] + cumsum(actions)[i] * (h, w)``.

    Args:
        positions: ``(t, 2)`` ``(y, x)`` positions in pixels.
        frame_size: ``int`` or ``(h, w)``.

    Returns:
        ``(t 2)`` float32 tensor.

    Example:
        >>> from memkit.data import camera_actions
        >>> camera_actions([(0, 0), (0, 4), (2, 4)], 8).tolist()
        [[0.0, 0.0], [0.0, 0.5], [0.25, 0.0]]
    """
    pos = _path_array("camera_actions", positions)
    fh, fw = frame_hw("camera_actions", frame_size)
    moves = np.diff(pos, axis=0, prepend=pos[:1]) / np.array([fh, fw], dtype=np.float64)
    return torch.from_numpy(moves.astype(np.float32))


def find_revisits(positions: Any, min_gap: int = 1) -> Tensor:
    """Frames that show exactly a place an earlier frame showed.

    Args:
        positions: ``(t, 2)`` ``(y, x)`` positions.
        min_gap: report a pair only when the frames are at least this many frames apart.

    Returns:
        ``(r 2)`` int64 tensor of ``(later, earlier)`` frame indices, one row per later frame
        (in order), paired with the *first* frame at the same position.

    Example:
        >>> from memkit.data import find_revisits, pan_path
        >>> find_revisits(pan_path(40, 8, 7)).tolist()
        [[4, 2], [5, 1], [6, 0]]
    """
    pos = _path_array("find_revisits", positions)
    min_gap = check_int("find_revisits", "min_gap", min_gap)
    same = (pos[:, None, :] == pos[None, :, :]).all(-1)
    earlier = np.tril(same, k=-1)
    later = np.flatnonzero(earlier.any(1))
    first = earlier[later].argmax(1)
    keep = later - first >= min_gap
    pairs = np.stack([later[keep], first[keep]], axis=1).astype(np.int64)
    return torch.from_numpy(pairs.reshape(-1, 2))
