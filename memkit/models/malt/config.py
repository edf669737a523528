"""``MALTConfig``: every hyperparameter of the reference backbone, JSON round-trippable."""

import dataclasses
import json
from pathlib import Path
from typing import Any

from memkit.errors import ConfigError

__all__ = ["MemorySpec", "MALTConfig", "ConfigError", "MODEL_PRESETS"]


@dataclasses.dataclass
class MemorySpec:
    """Which memory to put at which blocks.

    Attributes:
        name: a name known to :func:`memkit.memories.build_memory` (``"none"``,
            ``"sink_window"``, ``"fifo"``, ``"recurrent"``, ``"sparse_kv"``, ...).
        kwargs: the memory's own options (JSON values).
        layers: indices of the blocks that carry the memory; ``None`` = every block.
            The other blocks get :class:`memkit.NoMemory`.

    Example:
        >>> MemorySpec("fifo", {"frames": 8}, layers=[1]).to_dict()
        {'name': 'fifo', 'kwargs': {'frames': 8}, 'layers': [1]}
    """

    name: str = "none"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kwargs": dict(self.kwargs),
            "layers": None if self.layers is None else list(self.layers),
        }

    @classmethod
    def from_dict(cls, d: "dict[str, Any] | str | MemorySpec") -> "MemorySpec":
        if isinstance(d, MemorySpec):
            return d
        if isinstance(d, str):
            return cls(d)
        unknown = set(d) - {"name", "kwargs", "layers"}
        if unknown:
            raise ConfigError(f"memory: unknown field(s) {sorted(unknown)}; expected name, kwargs, layers")
        layers = d.get("layers")
        return cls(str(d.get("name", "none")), dict(d.get("kwargs") or {}), None if layers is None else list(layers))


@dataclasses.dataclass
class MALTConfig:
    """Hyperparameters of :class:`MALTNetwork` (a latent video diffusion transformer).

    The network denoises one segment of ``frames_per_segment`` latent frames of shape
    ``(channels, height, width)``. Tubelets of ``tubelet x patch_size x patch_size`` become
    tokens, so a segment holds ``frames_per_segment / tubelet`` token-frames of
    ``(height / patch_size) * (width / patch_size)`` tokens each.

    Attributes:
        channels, height, width: latent frame shape (pixels with the identity codec).
        frames_per_segment: ``F``, latent frames generated at once.
        patch_size, tubelet: spatial and temporal patch size.
        dim, depth, heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        qk_norm: RMS-normalise queries/keys (stable over long rollouts).
        rope_theta: rotary base for frame positions.
        action_dim: size of the per-frame action vector (0 = no action conditioning).
        action_frequencies: Fourier features of the actions, ``sin/cos(2^k pi a)`` for
            ``k < action_frequencies`` (NeRF-style; sharpens small differences in pose so
            attention can match a revisited place). 0 = the raw vector only.
        prompt_dim: size of prompt token embeddings (0 = no prompt).
        prompt_mode: ``"adaln"`` (mean-pooled prompt joins the timestep conditioning) or
            ``"cross"`` (cross-attention to the prompt tokens in every block).
        memory_text_keys: what a memory that reads the prompt (a prompt bank) gets as
            ``Query.prompt`` / ``Chunk.prompt``: ``"shared"``, the network's projected prompt
            tokens, the same at every layer; or ``"layer"``, each block's own cross-attention
            text keys (MemFlow scores its bank with these; needs ``prompt_mode="cross"``).
        memory: a :class:`MemorySpec`.
        backend: attention backend for :func:`memkit.attend`.
        memory_max_distance: memory keys older than this many frames before the segment are
            rotated as if exactly that far back (:class:`memkit.MemoryAttention`'s
            ``max_distance``), so query-key distances stay in the range training saw however
            long the video; ``None`` = true positions.
        positions: what the rotary embedding measures: ``"time"`` (the frame index, the
            ``frame_positions`` callers pass) or ``"pose"`` (the camera's horizontal pose,
            the last action channel, times ``pose_position_scale``, rounded: frames taken at one
            place share a rotation, so attention finds a place by where it is, not by when;
            needs pose actions, ``action_dim >= 4``; see :meth:`MALTNetwork.pose_positions`).
        pose_position_scale: rotary units per unit of pose (pose is in frame widths; 16 puts
            one unit on each pixel of a 16-pixel frame).
        prediction: what the output head predicts: ``"velocity"`` (``eps - x_0``) or ``"x0"``
            (the clean segment). Either way :meth:`MALTNetwork.forward` returns the velocity
            (for ``"x0"``: ``(x_t - x0_hat) / max(t, 0.05)``), so the flow-matching loss and
            the sampler are the same; with ``"x0"`` that loss is the clean-sample error
            weighted by ``1 / max(t, 0.05)^2`` (the x-prediction, v-loss pairing of JiT,
            Li & He 2025). Small models learn to copy from memory faster with it.

    Example:
        >>> cfg = MALTConfig.preset("tiny")
        >>> cfg.tokens_per_frame, cfg.token_frames
        (4, 2)
        >>> MALTConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    channels: int = 3
    height: int = 16
    width: int = 16
    frames_per_segment: int = 2
    patch_size: int = 4
    tubelet: int = 1
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_theta: float = 10000.0
    action_dim: int = 0
    action_frequencies: int = 0
    prompt_dim: int = 0
    prompt_mode: str = "adaln"
    memory_text_keys: str = "shared"
    memory: MemorySpec = dataclasses.field(default_factory=MemorySpec)
    backend: str = "auto"
    prediction: str = "velocity"
    memory_max_distance: int | None = None
    positions: str = "time"
    pose_position_scale: float = 16.0

    def __post_init__(self) -> None:
        if isinstance(self.memory, (dict, str)):
            self.memory = MemorySpec.from_dict(self.memory)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for name in (
            "channels",
            "height",
            "width",
            "frames_per_segment",
            "patch_size",
            "tubelet",
            "dim",
            "depth",
            "heads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("action_dim", "action_frequencies", "prompt_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.height % self.patch_size or self.width % self.patch_size:
            raise ConfigError(
                f"patch_size ({self.patch_size}) must divide height ({self.height}) and width ({self.width})"
            )
        if self.frames_per_segment % self.tubelet:
            raise ConfigError(f"tubelet ({self.tubelet}) must divide frames_per_segment ({self.frames_per_segment})")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError(f"dim ({self.dim}) must be divisible by heads ({self.heads}) into an even head_dim")
        if self.prediction not in ("velocity", "x0"):
            raise ConfigError(f"prediction must be 'velocity' or 'x0', got {self.prediction!r}")
        if self.prompt_mode not in ("adaln", "cross"):
            raise ConfigError(f"prompt_mode must be 'adaln' or 'cross', got {self.prompt_mode!r}")
        if self.memory_text_keys not in ("shared", "layer"):
            raise ConfigError(f"memory_text_keys must be 'shared' or 'layer', got {self.memory_text_keys!r}")
        if self.memory_text_keys == "layer" and self.prompt_mode != "cross":
            raise ConfigError(
                "memory_text_keys='layer' takes each block's cross-attention text keys: it needs prompt_mode='cross'"
            )
        if self.positions not in ("time", "pose"):
            raise ConfigError(f"positions must be 'time' or 'pose', got {self.positions!r}")
        if self.positions == "pose" and self.action_dim < 4:
            raise ConfigError(
                f"positions='pose' reads the camera pose from the actions (motion + pose, action_dim >= 4), "
                f"got action_dim={self.action_dim}"
            )
        d = self.memory_max_distance
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise ConfigError(f"memory_max_distance must be a non-negative integer or null, got {d!r}")
        if self.memory.layers is not None:
            bad = [i for i in self.memory.layers if not 0 <= i < self.depth]
            if bad:
                raise ConfigError(f"memory.layers {bad} out of range for depth {self.depth}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def tokens_per_frame(self) -> int:
        """Tokens in one token-frame: ``(height / patch_size) * (width / patch_size)``."""
        return (self.height // self.patch_size) * (self.width // self.patch_size)

    @property
    def layer_geometry(self) -> dict[str, int]:
        """What a memory is built for in every block: ``heads``, ``head_dim``, ``tokens_per_frame``, ``dim``.

        Example:
            >>> MALTConfig.preset("tiny").layer_geometry
            {'heads': 2, 'head_dim': 16, 'tokens_per_frame': 4, 'dim': 32}
        """
        heads, head_dim, tokens_per_frame = self.heads, self.head_dim, self.tokens_per_frame
        return {"heads": heads, "head_dim": head_dim, "tokens_per_frame": tokens_per_frame, "dim": self.dim}

    @property
    def token_frames(self) -> int:
        """Token-frames (frame positions) per segment: ``frames_per_segment / tubelet``."""
        return self.frames_per_segment // self.tubelet

    @property
    def patch_dim(self) -> int:
        return self.channels * self.tubelet * self.patch_size * self.patch_size

    def memory_layers(self) -> list[int]:
        """Indices of the blocks that carry ``memory`` (empty for ``"none"``)."""
        if self.memory.name == "none":
            return []
        return list(range(self.depth)) if self.memory.layers is None else sorted(set(self.memory.layers))

    def replace(self, **changes: Any) -> "MALTConfig":
        """A copy with some fields changed (``memory`` may be a dict or a name)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"] = self.memory.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MALTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown MALTConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MALTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "MALTConfig":
        """A named configuration (see ``MODEL_PRESETS``), with optional changes."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
        return cls.from_dict({**MODEL_PRESETS[name], **changes})


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 8x8 frames, 2 frames per segment, 4 tokens per frame
    "tiny": dict(height=8, width=8, frames_per_segment=2, patch_size=4, dim=32, depth=2, heads=2),
    # the demo world: 16x16 frames, 16 tokens per frame, camera pose as a per-frame action
    "demo": dict(height=16, width=16, frames_per_segment=2, patch_size=4, dim=64, depth=4, heads=4),
}
