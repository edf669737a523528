"""The ``scenes`` world: prompts switch between scenes, and coming back must bring a scene back.

A clip draws a few scenes, each a distinct, nearly static picture (a procedural canvas seen
through a gently swaying camera, with one disc gliding across it) and each with its own
prompt embedding. Segment ``s`` shows scene ``scene_ids[s]`` under that scene's prompt; the
sequence switches scenes (A, B, A, ...), so a model must recall what A looked like when A's
prompt returns. Motion restarts with every segment, so two segments of the same scene are
identical, frame for frame.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from memkit.data._common import FrameSize, check_int, check_seed, child_seed, frame_hw, random_prompt
from memkit.data.camera import camera_actions
from memkit.data.canvas import make_canvas
from memkit.data.render import render
from memkit.errors import DataError

__all__ = ["scene_sequence", "SceneClip", "scene_clip", "SceneWorld"]


def scene_sequence(seed: int, segments: int, num_scenes: int = 3) -> list[int]:
    """Which scene each segment shows: switches every segment and returns to earlier scenes.

    Segments 0 and 1 show two different scenes; from segment 2 on, each segment shows a scene
    other than the previous one: half the time (and always once every scene has been shown) a
    scene already seen, so some scene comes back at the latest once there are more segments
    than scenes (usually much sooner).

    Args:
        seed: non-negative int.
        segments: ``S``.
        num_scenes: how many scenes there are to choose from (at least 2).

    Returns:
        ``S`` scene indices in ``[0, num_scenes)``.

    Example:
        >>> from memkit.data import scene_sequence
        >>> scene_sequence(0, 5, num_scenes=2)
        [0, 1, 0, 1, 0]
        >>> scene_sequence(0, 6, num_scenes=3)
        [2, 0, 1, 2, 0, 1]
    """
    seed = check_seed("scene_sequence", seed)
    segments = check_int("scene_sequence", "segments", segments)
    num_scenes = check_int("scene_sequence", "num_scenes", num_scenes, minimum=2)
    rng = np.random.default_rng(child_seed(seed, 4))
    order = [int(i) for i in rng.permutation(num_scenes)]
    ids = order[:2]
    shown = 2
    while len(ids) < segments:
        seen = [s for s in order[:shown] if s != ids[-1]]
        if shown == num_scenes or rng.uniform() < 0.5:
            ids.append(seen[int(rng.integers(len(seen)))])
        else:
            ids.append(order[shown])
            shown += 1
    return ids[:segments]


@dataclasses.dataclass(frozen=True, eq=False)
class SceneClip:
    """One clip of the scenes world.

    Attributes:
        video: ``(t c h w)`` float32 in ``[-1, 1]``, ``t = frames_per_segment * segments``.
        actions: ``(t 2)`` the camera sway ``(dy, dx)`` in frame heights/widths; 0 at the first
            frame of every segment (a cut, not a camera move).
        prompts: ``(s p e)`` float32, the prompt embedding of each segment's scene.
        prompt_mask: ``(s p)`` bool, True for real prompt tokens, False for padding.
        scene_ids: ``(s,)`` int64, the scene each segment shows.
        frames_per_segment: ``F``.
    """

    video: Tensor
    actions: Tensor
    prompts: Tensor
    prompt_mask: Tensor
    scene_ids: Tensor
    frames_per_segment: int

    @property
    def segments(self) -> int:
        return int(self.scene_ids.shape[0])


def _scene_segment(seed: int, frames: int, fh: int, fw: int) -> tuple[Tensor, np.ndarray]:
    """One scene's segment ``(F c h w)`` and its camera positions ``(F, 2)``."""
    rng = np.random.default_rng(seed)
    margin = max(1, round(min(fh, fw) / 8))
    canvas = make_canvas(child_seed(seed, 0), fh + 2 * margin, fw + 2 * margin)
    phase = np.arange(frames) / frames
    path = np.stack([margin + 0.5 * margin * np.sin(2 * np.pi * phase), margin + margin * np.sin(2 * np.pi * phase)], 1)
    video = render(canvas, path, (fh, fw))

    radius = max(2.0, min(fh, fw) / 6)
    start, end = rng.uniform(radius, [fh - radius, fw - radius], size=(2, 2))
    color = torch.from_numpy(rng.uniform(-1, 1, 3).astype(np.float32))[:, None, None]
    ys, xs = torch.arange(fh, dtype=torch.float32)[:, None], torch.arange(fw, dtype=torch.float32)[None, :]
    for j in range(frames):
        cy, cx = start + (end - start) * (j / max(frames - 1, 1))
        alpha = (radius + 0.5 - ((ys - float(cy)) ** 2 + (xs - float(cx)) ** 2).sqrt()).clamp(0, 1)
        video[j] = alpha * color + (1 - alpha) * video[j]
    return video, path


def scene_clip(
    seed: int,
    frames_per_segment: int = 8,
    segments: int = 4,
    frame_size: FrameSize = 32,
    *,
    num_scenes: int = 3,
    scene_ids: Sequence[int] | None = None,
    prompt_tokens: int = 8,
    prompt_dim: int = 16,
    world_seed: int | None = None,
) -> SceneClip:
    """A clip whose segments follow a sequence of scenes, each with its own prompt.

    By default ``seed`` draws everything: the scenes' pictures, their prompts and the
    sequence, so every clip has new scenes and a model can only tie a prompt to a picture
    through memory. Pass ``world_seed`` to fix the bank of scenes and prompts across clips
    (then ``seed`` only draws the sequence).

    Args:
        seed: non-negative int; the same arguments give the same clip.
        frames_per_segment: ``F``.
        segments: ``S``.
        frame_size: ``int`` or ``(h, w)``.
        num_scenes: scenes in the bank (at least 2).
        scene_ids: the scene of every segment (``S`` ints in ``[0, num_scenes)``); default
            :func:`scene_sequence`.
        prompt_tokens: ``p``, prompt length; prompts end in padding, see
            :func:`memkit.data.random_prompt`.
        prompt_dim: ``e``, prompt embedding size.
        world_seed: fixes the scene bank when given.

    Returns:
        a :class:`SceneClip`.

    Example:
        >>> from memkit.data import scene_clip
        >>> clip = scene_clip(0, frames_per_segment=4, segments=3, frame_size=16, scene_ids=[0, 1, 0])
        >>> clip.video.shape, clip.prompts.shape, clip.prompt_mask.shape
        (torch.Size([12, 3, 16, 16]), torch.Size([3, 8, 16]), torch.Size([3, 8]))
        >>> bool((clip.video[0:4] == clip.video[8:12]).all()), bool((clip.prompts[0] == clip.prompts[1]).all())
        (True, False)
    """
    owner = "scene_clip"
    seed = check_seed(owner, seed)
    frames_per_segment = check_int(owner, "frames_per_segment", frames_per_segment)
    segments = check_int(owner, "segments", segments)
    num_scenes = check_int(owner, "num_scenes", num_scenes, minimum=2)
    fh, fw = frame_hw(owner, frame_size)
    bank = seed if world_seed is None else check_seed(owner, world_seed)
    if scene_ids is None:
        ids = scene_sequence(seed, segments, num_scenes)
    else:
        ids = [int(i) for i in scene_ids]
        if len(ids) != segments or any(not 0 <= i < num_scenes for i in ids):
            raise DataError(
                f"{owner}: scene_ids must hold {segments} ints (one per segment) in [0, {num_scenes}), got {ids}"
            )
    shown = sorted(set(ids))
    content = {k: _scene_segment(child_seed(bank, 2, k), frames_per_segment, fh, fw) for k in shown}
    prompts = {k: random_prompt(child_seed(bank, 3, k), prompt_tokens, prompt_dim) for k in shown}
    moves = camera_actions(content[ids[0]][1], (fh, fw))  # every scene sways the same way
    return SceneClip(
        video=torch.cat([content[k][0] for k in ids]),
        actions=moves.repeat(segments, 1),
        prompts=torch.stack([prompts[k][0] for k in ids]),
        prompt_mask=torch.stack([prompts[k][1] for k in ids]),
        scene_ids=torch.tensor(ids, dtype=torch.long),
        frames_per_segment=frames_per_segment,
    )


@dataclasses.dataclass(frozen=True)
class SceneWorld:
    """Configuration of the scenes world, for :class:`memkit.data.WorldDataset`.

    Attributes:
        frames_per_segment: ``F``.
        segments: ``S``.
        frame_size: ``int`` or ``(h, w)``.
        num_scenes: scenes per clip's bank.
        prompt_tokens: ``p``, prompt length (with padding).
        prompt_dim: ``e``, prompt embedding size.
        world_seed: fixes the scene bank across clips when given (see :func:`scene_clip`).

    Example:
        >>> from memkit.data import SceneWorld
        >>> world = SceneWorld(frames_per_segment=4, segments=3, frame_size=16)
        >>> {k: tuple(v.shape) for k, v in world.sample(0).items()}
        {'video': (3, 4, 3, 16, 16), 'actions': (3, 4, 2), 'prompt': (3, 8, 16), 'prompt_mask': (3, 8)}
    """

    frames_per_segment: int = 8
    segments: int = 4
    frame_size: FrameSize = 32
    num_scenes: int = 3
    prompt_tokens: int = 8
    prompt_dim: int = 16
    world_seed: int | None = None

    def clip(self, seed: int) -> SceneClip:
        """The clip for ``seed`` (a :class:`SceneClip`)."""
        return scene_clip(
            seed,
            self.frames_per_segment,
            self.segments,
            self.frame_size,
            num_scenes=self.num_scenes,
            prompt_tokens=self.prompt_tokens,
            prompt_dim=self.prompt_dim,
            world_seed=self.world_seed,
        )

    def sample(self, seed: int) -> dict[str, Tensor]:
        """A training sample: ``video (S F c h w)``, ``actions (S F 2)``, ``prompt (S p e)``, ``prompt_mask (S p)``."""
        clip = self.clip(seed)
        s, f = self.segments, self.frames_per_segment
        return {
            "video": clip.video.reshape(s, f, *clip.video.shape[1:]),
            "actions": clip.actions.reshape(s, f, 2),
            "prompt": clip.prompts,
            "prompt_mask": clip.prompt_mask,
        }
