"""Rendering the revisit world: one frame per camera position, cut out of the canvas."""

from typing import Any

import numpy as np
import torch
from torch import Tensor

from memkit.data._common import (
    FrameSize,
    frame_hw,
)
from memkit.data.camera import _path_array
from memkit.data.canvas import _canvas_array
from memkit.errors import DataError

__all__ = ["render"]


def render(canvas: Any, path: Any, frame_size: FrameSize) -> Tensor:
    """Cut one frame per path position out of a canvas.

    Integer positions are exact crops; fractional ones are bilinear blends of the four
    neighbouring crops. The same position always gives the same frame, bit for bit.

    Args:
        canvas: ``(H, W, 3)`` RGB, numpy array or tensor, float in ``[0, 1]`` or uint8.
        path: ``(t, 2)`` sequence of ``(y, x)`` top-left positions; every frame must lie
            inside the canvas: ``0 <= y <= H - h`` and ``0 <= x <= W - w``.
        frame_size: ``int`` or ``(h, w)``.

    Returns:
        ``(t c h w)`` float32 tensor in ``[-1, 1]``, ``c = 3``.

    Example:
        >>> from memkit.data import make_canvas, pan_path, render
        >>> canvas = make_canvas(0, 16, 64)
        >>> video = render(canvas, pan_path(64, 16, 10), 16)
        >>> video.shape, bool(video.abs().max() <= 1), bool((video[2] == video[7]).all())
        (torch.Size([10, 3, 16, 16]), True, True)
    """
    owner = "render"
    image = _canvas_array(owner, canvas)
    positions = _path_array(owner, path)
    fh, fw = frame_hw(owner, frame_size)
    height, width = image.shape[:2]
    for axis, size, room in (("y", fh, height - fh), ("x", fw, width - fw)):
        coord = positions[:, 0 if axis == "y" else 1]
        bad = np.flatnonzero((coord < 0) | (coord > room))
        if room < 0 or bad.size:
            where = f"frame {int(bad[0])} at {axis}={coord[bad[0]]:g}" if bad.size else "every frame"
            raise DataError(
                f"{owner}: {where} leaves the canvas: a frame {size} pixels along {axis} fits at "
                f"{axis} in [0, {room}] on a canvas of shape {image.shape}"
            )
    img = torch.from_numpy(np.ascontiguousarray(image))
    base = np.floor(positions)
    frac = torch.from_numpy(positions - base).float()  # (t 2)
    y0 = torch.from_numpy(base[:, 0]).long()[:, None] + torch.arange(fh)  # (t h)
    x0 = torch.from_numpy(base[:, 1]).long()[:, None] + torch.arange(fw)  # (t w)
    y1, x1 = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)
    fy, fx = frac[:, 0, None, None, None], frac[:, 1, None, None, None]

    def crop(rows: Tensor, cols: Tensor) -> Tensor:
        return img[rows[:, :, None], cols[:, None, :]]  # (t h w 3)

    # a zero weight multiplies a finite neighbour to exactly 0, so integer positions are exact crops
    frames = (1 - fy) * ((1 - fx) * crop(y0, x0) + fx * crop(y0, x1)) + fy * (
        (1 - fx) * crop(y1, x0) + fx * crop(y1, x1)
    )
    return (frames * 2 - 1).clamp(-1, 1).permute(0, 3, 1, 2).contiguous()
