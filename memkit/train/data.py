"""Training batches from memkit's synthetic worlds, shaped for :class:`MALTNetwork`."""

from typing import Any

import torch
from torch import Tensor

from memkit.errors import ConfigError
from memkit.models.malt.config import MALTConfig
from memkit.train.config import DataSpec

__all__ = ["build_world", "pose_actions", "prepare_sample", "make_batch"]


def build_world(spec: DataSpec, model: MALTConfig, segments: int) -> Any:
    """The world of ``spec`` with the model's frame size and segment length and ``segments`` segments."""
    from memkit.data import RevisitWorld, SceneWorld

    if model.height != model.width:
        frame: int | tuple[int, int] = (model.height, model.width)
    else:
        frame = model.height
    common = dict(frames_per_segment=model.frames_per_segment, segments=segments, frame_size=frame)
    kwargs = {**spec.kwargs, **common}
    if model.prompt_dim:
        kwargs["prompt_dim"] = model.prompt_dim
    if spec.world == "revisit":
        if "sources" in kwargs:
            kwargs["sources"] = tuple(kwargs["sources"])
        return RevisitWorld(**kwargs)
    if spec.world == "scenes":
        return SceneWorld(**kwargs)
    raise ConfigError(f"data.world must be 'revisit' or 'scenes', got {spec.world!r}")


def pose_actions(actions: Tensor) -> Tensor:
    """``(..., T, 2)`` per-frame camera motion -> ``(..., T, 4)``: the motion and the pose.

    The pose is the running sum of the motion from the clip's first frame, so a frame
    that returns to a place has the pose it had there.

    Example:
        >>> pose_actions(torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.0, -0.5]]))[:, 3].tolist()
        [0.0, 0.5, 0.0]
    """
    return torch.cat([actions, actions.cumsum(dim=-2)], dim=-1)


def prepare_sample(sample: dict[str, Tensor], spec: DataSpec, model: MALTConfig) -> dict[str, Tensor]:
    """A world sample (``video (S F c h w)``, ``actions (S F 2)``, ``prompt``...) as the model takes it."""
    out = {"video": sample["video"]}
    if model.action_dim:
        actions = sample["actions"]
        if spec.pose_actions:
            s, f = actions.shape[:2]
            actions = pose_actions(actions.reshape(s * f, -1)).reshape(s, f, -1)
        out["actions"] = actions
    if model.prompt_dim:
        out["prompt"] = sample["prompt"]
        out["prompt_mask"] = sample["prompt_mask"]
    return out


def make_batch(world: Any, spec: DataSpec, model: MALTConfig, seeds: list[int]) -> dict[str, Tensor]:
    """Stack the samples for ``seeds``: ``video (B S F c h w)``, ``actions (B S F a)``, ..."""
    samples = [prepare_sample(world.sample(s), spec, model) for s in seeds]
    return {k: torch.stack([x[k] for x in samples]) for k in samples[0]}
