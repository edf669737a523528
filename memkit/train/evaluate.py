"""Measuring memory on the revisit world: PSNR of revisited frames against the ground truth."""

import dataclasses
from typing import Any

import torch
from torch import Tensor

from memkit.models.malt import EulerSampler, MALTNetwork, generate
from memkit.train.data import pose_actions

__all__ = ["psnr", "RevisitResult", "revisit_task", "evaluate_revisit"]


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB over all but the first ``a.ndim - 3`` dims
    (``(..., c, h, w)`` frames in ``[-1, 1]``, so the range is 2).

    Example:
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> psnr(x, x + 0.02).round().tolist()
        [40.0, 40.0]
    """
    mse = (a.float() - b.float()).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


@dataclasses.dataclass
class RevisitResult:
    """Outcome of :func:`evaluate_revisit` (means over clips).

    Attributes:
        psnr_per_segment: PSNR (dB) of each generated segment against the ground truth.
        psnr: mean PSNR over generated (revisited) frames.
        ms_per_segment: mean wall milliseconds per generated segment.
        state_bytes: bytes of the memory states (batch 1).
        video: generated frames of the first clip ``(T C H W)``; ``truth``: its ground truth.
    """

    psnr_per_segment: list[float]
    psnr: float
    ms_per_segment: float
    state_bytes: int
    video: Tensor
    truth: Tensor


def revisit_task(
    net: MALTNetwork, seed: int, segments: int, *, pose: bool = True, world: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor]:
    """Ground-truth video ``(1 T C H W)`` and model actions ``(1 T a)`` of one revisit clip of ``segments`` segments.

    ``world`` holds :class:`memkit.data.RevisitWorld` options (``speed``, ``smooth``, ``sources``...),
    e.g. the ``data.kwargs`` the model was trained with.
    """
    from memkit.data import RevisitWorld

    cfg = net.config
    options = dict(world or {})
    if "sources" in options:
        options["sources"] = tuple(options["sources"])
    frame = cfg.height if cfg.height == cfg.width else (cfg.height, cfg.width)
    clip = RevisitWorld(frames_per_segment=cfg.frames_per_segment, segments=segments, frame_size=frame, **options).clip(
        seed
    )
    actions = pose_actions(clip.actions) if pose else clip.actions
    return clip.video[None], actions[None]


def evaluate_revisit(
    net: MALTNetwork,
    *,
    segments: int = 8,
    context_segments: int | None = None,
    seeds: tuple[int, ...] = (10_000,),
    steps: int = 8,
    pose: bool = True,
    sample_seed: int = 0,
    world: dict[str, Any] | None = None,
) -> RevisitResult:
    """Give the outbound sweep of revisit clips as context; generate the return sweep; score it.

    Args:
        net: a network trained on the revisit world (eval mode).
        segments: clip length; the camera turns back halfway.
        context_segments: segments given as context (default ``segments // 2``, the outbound sweep).
        seeds: clip seeds (keep them out of the training seeds' way: training uses hashed seeds).
        steps: Euler steps per segment.
        pose: the model takes motion + pose actions (as trained with ``pose_actions=True``).
        sample_seed: noise seed of the sampler.
        world: revisit-world options the model was trained with (``TrainConfig.data.kwargs``).
    """
    context_segments = segments // 2 if context_segments is None else context_segments
    f = net.config.frames_per_segment
    per_seg: list[Tensor] = []
    ms: list[float] = []
    first: Any = None
    nbytes = 0
    for seed in seeds:
        video, actions = revisit_task(net, seed, segments, pose=pose, world=world)
        ctx = video[:, : context_segments * f]
        out = generate(
            net,
            segments - context_segments,
            context=ctx,
            actions=actions if net.config.action_dim else None,
            sampler=EulerSampler(steps=steps),
            seed=sample_seed,
        )
        truth = video[:, context_segments * f :]
        scores = psnr(out.video, truth)[0]  # (T,)
        per_seg.append(scores.reshape(-1, f).mean(-1))
        ms.extend(out.ms_per_segment)
        nbytes = out.state_bytes[-1] if out.state_bytes else 0
        if first is None:
            first = (out.video[0], truth[0])
    stacked = torch.stack(per_seg).mean(0)
    return RevisitResult(
        psnr_per_segment=[float(x) for x in stacked],
        psnr=float(stacked.mean()),
        ms_per_segment=sum(ms) / max(1, len(ms)),
        state_bytes=nbytes,
        video=first[0],
        truth=first[1],
    )
