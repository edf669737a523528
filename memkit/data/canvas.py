"""Canvases for the revisit world: procedural images (by seed) and photographs bundled in scikit-image.

A canvas is any RGB image ``(H, W, 3)``, float in ``[0, 1]`` or uint8, much wider than a
frame. :func:`make_canvas` is deterministic by seed; :func:`photo_canvas` crops one of the
photographs scikit-image ships inside its wheel (optional: ``pip install memkit-video[video]``).
Nothing is downloaded.
"""

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memkit.data._common import (
    check_int,
    check_seed,
)
from memkit.errors import DataError

__all__ = ["PHOTOS", "TRAIN_PHOTOS", "TEST_PHOTOS", "make_canvas", "load_photo", "photo_canvas"]

#: Photographs scikit-image ships inside its wheel (loaded from disk, never downloaded).
#: Grey images are repeated over the three channels.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "clock",
    "text",
    "page",
    "cell",
)
#: Photos held out from training, to measure generalisation to unseen places.
TEST_PHOTOS: tuple[str, ...] = ("chelsea", "rocket", "coins", "gravel")
#: Photos to train on: every one of :data:`PHOTOS` not in :data:`TEST_PHOTOS`.
TRAIN_PHOTOS: tuple[str, ...] = tuple(p for p in PHOTOS if p not in TEST_PHOTOS)


def make_canvas(seed: int, height: int = 32, width: int = 128, *, smooth: float = 0.0) -> np.ndarray:
    """A procedural RGB canvas, the same for the same seed.

    Three layers, so that every frame-sized window looks different from every other: a smooth
    colour field (a sum of random Gaussian blobs), patches of oriented stripes, and hard-edged
    discs and rectangles. Feature sizes scale with ``min(height, width)``.

    Args:
        seed: non-negative int.
        height: canvas height in pixels.
        width: canvas width in pixels.
        smooth: standard deviation in pixels of a Gaussian blur over the finished canvas
            (0 = none). Small models learn blurred canvases much faster: a blur of 1 pixel
            removes the finest stripes and softens the hard edges, and places still differ.

    Returns:
        ``(height, width, 3)`` float32 array in ``[0, 1]``.

    Example:
        >>> from memkit.data import make_canvas
        >>> canvas = make_canvas(0, 32, 128)
        >>> canvas.shape, canvas.dtype.name, bool(canvas.min() >= 0 and canvas.max() <= 1)
        ((32, 128, 3), 'float32', True)
        >>> bool((make_canvas(0, 32, 128) == canvas).all()), bool((make_canvas(1, 32, 128) == canvas).all())
        (True, False)
        >>> soft = make_canvas(0, 32, 128, smooth=1.0)   # the same canvas, blurred
        >>> bool(np.abs(np.diff(soft, axis=1)).mean() < np.abs(np.diff(canvas, axis=1)).mean())
        True
    """
    seed = check_seed("make_canvas", seed)
    height = check_int("make_canvas", "height", height)
    width = check_int("make_canvas", "width", width)
    smooth = _check_smooth("make_canvas", smooth)
    rng = np.random.default_rng(seed)
    scale = float(min(height, width))
    squares = height * width / scale**2  # how many scale x scale squares the canvas holds
    ys = np.arange(height, dtype=np.float64)
    xs = np.arange(width, dtype=np.float64)

    # smooth colour field; separable Gaussians keep this O(n (H + W) + n H W) with no (n H W) temporary
    n = max(3, round(8 * squares))
    cy, cx = rng.uniform(0, height, n), rng.uniform(0, width, n)
    sigma = rng.uniform(0.08, 0.3, n) * scale
    color = rng.standard_normal((n, 3))
    gy = np.exp(-0.5 * ((ys[None] - cy[:, None]) / sigma[:, None]) ** 2)
    gx = np.exp(-0.5 * ((xs[None] - cx[:, None]) / sigma[:, None]) ** 2)
    img = np.einsum("nh,nw,nc->hwc", gy, gx, color)

    # stripe patches: oriented gratings under a soft square window
    for _ in range(max(1, round(1.5 * squares))):
        py, px = rng.uniform(0, height), rng.uniform(0, width)
        half = rng.uniform(0.15, 0.4) * scale
        window = np.exp(-(((ys[:, None] - py) / half) ** 4) - ((xs[None, :] - px) / half) ** 4)
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(3.0, 8.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi / period * (np.cos(angle) * xs[None, :] + np.sin(angle) * ys[:, None]) + phase)
        img += 1.5 * (window * wave)[..., None] * rng.standard_normal(3)

    img = 0.5 + 0.5 * np.tanh(img)

    # hard edges on top: discs and rectangles of flat colour
    for _ in range(max(2, round(3 * squares))):
        py, px = rng.uniform(0, height), rng.uniform(0, width)
        size = rng.uniform(0.06, 0.2) * scale
        shade = rng.uniform(0, 1, 3)
        if rng.uniform() < 0.5:
            inside = (ys[:, None] - py) ** 2 + (xs[None, :] - px) ** 2 <= size**2
        else:
            aspect = rng.uniform(0.4, 2.5)
            inside = (np.abs(ys[:, None] - py) <= size / aspect**0.5) & (np.abs(xs[None, :] - px) <= size * aspect**0.5)
        img[inside] = shade
    if smooth > 0:
        img = _blur(img, smooth)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _check_smooth(owner: str, smooth: float) -> float:
    value = float(smooth)
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{owner}: smooth must be a finite number >= 0 (a blur in pixels), got {smooth!r}")
    return value


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(H, W, 3)`` with reflected borders (no SciPy needed)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="reflect" if img.shape[axis] > radius else "edge")
        n = img.shape[axis]
        img = sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return img


def _skimage_data() -> Any:
    try:
        import skimage.data
    except ImportError as err:
        raise DataError(
            "photo canvases need scikit-image, which is not installed: pip install 'memkit-video[video]' "
            "(or pip install scikit-image); procedural canvases (source='procedural') need nothing"
        ) from err
    return skimage.data


@functools.cache
def _load_photo_cached(name: str) -> np.ndarray:
    image = np.asarray(getattr(_skimage_data(), name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    out = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    out.setflags(write=False)  # shared by every caller through the cache
    return out


def load_photo(name: str) -> np.ndarray:
    """One of the photographs of :data:`PHOTOS`, as RGB float in ``[0, 1]``.

    The images are files inside the scikit-image package; nothing is downloaded. Loaded once
    per process and cached; the returned array is read-only (copy it to draw on it).

    Args:
        name: a name from :data:`PHOTOS`.

    Returns:
        ``(H, W, 3)`` float32 array at the photo's own size.

    Example:
        >>> from memkit.data import load_photo
        >>> load_photo("coffee").shape
        (400, 600, 3)
    """
    if name not in PHOTOS:
        raise DataError(f"load_photo: unknown photo {name!r}; choose one of {', '.join(PHOTOS)}")
    return _load_photo_cached(name)


def photo_canvas(name: str, height: int = 32, width: int | None = None, *, offset: float = 0.5) -> np.ndarray:
    """A wide canvas cut from one of the bundled photographs.

    The photo is scaled (with antialiasing) just enough to cover ``height x width`` and the
    excess is cropped away; nothing is tiled, so no place appears twice on the canvas.

    Args:
        name: a name from :data:`PHOTOS`.
        height: canvas height in pixels.
        width: canvas width; default ``4 * height``.
        offset: in ``[0, 1]``, where along the cropped axis the canvas is cut (0.5 = centre);
            different offsets give different canvases from one photo.

    Returns:
        ``(height, width, 3)`` float32 array in ``[0, 1]``.

    Example:
        >>> from memkit.data import photo_canvas
        >>> photo_canvas("astronaut", height=32).shape
        (32, 128, 3)
    """
    height = check_int("photo_canvas", "height", height)
    width = check_int("photo_canvas", "width", 4 * height if width is None else width)
    if not 0.0 <= offset <= 1.0:
        raise DataError(f"photo_canvas: offset must be in [0, 1], got {offset!r}")
    photo = load_photo(name)
    ph, pw = photo.shape[:2]
    factor = max(height / ph, width / pw)
    sh, sw = max(height, math.ceil(ph * factor - 1e-9)), max(width, math.ceil(pw * factor - 1e-9))
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(sh, sw), mode="bilinear", antialias=True, align_corners=False)
    top, left = round(offset * (sh - height)), round(offset * (sw - width))
    x = x[0, :, top : top + height, left : left + width].clamp(0, 1)
    return x.permute(1, 2, 0).contiguous().numpy()


def _canvas_array(owner: str, canvas: Any) -> np.ndarray:
    array = canvas.detach().cpu().numpy() if isinstance(canvas, Tensor) else np.asarray(canvas)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DataError(f"{owner}: canvas must be an RGB image (H, W, 3), got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{owner}: canvas must be float in [0, 1] or uint8, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise DataError(f"{owner}: canvas has non-finite values (nan or inf)")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{owner}: a float canvas must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return array.astype(np.float32, copy=False)
