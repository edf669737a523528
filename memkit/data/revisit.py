"""The ``revisit`` world: a camera pans over a wide canvas and comes back.

A frame shows a ``frame_size`` window of a canvas much wider than the frame. The default
path goes out and comes back exactly, so every frame of the return sweep shows a place the
outbound sweep already showed; :attr:`RevisitClip.revisit_pairs` says which. A model with
working memory should reproduce those frames; one without cannot know what lies behind it.

The canvas is any RGB image ``(H, W, 3)`` (float in ``[0, 1]`` or uint8) and the path any
sequence of ``(y, x)`` top-left positions in canvas pixels. Ready-made canvases are
procedural (:func:`make_canvas`, deterministic by seed) or photographs bundled inside
scikit-image (:func:`photo_canvas`; scikit-image is optional, ``pip install memkit-video[video]``).
Nothing is downloaded.
"""

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memkit.data._common import (
    FrameSize,
    check_int,
    check_seed,
    child_seed,
    frame_hw,
    name_seed,
    random_prompt,
)
from memkit.errors import DataError

__all__ = [
    "PHOTOS",
    "TRAIN_PHOTOS",
    "TEST_PHOTOS",
    "make_canvas",
    "load_photo",
    "photo_canvas",
    "pan_path",
    "render",
    "camera_actions",
    "find_revisits",
    "RevisitClip",
    "revisit_clip",
    "sweep_clip",
    "RevisitWorld",
]

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


# ---------------------------------------------------------------------------------------------
# canvases


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


# ---------------------------------------------------------------------------------------------
# paths and rendering


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


def _path_array(owner: str, path: Any) -> np.ndarray:
    array = np.asarray(path.detach().cpu().numpy() if isinstance(path, Tensor) else path, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 1:
        raise DataError(f"{owner}: path must be a sequence of (y, x) positions, shape (t, 2), got {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{owner}: path has non-finite positions")
    return array


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


# ---------------------------------------------------------------------------------------------
# clips


@dataclasses.dataclass(frozen=True, eq=False)
class RevisitClip:
    """One clip of the revisit world.

    Attributes:
        video: ``(t c h w)`` float32 in ``[-1, 1]``, ``t = frames_per_segment * segments``.
        actions: ``(t 2)`` per-frame camera motion ``(dy, dx)`` in frame heights/widths
            (see :func:`camera_actions`); ``actions[0] = 0``.
        positions: ``(t 2)`` float32 ``(y, x)`` top-left of each frame on the canvas, pixels.
        revisit_pairs: ``(r 2)`` int64 ``(return frame, outbound frame)`` showing the same place:
            ``video[revisit_pairs[:, 0]]`` equals ``video[revisit_pairs[:, 1]]``.
        canvas: ``(c H W)`` float32 in ``[-1, 1]``, the whole world the camera looks at.
        source: ``"procedural"`` or the photo's name.
        frames_per_segment: ``F``.
        place_ids: ``(t,)`` int64 place of each frame on the canvas's grid, for clips of the
            sweep path families (:mod:`memkit.data.paths`); ``None`` for out-and-back clips.
    """

    video: Tensor
    actions: Tensor
    positions: Tensor
    revisit_pairs: Tensor
    canvas: Tensor
    source: str
    frames_per_segment: int
    place_ids: Tensor | None = None

    @property
    def segments(self) -> int:
        return self.video.shape[0] // self.frames_per_segment


def _source_canvas(seed: int, source: str, height: int, width: int, smooth: float) -> np.ndarray:
    """The canvas of a clip: procedural from ``seed``, or cut from a photo where ``seed`` says."""
    if source == "procedural":
        return make_canvas(seed, height, width, smooth=smooth)
    offset = float(np.random.default_rng(child_seed(seed, name_seed(source))).uniform())
    return photo_canvas(source, height, width, offset=offset)


def _filmed(
    canvas: np.ndarray,
    path: np.ndarray,
    frame: tuple[int, int],
    source: str,
    frames_per_segment: int,
    place_ids: Tensor | None = None,
) -> RevisitClip:
    """The clip a camera films moving along ``path`` over ``canvas``."""
    return RevisitClip(
        video=render(canvas, path, frame),
        actions=camera_actions(path, frame),
        positions=torch.from_numpy(path.astype(np.float32)),
        revisit_pairs=find_revisits(path),
        canvas=torch.from_numpy(canvas).permute(2, 0, 1) * 2 - 1,
        source=source,
        frames_per_segment=frames_per_segment,
        place_ids=place_ids,
    )


def revisit_clip(
    seed: int,
    frames_per_segment: int = 8,
    segments: int = 4,
    frame_size: FrameSize = 32,
    source: str = "procedural",
    *,
    speed: float | None = None,
    smooth: float = 0.0,
) -> RevisitClip:
    """A clip that pans out over a canvas and comes exactly back.

    The canvas is as wide as the outbound sweep needs: ``w + speed * ((t - 1) // 2)``, and
    as tall as a frame. With ``source="procedural"`` the seed draws the canvas; with a photo
    name it picks where the canvas is cut from the photo.

    Args:
        seed: non-negative int; the same arguments give the same clip.
        frames_per_segment: ``F``.
        segments: ``S``; the clip has ``t = S * F`` frames.
        frame_size: ``int`` or ``(h, w)``.
        source: ``"procedural"`` or a name from :data:`PHOTOS`.
        speed: pixels per frame; default the smallest whole number, at least ``w // 8``, that
            makes the canvas at least three frames wide, capped at ``w`` so that no strip of the
            canvas goes unseen (very short clips get narrower canvases).
        smooth: Gaussian blur of a procedural canvas, pixels (see :func:`make_canvas`);
            photo canvases ignore it.

    Returns:
        a :class:`RevisitClip`.

    Example:
        >>> from memkit.data import revisit_clip
        >>> clip = revisit_clip(0, frames_per_segment=4, segments=4, frame_size=16)
        >>> clip.video.shape, clip.actions.shape, clip.revisit_pairs[:2].tolist()
        (torch.Size([16, 3, 16, 16]), torch.Size([16, 2]), [[8, 7], [9, 6]])
        >>> later, earlier = clip.revisit_pairs.T
        >>> bool((clip.video[later] == clip.video[earlier]).all())
        True
    """
    owner = "revisit_clip"
    seed = check_seed(owner, seed)
    frames_per_segment = check_int(owner, "frames_per_segment", frames_per_segment)
    segments = check_int(owner, "segments", segments)
    fh, fw = frame_hw(owner, frame_size)
    if source != "procedural" and source not in PHOTOS:
        raise DataError(f"{owner}: source must be 'procedural' or one of {', '.join(PHOTOS)}, got {source!r}")
    frames = frames_per_segment * segments
    far = (frames - 1) // 2  # steps to the turning point
    if speed is None:
        # out far enough that the canvas is >= 3 frames wide, but never skip a strip of it
        speed = min(fw, max(1, fw // 8, math.ceil(2 * fw / far))) if far else 0
    speed = float(speed)
    if not math.isfinite(speed) or speed < 0:
        raise DataError(f"{owner}: speed must be a finite number >= 0, got {speed!r}")
    width = fw + math.ceil(speed * far)
    canvas = _source_canvas(seed, source, fh, width, smooth)
    path = pan_path(width, (fh, fw), frames, out_and_back=True, speed=speed)
    return _filmed(canvas, path, (fh, fw), source, frames_per_segment)


def sweep_clip(
    seed: int,
    family: str = "walk",
    frames: int = 16,
    places: int = 8,
    frame_size: FrameSize = 16,
    source: str = "procedural",
    *,
    step: int | None = None,
    smooth: float = 0.0,
    frames_per_segment: int = 1,
) -> RevisitClip:
    """A clip that sweeps once over a canvas of ``places`` places, then follows a path family.

    The first ``places`` frames are the sweep (place ``0 .. P-1``, the context a model is
    given); the rest follow ``family`` (:mod:`memkit.data.paths`: ``"walk"`` for training,
    ``"pingpong"``, ``"pauses"`` and ``"fast"`` only for evaluation), so every later frame
    revisits a place the sweep showed. The canvas is ``w + step * (P - 1)`` wide and one
    frame tall.

    Args:
        seed: the same arguments give the same clip (canvas and path).
        family: a name from :data:`memkit.data.paths.PATH_FAMILIES`.
        frames: ``t``, frames in all (sweep included), a multiple of ``frames_per_segment``.
        places: ``P``, at least 2.
        frame_size: ``int`` or ``(h, w)``.
        source: ``"procedural"`` or a name from :data:`PHOTOS`.
        step: pixels between neighbouring places; default ``w // 2``.
        smooth: Gaussian blur of a procedural canvas (:func:`make_canvas`).
        frames_per_segment: ``F``, recorded on the clip.

    Returns:
        a :class:`RevisitClip` whose ``place_ids`` say where each frame is.

    Example:
        >>> from memkit.data import sweep_clip
        >>> clip = sweep_clip(0, "pingpong", frames=12, places=4, frame_size=16)
        >>> clip.place_ids.tolist()
        [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
        >>> bool((clip.video[4] == clip.video[2]).all()), tuple(clip.canvas.shape)
        (True, (3, 16, 40))
    """
    from memkit.data.paths import sweep_path

    owner = "sweep_clip"
    seed = check_seed(owner, seed)
    frames = check_int(owner, "frames", frames)
    frames_per_segment = check_int(owner, "frames_per_segment", frames_per_segment)
    if frames % frames_per_segment:
        raise DataError(f"{owner}: frames ({frames}) must be a multiple of frames_per_segment ({frames_per_segment})")
    fh, fw = frame_hw(owner, frame_size)
    step = max(1, fw // 2) if step is None else check_int(owner, "step", step)
    if source != "procedural" and source not in PHOTOS:
        raise DataError(f"{owner}: source must be 'procedural' or one of {', '.join(PHOTOS)}, got {source!r}")
    ids = sweep_path(family, places, frames, child_seed(seed, 7))
    width = fw + step * (places - 1)
    canvas = _source_canvas(seed, source, fh, width, smooth)
    path = np.stack([np.zeros(frames), ids.astype(np.float64) * step], axis=1)
    return _filmed(canvas, path, (fh, fw), source, frames_per_segment, place_ids=torch.from_numpy(ids))


def _split(x: Tensor, segments: int) -> Tensor:
    return x.reshape(segments, x.shape[0] // segments, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class RevisitWorld:
    """Configuration of the revisit world, for :class:`memkit.data.WorldDataset`.

    Each sample picks a source from ``sources`` (by seed) and calls :func:`revisit_clip`.
    The world has no text, but so that one model can train on every world, each source gets
    its own fixed prompt embedding (from :func:`memkit.data.random_prompt`), repeated for
    every segment.

    Attributes:
        frames_per_segment: ``F``.
        segments: ``S``.
        frame_size: ``int`` or ``(h, w)``.
        sources: names to draw from: ``"procedural"`` and/or names from :data:`PHOTOS`
            (e.g. ``("procedural", *TRAIN_PHOTOS)``).
        speed: pixels per frame, default as in :func:`revisit_clip`; for the sweep path
            families, the pixels between neighbouring places (:func:`sweep_clip`'s ``step``).
        path: ``"out_and_back"`` (:func:`revisit_clip`) or a family of
            :mod:`memkit.data.paths` (:func:`sweep_clip`: a sweep over ``places`` places, then
            the family's path).
        places: ``P``, places on the canvas for the sweep path families.
        smooth: Gaussian blur of procedural canvases in pixels (:func:`make_canvas`).
        prompt_tokens: ``p``, prompt length (with padding).
        prompt_dim: ``e``, prompt embedding size.

    Example:
        >>> from memkit.data import RevisitWorld
        >>> world = RevisitWorld(frames_per_segment=4, segments=2, frame_size=16)
        >>> {k: tuple(v.shape) for k, v in world.sample(0).items()}
        {'video': (2, 4, 3, 16, 16), 'actions': (2, 4, 2), 'prompt': (2, 8, 16), 'prompt_mask': (2, 8)}
    """

    frames_per_segment: int = 8
    segments: int = 4
    frame_size: FrameSize = 32
    sources: tuple[str, ...] = ("procedural",)
    speed: float | None = None
    smooth: float = 0.0
    prompt_tokens: int = 8
    prompt_dim: int = 16
    path: str = "out_and_back"
    places: int = 8

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataError("RevisitWorld: sources must name at least one source")
        for source in self.sources:
            if source != "procedural" and source not in PHOTOS:
                raise DataError(
                    f"RevisitWorld: unknown source {source!r}; use 'procedural' or one of {', '.join(PHOTOS)}"
                )
        from memkit.data.paths import PATH_FAMILIES

        if self.path != "out_and_back" and self.path not in PATH_FAMILIES:
            raise DataError(
                f"RevisitWorld: unknown path {self.path!r}; use 'out_and_back' or one of {', '.join(PATH_FAMILIES)}"
            )

    def clip(self, seed: int) -> RevisitClip:
        """The clip for ``seed`` (a :class:`RevisitClip`)."""
        seed = check_seed("RevisitWorld.clip", seed)
        pick = int(np.random.default_rng(child_seed(seed, 1)).integers(len(self.sources)))
        if self.path != "out_and_back":
            return sweep_clip(
                seed,
                self.path,
                self.frames_per_segment * self.segments,
                self.places,
                self.frame_size,
                self.sources[pick],
                step=None if self.speed is None else int(self.speed),
                smooth=self.smooth,
                frames_per_segment=self.frames_per_segment,
            )
        return revisit_clip(
            seed,
            self.frames_per_segment,
            self.segments,
            self.frame_size,
            self.sources[pick],
            speed=self.speed,
            smooth=self.smooth,
        )

    def sample(self, seed: int) -> dict[str, Tensor]:
        """A training sample: ``video (S F c h w)``, ``actions (S F 2)``, ``prompt (S p e)``, ``prompt_mask (S p)``."""
        clip = self.clip(seed)
        prompt, mask = random_prompt(name_seed(clip.source), self.prompt_tokens, self.prompt_dim)
        return {
            "video": _split(clip.video, self.segments),
            "actions": _split(clip.actions, self.segments),
            "prompt": prompt.expand(self.segments, -1, -1).clone(),
            "prompt_mask": mask.expand(self.segments, -1).clone(),
        }
