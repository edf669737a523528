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

This module holds the clips and the world; the pieces live beside it: canvases in
:mod:`memkit.data.canvas`, the camera's path and actions in :mod:`memkit.data.camera`, the
rendering in :mod:`memkit.data.render` (all re-exported here, as before).
"""

import dataclasses
import math

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
from memkit.data.camera import camera_actions, find_revisits, pan_path
from memkit.data.canvas import PHOTOS, TEST_PHOTOS, TRAIN_PHOTOS, load_photo, make_canvas, photo_canvas
from memkit.data.render import render
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
