"""The frame layout of the segment a host model is about to process (set by ``session.set_segment``)."""

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from memkit.errors import ShapeError

__all__ = ["SegmentLayout", "as_frame_positions", "block_causal_mask"]


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentLayout:
    """The frame layout of the segment the host model is about to process.

    Attributes:
        frame_positions: ``(b f)`` or ``(1 f)`` integer frame index of each frame.
        tokens_per_frame: ``t``; ``None`` infers ``n // f`` at each layer.
        prompt: ``(b p e)`` prompt embedding for prompt-aware memories, or ``None``.
        prompt_mask: ``(b p)`` bool, True for real prompt tokens, or ``None``.

    Example:
        >>> import torch
        >>> from memkit.integrations import SegmentLayout
        >>> seg = SegmentLayout(torch.tensor([[4, 5]]))            # 2 frames, same for every batch item
        >>> fp, t = seg.layout(batch=3, tokens=12, device=torch.device("cpu"))
        >>> fp.shape, t                                       # 12 tokens / 2 frames
        (torch.Size([3, 2]), 6)
    """

    frame_positions: Tensor
    tokens_per_frame: int | None = None
    prompt: Tensor | None = None
    prompt_mask: Tensor | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frame_positions.shape[1])

    def layout(self, batch: int, tokens: int, device: torch.device) -> tuple[Tensor, int]:
        """``frame_positions (b f)`` on ``device`` and ``t`` for a layer that sees ``(b, n)`` tokens."""
        fp = self.frame_positions
        if fp.shape[0] not in (1, batch):
            raise ShapeError(
                f"session.set_segment: dimension b (batch) of frame_positions should be 1 or {batch} "
                f"(the batch the model runs), got {fp.shape[0]}"
            )
        fp = fp.to(device).expand(batch, -1).contiguous()
        f = fp.shape[1]
        t = self.tokens_per_frame
        if t is None:
            if tokens % f:
                raise ShapeError(
                    f"the layer sees {tokens} tokens, which is not a whole number of tokens per frame for the "
                    f"{f} frames given to session.set_segment"
                )
            t = tokens // f
        elif f * t != tokens:
            raise ShapeError(
                f"session.set_segment: {f} frames x {t} tokens per frame = {f * t}, but dimension n (tokens) "
                f"of the layer's queries is {tokens}"
            )
        return fp, t


def as_frame_positions(frame_positions: Tensor | Sequence[int]) -> Tensor:
    if not isinstance(frame_positions, Tensor):
        try:
            values = frame_positions if isinstance(frame_positions, (list, tuple)) else list(frame_positions)
            frame_positions = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ShapeError(
                f"frame_positions: expected integer frame indices, (f) or (b f), got {frame_positions!r:.60} ({err})"
            ) from None
    if frame_positions.is_floating_point() or frame_positions.is_complex() or frame_positions.dtype == torch.bool:
        raise ShapeError(f"frame_positions: expected an integer tensor of frame indices, got {frame_positions.dtype}")
    if frame_positions.ndim == 1:
        frame_positions = frame_positions[None]
    if frame_positions.ndim != 2 or frame_positions.shape[1] == 0:
        raise ShapeError(
            f"frame_positions: expected shape (f) or (b f) with at least one frame, got {tuple(frame_positions.shape)}"
        )
    return frame_positions.long()


def block_causal_mask(frame_positions: Tensor, tokens_per_frame: int, frames_per_block: int) -> Tensor:
    """The frame-level block-causal mask of a segment, from its frame positions: ``(b n n)`` bool.

    Frame ``p`` belongs to block ``p // frames_per_block``; a token may attend to a token
    of its own block or an earlier one (diffusion forcing, as SkyReels-V2 with
    ``num_frame_per_block``). Built from stream positions, so a segment that starts
    mid-block is masked as the whole clip would be. Pass it as ``attend(q, k, v, mask=...)``
    in an adapter whose host builds no mask itself.

    Args:
        frame_positions: ``(b f)`` integer frame positions.
        tokens_per_frame: ``t``; tokens are laid out frame-major (``n = f t``).
        frames_per_block: frames per causal block.

    Returns:
        ``(b n n)``: row = query token, column = key token, True = may be attended.

    Example:
        >>> import torch
        >>> from memkit.integrations.layout import block_causal_mask
        >>> block_causal_mask(torch.tensor([[2, 3, 4, 5]]), 1, 2).int().tolist()
        [[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]]
    """
    if frames_per_block < 1 or tokens_per_frame < 1:
        raise ShapeError(
            f"block_causal_mask: frames_per_block and tokens_per_frame should be >= 1, got {frames_per_block} "
            f"and {tokens_per_frame}"
        )
    block = frame_positions.long().div(frames_per_block, rounding_mode="floor").repeat_interleave(tokens_per_frame, 1)
    return block[:, None, :] <= block[:, :, None]
