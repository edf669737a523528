"""Rotary embedding for attached layers, driven by the host model's own rotary table.

Video transformers rotate queries and keys with a 3-D rotary embedding (frame, height,
width) that they compute per call, for the tokens of that call only. A memory key was
recorded at another frame, so memkit must rotate it at a place the host's table does not
hold. :class:`TableRotary` does it without re-implementing the host's rotary:

* the segment's own queries and keys are rotated with the host's table as it is, so
  with :class:`memkit.NoMemory` the layer computes what the host computes;
* a memory key recorded at frame ``p``, at place ``j`` of its frame, gets the table's
  rotation for place ``j`` of the segment's *first* frame, turned further by
  ``(p - origin) * time_freqs`` (``origin``: the segment's first frame position). Rotary
  channel pairs rotate by angles that add up over the axes (frame, height, width), so
  this is exactly the rotation the host would give that token at that frame.

Two frame origins (``frame_origin=``):

* **chunk-relative** (``"chunk"``, the default): the segment's first frame is frame 0,
  as the host's own table has it (every model here builds its table from frame 0 of
  each call: Wan, SkyReels-V2, HunyuanVideo, Mochi; CogVideoX's pipeline does the same);
  memory frames sit at negative distances. The segment is rotated exactly as stock, and
  a stream never leaves the positions the model was trained on. Between two rotated
  tokens only the frame *difference* counts, so this is exact for video-video attention
  (Wan, SkyReels-V2: the prompt enters by cross-attention).
* **stream-absolute** (``"stream"``): every frame at its position in the stream. Joint
  text-video attention scores an *unrotated* prompt key against a rotated video query,
  which depends on the query's absolute frame; so "chunk B reading chunk A from memory"
  equals the stock model on the clip [A, B] only with stream-absolute frames (the
  tests check it). Positions then grow past what the model saw in training.

Each memory slot's place in its frame comes from ``Context.places`` when the memory gives
it (RecurrentMemory's learned slots have none, ``-1``: they are turned along time only),
else it is the slot's index modulo ``tokens_per_frame`` (memories that store whole frames:
FIFO, SinkWindow, SparseKV, PromptBank; ``Context.concat`` keeps each part's own count).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from memkit.errors import AttachError, ShapeError

__all__ = ["TableRotary", "axis_frequencies", "rotate_pairs"]


def axis_frequencies(dims: Sequence[int], theta: float, axis: int = 0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Angular frequency of each channel pair for one axis of a ``[frame | height | width]`` rotary.

    The layout of Wan, SkyReels-V2, CogVideoX and HunyuanVideo: each axis owns a block of
    ``dims[i]`` channels, pair ``k`` of a block turning by ``theta ** (-2k / dims[i])``
    per position. Pairs of the other axes get 0.

    Args:
        dims: channels per axis, e.g. HunyuanVideo's ``rope_axes_dim`` ``(16, 56, 56)``.
        theta: the rotary base.
        axis: which axis (0: frames).
        dtype: the dtype the host computes its frequencies in (diffusers: float32;
            Wan: float64).

    Returns:
        ``(sum(dims) / 2,)`` float tensor.

    Example:
        >>> from memkit.integrations.rotary import axis_frequencies
        >>> axis_frequencies((4, 2, 2), theta=100.0).tolist()
        [1.0, 0.10000000149011612, 0.0, 0.0]
    """
    parts = []
    for i, dim in enumerate(dims):
        if dim % 2:
            raise ShapeError(f"axis_frequencies: every axis needs an even number of channels, got {tuple(dims)}")
        if i == axis:
            parts.append(1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim)))
        else:
            parts.append(torch.zeros(dim // 2, dtype=dtype))
    return torch.cat(parts)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` by per-pair ``cos, sin`` (float32 inside).

    The arithmetic of diffusers' ``apply_rotary_emb`` (``use_real_unbind_dim=-1``) and of
    Mochi's and Wan's processors, so a segment rotated here matches them to the bit.

    Args:
        x: ``(..., d)``.
        cos, sin: ``(..., d / 2)``, broadcastable against ``x``'s pairs.

    Example:
        >>> import torch
        >>> from memkit.integrations.rotary import rotate_pairs
        >>> rotate_pairs(torch.tensor([1.0, 0.0]), torch.tensor([0.0]), torch.tensor([1.0])).tolist()
        [0.0, 1.0]
    """
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class TableRotary:
    """``rotate(x, positions)`` for one call, from the host's rotary table of that call.

    Args:
        cos, sin: the host's table for the call's video tokens, one value per channel
            *pair*: ``(n p)`` shared by the heads, or ``(h n p)`` per head (Mochi). A table
            that repeats each value for both channels of a pair (diffusers' "real"
            tables, ``(n d)``) is passed as ``cos[..., 0::2]``.
        time_freqs: ``(p)`` or ``(h p)`` angular frequency of each pair along frames
            (see :func:`axis_frequencies`; Mochi: its learned ``pos_frequencies[0]``).
        tokens_per_frame: ``t``; the table's first ``t`` rows are the first frame.
        origin: ``(b)`` frame position of the table's first frame (the segment's first
            frame, ``attend.layout(q)[0][:, 0]``).
        frame_origin: ``"chunk"`` (default): the segment is rotated with the host's table
            as it is, its first frame as frame 0, memory frames at negative distances;
            ``"stream"``: every frame at its stream position (the host's table turned by
            ``origin`` frames). See the module docstring for when each is exact.

    Example:
        >>> import torch
        >>> from memkit.integrations.rotary import TableRotary, axis_frequencies
        >>> freqs = axis_frequencies((4, 2, 2), theta=100.0)                # 4 pairs: 2 turn with frames
        >>> frames = torch.arange(2).repeat_interleave(3)                    # 2 frames of 3 tokens
        >>> angles = frames[:, None] * freqs + torch.arange(6)[:, None] % 3  # + a stand-in spatial part
        >>> rot = TableRotary(angles.cos(), angles.sin(), freqs, tokens_per_frame=3, origin=torch.tensor([10]))
        >>> x = torch.randn(1, 2, 3, 8)                                      # one frame's keys
        >>> seg = rot(torch.cat([x, x], 2), torch.tensor([[10, 10, 10, 11, 11, 11]]))  # the table itself
        >>> mem = rot(x, torch.full((1, 2, 3), 11))                          # as memory slots of frame 11
        >>> torch.allclose(seg[:, :, 3:], mem, atol=1e-6)                    # frame 11 rotates the same either way
        True
    """

    def __init__(
        self,
        cos: Tensor,
        sin: Tensor,
        time_freqs: Tensor,
        tokens_per_frame: int,
        origin: Tensor,
        *,
        frame_origin: str = "chunk",
    ) -> None:
        if cos.shape != sin.shape or cos.ndim not in (2, 3):
            raise ShapeError(
                f"TableRotary: cos and sin should be (n p) or (h n p), got {tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        p = cos.shape[-1]
        if time_freqs.shape[-1] != p or time_freqs.ndim not in (1, 2):
            raise ShapeError(
                f"TableRotary: time_freqs should be (p) or (h p) with p={p}, got {tuple(time_freqs.shape)}"
            )
        n, t = cos.shape[-2], tokens_per_frame
        if n < t:
            raise ShapeError(f"TableRotary: the table has {n} rows, fewer than one frame of {t} tokens")
        # (1|h, n, p): heads on dim 1 of (b h n d)
        self.cos = cos.float() if cos.ndim == 3 else cos.float()[None]
        self.sin = sin.float() if sin.ndim == 3 else sin.float()[None]
        self.time_freqs = time_freqs.double() if time_freqs.ndim == 2 else time_freqs.double()[None]
        if frame_origin not in ("chunk", "stream"):
            raise AttachError(f"TableRotary: frame_origin should be 'chunk' or 'stream', got {frame_origin!r}")
        self.tokens_per_frame, self.origin, self.frame_origin = t, origin, frame_origin

    def _turn(self, cos: Tensor, sin: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """``cos, sin (1|h, m, p)`` turned further by ``frames (b, 1|h, m)`` frames: ``(b h m p)``."""
        delta = frames.double()[..., None] * self.time_freqs.to(frames.device)[:, None]
        dc, ds = delta.cos().float(), delta.sin().float()
        return cos * dc - sin * ds, sin * dc + cos * ds

    #: memkit passes ``places=`` (``Context.places``) for memory keys to a rotary that says so
    takes_places = True

    def __call__(self, x: Tensor, positions: Tensor, places: Tensor | None = None) -> Tensor:
        dev = x.device
        # stream-absolute: the host's table starts at frame 0, the segment sits at `origin`
        shift = self.origin.to(dev) if self.frame_origin == "stream" else torch.zeros_like(self.origin, device=dev)
        if positions.ndim == 2:  # the segment's tokens: the host's own table
            if x.shape[2] != self.cos.shape[1]:
                raise AttachError(
                    f"TableRotary: the host's rotary table covers {self.cos.shape[1]} tokens, the call has {x.shape[2]}"
                )
            if self.frame_origin == "chunk":
                return rotate_pairs(x, self.cos.to(dev), self.sin.to(dev))
            cos, sin = self._turn(self.cos.to(dev), self.sin.to(dev), shift[:, None, None].expand(-1, 1, x.shape[2]))
            return rotate_pairs(x, cos, sin)
        # memory keys (b h m): the table's place in the first frame, turned by the frame distance
        if places is None:  # whole frames, frame-major
            place = torch.arange(x.shape[2], device=dev) % self.tokens_per_frame
            base_cos, base_sin = self.cos[:, place].to(dev), self.sin[:, place].to(dev)  # (1|h, m, p)
        else:
            base_cos, base_sin = self._at_places(places.to(dev))  # (b, h, m, p)
        frames = positions - self.origin.to(dev)[:, None, None] + shift[:, None, None]
        cos, sin = self._turn(base_cos, base_sin, frames)
        return rotate_pairs(x, cos, sin)

    def _at_places(self, places: Tensor) -> tuple[Tensor, Tensor]:
        """The first frame's rotation at each slot's place ``(b h m)``; a slot with no place (-1) gets none."""
        cos, sin = self.cos.to(places.device), self.sin.to(places.device)
        heads = torch.arange(places.shape[1], device=places.device)[:, None] if cos.shape[0] > 1 else 0
        safe = places.clamp(min=0) % self.tokens_per_frame
        base_cos, base_sin = cos[heads, safe], sin[heads, safe]  # (b, h, m, p)
        none = (places < 0)[..., None]
        return torch.where(none, 1.0, base_cos), torch.where(none, 0.0, base_sin)

    def __repr__(self) -> str:
        return f"TableRotary(tokens={self.cos.shape[1]}, tokens_per_frame={self.tokens_per_frame})"
