"""``TrainConfig``: what ``memkit train`` does, as one JSON-round-trippable record."""

import dataclasses
import json
from pathlib import Path
from typing import Any

from memkit.errors import ConfigError
from memkit.models.malt.config import MALTConfig

__all__ = ["DataSpec", "TrainConfig", "TRAIN_PRESETS"]


@dataclasses.dataclass
class DataSpec:
    """Which synthetic world to train on.

    Attributes:
        world: ``"revisit"`` or ``"scenes"`` (:mod:`memkit.data`).
        kwargs: the world's options besides ``frames_per_segment``, ``segments`` and
            ``frame_size`` (taken from the model), e.g. ``{"speed": 2}``.
        pose_actions: append the camera pose (the running sum of the per-frame motion over
            the whole clip) to each frame's action, so ``action_dim`` is 4 instead of 2. A
            segment-at-a-time model cannot integrate motion over segments it does not see;
            the pose tells it where the camera is, which is what finding a revisited place needs.
        seed: seed of the training clips (rank ``r`` of a distributed run uses other clips).
    """

    world: str = "revisit"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    pose_actions: bool = True
    seed: int = 0

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | DataSpec") -> "DataSpec":
        if isinstance(d, DataSpec):
            return d
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"data: unknown field(s) {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**d)


@dataclasses.dataclass
class TrainConfig:
    """Training hyperparameters of a MALT model (per process batch; see docs/guides/training.md).

    Attributes:
        model: the :class:`MALTConfig`.
        data: the :class:`DataSpec`.
        steps: optimizer steps in total (resuming continues up to this number).
        batch_size: clips per process per step.
        segments: ``S``, segments unrolled per clip (the last curriculum stage's value).
        curriculum: ``[[start_step, S], ...]``: from ``start_step`` on, unroll ``S`` segments
            (Recurrent Memory Transformer style: short unrolls first). Empty = always ``segments``.
        lr, weight_decay, betas, warmup_steps: AdamW and a linear warmup, then cosine decay to 10%.
        grad_clip: max global gradient norm.
        ema_decay: decay of the exponential moving average of the weights (what is saved
            as ``model.safetensors`` and generates).
        truncate_segments: ``K``: truncated backprop through the memory states; every ``K``-th
            write starts from detached states, so a loss's gradient reaches back at most ``K``
            writes and always the last one (``1``: MALT-style stop-gradient across segments);
            ``None`` = through the whole unroll.
            :class:`memkit.RecurrentMemory` has its own sliding ``truncation`` option.
        write_noise: noise augmentation: the clean pass of training runs at a noise level
            drawn uniformly from ``[0, write_noise]`` (generation writes at ``t = 0``).
        prompt_dropout: probability of dropping a clip's prompt (classifier-free guidance).
        time_sampling: ``"logit_normal"`` or ``"uniform"`` noise levels.
        seed: initialisation and noise seed.
        log_every: steps between progress-bar updates (every step goes to the JSONL log).
        checkpoint_every: steps between checkpoints (and one at the end).
        init_from: start from another checkpoint's weights: a folder with ``config.json`` and
            ``model.safetensors``, or a bundled one by name (``"demo-sparse_kv"``). Every
            parameter whose name and shape match is copied (its EMA weights); the others (a new
            memory's) keep their fresh initialisation. Only at step 0: a resumed run ignores it.
            ``None`` = train from scratch.
        retrieval_weight: weight of the auxiliary retrieval loss that trains a
            :class:`memkit.PromptBankMemory`'s relevance (:mod:`memkit.train.retrieval`: a
            segment's prompt should score the frames written under the same prompt above the
            others). ``0`` (default): none, the flow-matching loss alone.
        retrieval_detach_keys: the retrieval loss trains only the prompt projection (written
            keys detached); ``False`` lets it also shape the keys, which must carry the prompt
            they were written under when a clip's prompts and pictures are drawn afresh.

    Example:
        >>> cfg = TrainConfig.preset("tiny")
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> cfg.segments_at(0)
        2
    """

    model: MALTConfig = dataclasses.field(default_factory=MALTConfig)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    steps: int = 1000
    batch_size: int = 8
    segments: int = 4
    curriculum: list[list[int]] = dataclasses.field(default_factory=list)
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    truncate_segments: int | None = None
    write_noise: float = 0.1
    prompt_dropout: float = 0.1
    time_sampling: str = "logit_normal"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    init_from: str | None = None
    retrieval_weight: float = 0.0
    retrieval_detach_keys: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = MALTConfig.from_dict(self.model)
        if isinstance(self.data, dict):
            self.data = DataSpec.from_dict(self.data)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.curriculum = [[int(a), int(b)] for a, b in self.curriculum]
        for name in ("steps", "batch_size", "segments", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if any(s < 1 for _, s in self.curriculum):
            raise ConfigError(f"curriculum: every stage needs at least 1 segment, got {self.curriculum}")
        if self.truncate_segments is not None and self.truncate_segments < 1:
            raise ConfigError(f"truncate_segments must be None or positive, got {self.truncate_segments}")
        if not 0.0 <= self.write_noise <= 1.0 or not 0.0 <= self.prompt_dropout <= 1.0:
            raise ConfigError("write_noise and prompt_dropout must lie in [0, 1]")
        weight = self.retrieval_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight < float("inf"):
            raise ConfigError(f"retrieval_weight must be a finite number >= 0, got {weight!r}")
        self.retrieval_weight = float(weight)
        want_actions = 4 if self.data.pose_actions else 2
        if self.model.action_dim not in (0, want_actions):
            raise ConfigError(
                f"model.action_dim is {self.model.action_dim} but the data gives {want_actions}-d actions "
                f"(pose_actions={self.data.pose_actions}); use {want_actions} or 0"
            )

    def segments_at(self, step: int) -> int:
        """``S`` at ``step`` according to the curriculum."""
        s = self.segments
        if self.curriculum:
            s = self.curriculum[0][1]
            for start, stage in sorted(self.curriculum):
                if step >= start:
                    s = stage
        return s

    def max_segments(self) -> int:
        return max([self.segments, *(s for _, s in self.curriculum)])

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "TrainConfig":
        """A named configuration from ``TRAIN_PRESETS`` (``tiny``, ``demo-sparse_kv``, ...)."""
        if name not in TRAIN_PRESETS:
            raise ConfigError(
                f"unknown config {name!r}; expected a JSON file or one of {', '.join(sorted(TRAIN_PRESETS))}"
            )
        return cls.from_dict({**TRAIN_PRESETS[name], **changes})


def _demo(memory: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The demo setting (docs/guides/training.md): 16x16 frames, one frame a segment; each clip
    sweeps once over a canvas of 8 places (8 frames), then walks over it at random for 8 more
    (pauses, reversals, speed changes), on procedural canvases and the training photographs;
    rotary positions measure the camera's place, not time, so no length is longer than another
    to attention."""
    from memkit.data import TRAIN_PHOTOS

    model = dict(
        height=16, width=16, frames_per_segment=1, patch_size=4, dim=64, depth=4, heads=4, mlp_ratio=2.0,
        action_dim=4, action_frequencies=6, memory=memory, prediction="x0", positions="pose",
    )  # fmt: skip
    # half the clips on procedural canvases, half on the training photographs (TEST_PHOTOS stay unseen)
    sources = ["procedural"] * len(TRAIN_PHOTOS) + list(TRAIN_PHOTOS)
    world = {"path": "walk", "places": 8, "speed": 8, "smooth": 1.0, "sources": sources}
    return dict(
        model=model,
        data=dict(world="revisit", kwargs=world, pose_actions=True),
        steps=700,
        batch_size=8,
        segments=16,
        curriculum=[[0, 10], [150, 13], [300, 16]],
        lr=2e-3,
        warmup_steps=30,
        ema_decay=0.99,
        write_noise=0.1,
        log_every=10,
        checkpoint_every=200,
        **extra,
    )


#: the bundled RecurrentMemory's options (docs/memories/recurrent.md, "Slots at the place they saw")
_DEMO_RECURRENT: dict[str, Any] = dict(
    slots=128, slot_positions="written", place_groups=8, place_size=8.0, align_tokens=True, gate_bias=1.0
)

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # tests and smoke runs: 8x8 frames, 2 segments, a FIFO memory, a prompt
    "tiny": dict(
        model=dict(
            height=8,
            width=8,
            frames_per_segment=2,
            patch_size=4,
            dim=32,
            depth=2,
            heads=2,
            action_dim=4,
            memory={"name": "fifo", "kwargs": {"frames": 4}},
        ),
        data=dict(world="revisit", kwargs={}, pose_actions=True),
        steps=20,
        batch_size=2,
        segments=2,
        lr=1e-3,
        warmup_steps=5,
        log_every=1,
        checkpoint_every=1000,
    ),
    "demo-none": _demo({"name": "none"}),
    "demo-sparse_kv": _demo({"name": "sparse_kv", "kwargs": {"capacity": 16, "top_k": 4}}),
    # RecurrentMemory with slots at the place they saw (8 groups of 16 slots, one per place and token),
    # fine-tuned from the bundled SparseKV backbone, which already finds a place by its rotation
    "demo-recurrent": {
        **_demo({"name": "recurrent", "kwargs": _DEMO_RECURRENT}),
        **dict(steps=300, curriculum=[], lr=1e-3, checkpoint_every=100, init_from="demo-sparse_kv"),
    },
    "demo-fifo": _demo({"name": "fifo", "kwargs": {"frames": 3}}),
    # the scenes world (prompt switches, returns to a scene not prompted for a while): 4 scenes a clip,
    # the scene switching at every one-frame segment; a PromptBank of 3 frames (parameter-free, so
    # SinkWindow, SparseKV... swap in), fine-tuned from the bundled SparseKV backbone (only the prompt
    # projection is new) with the retrieval loss; ~19 min on one CPU core (docs/guides/training.md,
    # "The scenes checkpoint")
    "demo-scenes": {
        **_demo({"name": "prompt_bank", "kwargs": {"bank_frames": 3}}),
        **dict(
            # positions by time: every scene is shot from the same camera pose, so positions by pose would
            # give every frame the same position, and a bank keeps one frame per position; memory keys are
            # rotated at the segment's own position (memory_max_distance=0), the relative rotation at which
            # the SparseKV backbone learnt to copy a frame (pose positions: the same place, distance 0)
            model={
                **_demo({"name": "prompt_bank", "kwargs": {"bank_frames": 3}})["model"],
                "prompt_dim": 16,
                "positions": "time",
                "memory_max_distance": 0,
            },
            data=dict(world="scenes", kwargs={"num_scenes": 4}, pose_actions=True),
            steps=700,
            segments=10,
            curriculum=[],
            lr=2e-3,
            checkpoint_every=100,
            init_from="demo-sparse_kv",
            # the bank's top-B choice gives the prompt projection no gradient: the retrieval loss trains it
            # (and lets the written keys carry the prompt they were written under; memkit.train.retrieval)
            retrieval_weight=1.0,
        ),
    },
    # MALT's memory as far as the paper establishes it (docs/memories/recurrent.md): each memory
    # layer attends to the previous clean segment's keys/values, computed by the same network
    # (Transformer-XL recurrence), trained with stop-gradient across segments
    "demo-malt": _demo({"name": "fifo", "kwargs": {"frames": 1}}, truncate_segments=1),
}
