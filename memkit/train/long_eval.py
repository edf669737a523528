"""Quality along length and revisit lag: does memory hold at 4x and 8x the trained length?

The task: a clip of the revisit world's sweep families (:func:`memkit.data.sweep_clip`).
The first ``P`` frames sweep once over the canvas and are given as context; the model then
generates ``multiple x L`` frames along a path (``L``, the *trained length*, is how many
frames followed the sweep in the longest training clip). Every generated frame shows a place
the sweep showed, so a model that remembers can reproduce it.

Scores, per generated frame, against the ground truth:

* PSNR (dB) and SSIM (``pytorch_msssim.ssim``, frames mapped to ``[0, 1]``);
* place recall: the frame's nearest context frame (mean squared error) is the one showing
  the same place (chance is ``1 / P``);
* its revisit lag: frames since its place was last on screen (context or generated).

Frames are grouped by *length bucket*: "1x" holds generated frames ``1 .. L``, "2x" frames
``L+1 .. 2L``, "4x" frames ``2L+1 .. 4L``, "8x" frames ``4L+1 .. 8L``: quality *at* a length,
not averaged with the easy start. References on the same checkpoint and clips:

* ``none``: the checkpoint with its memory replaced by :class:`memkit.NoMemory`;
* ``grey``: a flat frame of the context's mean colour (what a model that knows nothing
  scores; sampling confident made-up content scores lower);
* ``full``: the checkpoint reading a FIFO that holds every frame of the clip (full-history
  attention, the ceiling a bounded memory chases; only for memories that store frames).
"""

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memkit.models.malt import EulerSampler, MALTNetwork, generate
from memkit.train.data import pose_actions

__all__ = [
    "LENGTH_MULTIPLES",
    "LAG_BUCKETS",
    "FRAME_MEMORIES",
    "LongResult",
    "long_clips",
    "score_frames",
    "evaluate_long",
    "trained_length",
]

#: Length buckets scored: generated frames up to 1x, 2x, 4x and 8x the trained length.
LENGTH_MULTIPLES: tuple[int, ...] = (1, 2, 4, 8)
#: Revisit-lag buckets ``(low, high]`` in frames.
LAG_BUCKETS: tuple[tuple[int, int], ...] = ((0, 1), (1, 3), (3, 8), (8, 16), (16, 32), (32, 64), (64, 1 << 30))
#: Memories whose read returns stored frames (a full-history FIFO can stand in for them).
FRAME_MEMORIES: tuple[str, ...] = ("none", "sink_window", "fifo", "sparse_kv", "prompt_bank", "compose")


def trained_length(train_config: Any) -> int:
    """``L``: frames that followed the context in the longest training clip of ``train_config``.

    For the sweep path families, the frames after the sweep; for the out-and-back path, the
    return half.
    """
    kwargs = dict(train_config.data.kwargs)
    frames = train_config.max_segments() * train_config.model.frames_per_segment
    if kwargs.get("path", "out_and_back") == "out_and_back":
        return frames - frames // 2
    return frames - int(kwargs.get("places", 8))


@dataclasses.dataclass
class LongResult:
    """Per-frame scores of one model (or reference) over a set of clips.

    Attributes:
        name: what was scored (``"sparse_kv"``, ``"none"``, ``"grey"``, ``"full"``...).
        trained_length: ``L``.
        psnr, ssim: ``(clips, n)`` per generated frame.
        recall: ``(clips, n)`` bool, nearest context frame shows the right place (``None`` for grey).
        lags: ``(clips, n)`` revisit lag of each generated frame.
        families: the path family of each clip.
        sources: the canvas of each clip (``"procedural"`` or a photograph's name).
        state_bytes: bytes of the memory states after the last frame (batch of all clips).
        ms_per_frame: wall milliseconds per generated frame (the whole batch).
        video: ``(n c h w)`` the first clip's generated frames (``None`` for grey).
        truth: ``(P + n c h w)`` the first clip's ground truth, context sweep included.
    """

    name: str
    trained_length: int
    psnr: np.ndarray
    ssim: np.ndarray
    recall: np.ndarray | None
    lags: np.ndarray
    families: list[str]
    sources: list[str]
    state_bytes: int = 0
    ms_per_frame: float = 0.0
    video: Tensor | None = None
    truth: Tensor | None = None

    def _rows(self, family: str | None, photos: bool | None) -> list[int]:
        return [
            i
            for i, (f, s) in enumerate(zip(self.families, self.sources, strict=True))
            if (family is None or f == family) and (photos is None or (s != "procedural") == photos)
        ]

    def _bucket(self, values: np.ndarray, multiple: int, family: str | None, photos: bool | None) -> float:
        L = self.trained_length
        lo = 0 if multiple == 1 else L * (multiple // 2)
        hi = min(L * multiple, values.shape[1])
        rows = self._rows(family, photos)
        if lo >= hi or not rows:
            return float("nan")
        return float(values[rows, lo:hi].mean())

    def at(self, multiple: int, metric: str = "psnr", family: str | None = None, photos: bool | None = None) -> float:
        """Mean ``metric`` (``"psnr"``, ``"ssim"``, ``"recall"``) over the frames of length bucket
        ``multiple``, over clips of one ``family`` and/or only photographs (``photos=True``) or
        only procedural canvases (``False``) when given."""
        values = getattr(self, metric)
        if values is None:
            return float("nan")
        return self._bucket(values.astype(np.float64), multiple, family, photos)

    def by_lag(self, metric: str = "psnr") -> list[tuple[str, float, int]]:
        """``(bucket label, mean metric, frames)`` per revisit-lag bucket with frames in it."""
        values = getattr(self, metric)
        out = []
        for lo, hi in LAG_BUCKETS:
            sel = (self.lags > lo) & (self.lags <= hi)
            if values is None or not sel.any():
                continue
            label = f"{lo + 1}-{hi}" if hi < 1 << 30 else f">{lo}"
            out.append((label, float(values[sel].astype(np.float64).mean()), int(sel.sum())))
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest: per length bucket and per lag bucket."""
        return {
            "name": self.name,
            "trained_length": self.trained_length,
            "frames": int(self.psnr.shape[1]),
            "clips": int(self.psnr.shape[0]),
            "state_bytes": self.state_bytes,
            "ms_per_frame": self.ms_per_frame,
            "by_length": {
                f"{m}x": {k: self.at(m, k) for k in ("psnr", "ssim", "recall")}
                for m in LENGTH_MULTIPLES
                if self.psnr.shape[1] > self.trained_length * (m // 2)
            },
            "by_family_4x": {f: self.at(4, "psnr", f) for f in sorted(set(self.families))},
            "photos_4x": self.at(4, "psnr", photos=True),
            "procedural_4x": self.at(4, "psnr", photos=False),
            "by_lag": [{"lag": lab, "psnr": v, "frames": n} for lab, v, n in self.by_lag("psnr")],
        }


def long_clips(
    world: dict[str, Any], *, frames: int, families: Sequence[str], seeds: Sequence[int], frame_size: int = 16
) -> dict[str, Any]:
    """Clips for every ``(family, seed)``: ``video (b T c h w)``, ``actions (b T 4)`` (motion + pose),
    ``places (b T)``, ``families``, ``sources``; ``world`` holds the sweep world's options
    (``places``, ``speed``, ``smooth``, ``sources``: clips take the sources in turn)."""
    from memkit.data import sweep_clip

    places = int(world.get("places", 8))
    step = world.get("speed")
    sources = tuple(world.get("sources", ("procedural",)))
    videos, actions, ids, fams, used = [], [], [], [], []
    for j, family in enumerate(families):
        for i, seed in enumerate(seeds):
            source = sources[(i + j) % len(sources)]
            clip = sweep_clip(
                seed,
                family,
                frames,
                places,
                frame_size,
                source,
                step=None if step is None else int(step),
                smooth=float(world.get("smooth", 0.0)),
            )
            videos.append(clip.video)
            actions.append(pose_actions(clip.actions))
            assert clip.place_ids is not None
            ids.append(clip.place_ids)
            fams.append(family)
            used.append(source)
    return {
        "video": torch.stack(videos),
        "actions": torch.stack(actions),
        "places": torch.stack(ids),
        "families": fams,
        "sources": used,
        "context": places,
    }


def score_frames(generated: Tensor, truth: Tensor, context: Tensor, truth_places: Tensor) -> dict[str, np.ndarray]:
    """PSNR, SSIM and place recall of ``generated (b n c h w)`` against ``truth (b n c h w)``.

    ``context (b P c h w)`` is the sweep (frame ``i`` shows place ``i``) and ``truth_places (b n)``
    the place of each true frame. Frames are in ``[-1, 1]``.
    """
    from pytorch_msssim import ssim

    from memkit.train.evaluate import psnr

    b, n = generated.shape[:2]
    gen = generated.float().clamp(-1, 1)
    tru = truth.float()
    p = psnr(gen, tru).numpy()
    flat_g = (gen.flatten(0, 1) + 1) / 2
    flat_t = (tru.flatten(0, 1) + 1) / 2
    s = ssim(flat_g, flat_t, data_range=1.0, size_average=False, win_size=7).reshape(b, n).numpy()
    dist = (gen[:, :, None] - context.float()[:, None]).pow(2).flatten(3).mean(-1)  # (b n P)
    recall = (dist.argmin(-1) == truth_places).numpy()
    return {"psnr": p, "ssim": s, "recall": recall}


def _lags(places: Tensor) -> np.ndarray:
    from memkit.data import revisit_lags

    return np.stack([revisit_lags(row.numpy()) for row in places])


def evaluate_long(
    net: MALTNetwork,
    *,
    name: str,
    trained_length: int,
    world: dict[str, Any],
    multiple: int = 8,
    families: Sequence[str] = ("pingpong", "pauses", "fast", "dwell"),
    seeds: Sequence[int] = (100_000, 100_001),
    steps: int = 8,
    references: Sequence[str] = ("none", "grey", "full"),
    variants: dict[str, Any] | None = None,
    sample_seed: int = 0,
) -> dict[str, LongResult]:
    """Score ``net`` and the references on sweep clips ``multiple x`` the trained length long.

    Args:
        net: a network trained on the revisit world's sweep families (eval mode), one frame a segment.
        name: label of ``net``'s own result.
        trained_length: ``L`` (:func:`trained_length` of its training config).
        world: the sweep world's options it trained with (``TrainConfig.data.kwargs``).
        multiple: generate ``multiple * L`` frames after the sweep.
        families: path families of the clips (by default the evaluation-only ones).
        seeds: clip seeds per family (held out: training draws hashed seeds).
        steps: Euler steps per segment.
        references: any of ``"none"``, ``"grey"``, ``"full"`` (``"full"`` is skipped for a
            memory that does not store frames).
        variants: ``{label: memory spec}``: more memories to swap into the same weights and
            score (e.g. ``{"fifo-3": {"name": "fifo", "kwargs": {"frames": 3}}}``). A memory with
            parameters keeps its fresh initialisation, seeded from its label (the same in every run).
        sample_seed: noise seed of the sampler.

    Returns:
        ``{name: LongResult, reference: LongResult, ...}``.
    """
    cfg = net.config
    if cfg.frames_per_segment != 1:
        raise ValueError(f"evaluate_long scores one-frame segments, the net has {cfg.frames_per_segment}")
    n = multiple * trained_length
    places = int(world.get("places", 8))
    data = long_clips(world, frames=places + n, families=families, seeds=seeds, frame_size=cfg.height)
    video, actions = data["video"], data["actions"]
    context, truth = video[:, :places], video[:, places:]
    truth_places = data["places"][:, places:]
    lags = _lags(data["places"])[:, places:]
    device = net.spatial.device

    def run(model: MALTNetwork, label: str) -> LongResult:
        out = generate(
            model,
            n,
            context=context.to(device),
            actions=actions.to(device) if cfg.action_dim else None,
            sampler=EulerSampler(steps=steps),
            seed=sample_seed,
            progress=False,
        )
        scores = score_frames(out.video.cpu(), truth, context, truth_places)
        return LongResult(
            label,
            trained_length,
            scores["psnr"],
            scores["ssim"],
            scores["recall"],
            lags,
            list(data["families"]),
            list(data["sources"]),
            state_bytes=out.state_bytes[-1] if out.state_bytes else 0,
            ms_per_frame=sum(out.ms_per_segment) / max(1, len(out.ms_per_segment)),
            video=out.video[0].cpu(),
            truth=video[0],
        )

    def swapped(spec: Any, label: str) -> MALTNetwork:
        # a swapped-in memory with parameters keeps its fresh initialisation: drawn from a seed of its label,
        # not from the global generator, so a row does not depend on what ran before it in the process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(label.encode()))
            return net.with_memory(spec).eval()

    results = {name: run(net, name)}
    if "none" in references:
        results["none"] = run(swapped("none", "none"), "none")
    if "full" in references and cfg.memory.name in FRAME_MEMORIES:
        spec = {"name": "fifo", "kwargs": {"frames": places + n}, "layers": cfg.memory.layers}
        results["full"] = run(swapped(spec, "full"), "full")
    for label, spec in (variants or {}).items():
        results[label] = run(swapped(spec, label), label)
    if "grey" in references:
        grey = context.float().mean(dim=(1, 3, 4), keepdim=True).expand_as(truth)
        scores = score_frames(grey, truth, context, truth_places)
        results["grey"] = LongResult(
            "grey",
            trained_length,
            scores["psnr"],
            scores["ssim"],
            None,
            lags,
            list(data["families"]),
            list(data["sources"]),
        )
    return results
