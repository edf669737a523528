"""``PromptBankMemory``: a small bank of past frames retrieved by the text prompt (MemFlow NAM)."""

import math
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from memkit.errors import ShapeError
from memkit.memories.frames import (
    check_chunk,
    check_query,
    check_state,
    frames_to_context,
    gather_frames,
    rank_frames,
    split_frames,
    top_k_frames,
)
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import Bool, Float, typechecked

__all__ = ["PromptBankMemory", "PromptBankState"]

PROTOTYPES = ("first", "best")


@memory_state
class PromptBankState(MemoryState):
    """State of :class:`PromptBankMemory`: a pool of ``P = B + 1`` candidate frames.

    The pool is the bank kept after the last write plus the newest prototype; a read
    returns the ``B`` of them most relevant to its prompt.

    Attributes:
        k, v: ``(b h P t d)`` the candidates' keys (before rotary) and values.
        pos: ``(b P)`` frame position of each candidate.
        valid: ``(b P)`` which slots hold a frame.
        stamp: ``(b P)`` the write (1, 2, ...) that inserted each candidate; ties prefer newer.
        writes: ``(b,)`` writes so far.

    Example:
        >>> import memkit
        >>> s = memkit.PromptBankMemory(heads=2, head_dim=8, tokens_per_frame=4, bank_frames=3).init_state(1)
        >>> s.k.shape, s.valid.shape
        (torch.Size([1, 2, 4, 4, 8]), torch.Size([1, 4]))
    """

    #: each field's layout: how a state of another configuration is reported
    layouts: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("k", "v"), "b h P t d"),
        **dict.fromkeys(("pos", "valid", "stamp"), "b P"),
        "writes": "b",
    }

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor
    stamp: Tensor
    writes: Tensor


class PromptBankMemory(nn.Module):
    """A bank of ``B`` past frames chosen by relevance to the text prompt (MemFlow's NAM).

    Each write offers the finished segment's **prototype**: its first frame
    (``prototype="first"``, as MemFlow) or the frame most relevant to the segment's prompt
    (``prototype="best"``). The state is a pool of ``B + 1`` candidates (the bank and the
    newest prototype). ``read`` returns the top-``B`` candidates for ``query.prompt``, so
    after a prompt switch the new prompt drives retrieval from the first denoising step of
    the new segment. ``write`` applies the same selection with ``chunk.prompt`` (the prompt
    the segment was generated with, hence the set its reads returned), drops the remaining
    candidate and inserts the new prototype in its slot. A prototype whose frame position is
    already kept replaces that entry instead, so no frame is ever held twice.

    Relevance of candidate frame ``c`` to prompt tokens ``u_i`` (projected to head space):
    ``a[h,i,c,j] = softmax over all valid (c, j) of u[h,i] . k[h,c,j] / sqrt(d)``, then
    ``score[c] = mean over heads and valid prompt tokens of sum_j a[h,i,c,j]``. Padded
    prompt tokens (``prompt_mask`` False) are excluded, so padding never changes retrieval.
    Without a prompt (or with every prompt token padded) every score is equal and the
    tie-break, recency, keeps the newest ``B`` frames.

    The prompt ``(b p e)`` reaches head space by reshaping to ``(b p h d)`` when
    ``e == heads * head_dim``, else through ``prompt_proj``, a bias-free ``Linear(e, h d)``.
    The top-``B`` choice is discrete, so ``prompt_proj`` receives no gradient from the
    attention output; train it by another loss or leave it fixed.

    Read returns ``B * t`` slots per head (the same frames for every head).

    Cost: ``read`` O(b (p e h d + h p (B+1) t d + (B+1) log(B+1)) + b h B t d);
    ``write`` the same scoring plus O(b h (B+1) t d) for the pure copy
    (``prototype="best"`` adds O(b h p n d) to score the segment's ``n`` tokens).
    State bytes: ``2 b h (B+1) t d * itemsize + 17 b (B+1) + 8 b``.

    Args:
        heads, head_dim: the attention layer's ``h`` and ``d``.
        tokens_per_frame: ``t``, tokens in one frame.
        bank_frames: ``B``, frames a read returns (MemFlow uses 3).
        prompt_dim: ``e`` of the prompt embedding; ``None`` means ``heads * head_dim``.
        prototype: ``"first"`` or ``"best"``, which frame of a finished segment is offered.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PromptBankMemory(heads=2, head_dim=4, tokens_per_frame=2, bank_frames=2)
        >>> state = mem.init_state(1)
        >>> for s in range(3):   # three segments of 2 frames; each offers its first frame
        ...     k, pos = torch.randn(1, 2, 4, 4), torch.tensor([[2 * s, 2 * s + 1]])
        ...     state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 4, 8), pos, 2))
        >>> sorted(state.pos[0].tolist())
        [0, 2, 4]
        >>> q = memkit.Query(torch.randn(1, 2, 4, 4), torch.tensor([[6, 7]]), 2, prompt=torch.randn(1, 5, 8))
        >>> mem.read(state, q).k.shape   # the 2 candidates most relevant to the prompt
        torch.Size([1, 2, 4, 4])
    """

    def __init__(
        self,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        bank_frames: int = 3,
        prompt_dim: int | None = None,
        prototype: str = "first",
    ) -> None:
        super().__init__()
        if min(heads, head_dim, tokens_per_frame, bank_frames) < 1:
            raise ValueError(
                f"PromptBankMemory: heads, head_dim, tokens_per_frame and bank_frames must be positive, "
                f"got {heads}, {head_dim}, {tokens_per_frame}, {bank_frames}"
            )
        if prototype not in PROTOTYPES:
            raise ValueError(f"PromptBankMemory: prototype must be one of {PROTOTYPES}, got {prototype!r}")
        if prompt_dim is not None and prompt_dim < 1:
            raise ValueError(f"PromptBankMemory: prompt_dim must be positive, got {prompt_dim}")
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.bank_frames, self.prototype = bank_frames, prototype
        inner = heads * head_dim
        self.prompt_dim = inner if prompt_dim is None else prompt_dim
        self.prompt_proj: nn.Linear | None = (
            nn.Linear(self.prompt_dim, inner, bias=False) if self.prompt_dim != inner else None
        )

    @property
    def _name(self) -> str:
        return type(self).__name__

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PromptBankState:
        """The empty pool of ``B + 1`` invalid candidates."""
        batch_size = check_init_args(f"{self._name}.init_state", batch_size, device, dtype)
        dtype = dtype or torch.get_default_dtype()
        b, h, p, t, d = batch_size, self.heads, self.bank_frames + 1, self.tokens_per_frame, self.head_dim
        return PromptBankState(
            k=torch.zeros((b, h, p, t, d), device=device, dtype=dtype),
            v=torch.zeros((b, h, p, t, d), device=device, dtype=dtype),
            pos=torch.zeros((b, p), device=device, dtype=torch.long),
            valid=torch.zeros((b, p), device=device, dtype=torch.bool),
            stamp=torch.zeros((b, p), device=device, dtype=torch.long),
            writes=torch.zeros((b,), device=device, dtype=torch.long),
        )

    def _check_prompt(self, where: str, prompt: Tensor | None) -> None:
        if prompt is not None and prompt.shape[2] != self.prompt_dim:
            hint = "heads*head_dim" if self.prompt_proj is None else "prompt_dim"
            owner = "query" if where == "read" else "chunk"
            raise ShapeError(
                f"{self._name}.{where}: dimension e (prompt dim) of {owner}.prompt should be {self.prompt_dim} "
                f"({hint}; pass prompt_dim= to project another size), got {prompt.shape[2]}"
            )

    @typechecked
    def relevance(
        self,
        k: Float[Tensor, "b h f t d"],
        valid: Bool[Tensor, "b f"],
        prompt: Float[Tensor, "b p e"] | None,
        prompt_mask: Bool[Tensor, "b p"] | None,
    ) -> Float[Tensor, "b f"]:
        """Relevance ``(b F)`` of candidate frames ``k (b h F t d)`` (``valid (b F)``) to a prompt.

        Zero everywhere without a prompt or without any real prompt token (ties: the caller's
        tie-break decides). Invalid frames get no attention and score 0.

        Example:
            >>> import torch, memkit
            >>> mem = memkit.PromptBankMemory(heads=1, head_dim=2, tokens_per_frame=1)
            >>> k = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 1, 2) * 5
            >>> s = mem.relevance(k, torch.tensor([[True, True]]), torch.tensor([[[0.0, 3.0]]]), None)
            >>> s.argmax(1).tolist()
            [1]
        """
        b, _, f, _, d = k.shape
        if prompt is None:
            return torch.zeros((b, f), device=k.device)
        u = prompt if self.prompt_proj is None else self.prompt_proj(prompt.to(self.prompt_proj.weight.dtype))
        u = rearrange(u.float(), "b p (h d) -> b h p d", h=self.heads)
        logits = torch.einsum("bhpd,bhftd->bhpft", u, k.float()) / math.sqrt(d)
        logits = logits.masked_fill(~valid[:, None, None, :, None], float("-inf"))
        attn = logits.flatten(3).softmax(dim=-1).view_as(logits).nan_to_num(0.0)  # all -inf rows -> 0
        per_frame = attn.sum(dim=4)  # (b h p F)
        if prompt_mask is None:
            return per_frame.mean(dim=(1, 2))
        # where, not a product: a padded token holding inf/nan must not leak into the mean
        kept = torch.where(prompt_mask[:, None, :, None], per_frame, torch.zeros_like(per_frame))
        count = prompt_mask.sum(dim=1).clamp(min=1) * self.heads
        return kept.sum(dim=(1, 2)) / count[:, None]

    @typechecked
    def read(self, state: PromptBankState, query: Query) -> Context:
        """The ``B`` candidates most relevant to ``query.prompt``: ``(b h B*t d)``."""
        check_state(f"{self._name}.read", state, PromptBankState)
        check_state_matches(f"{self._name}.read", state, self)
        check_query(self._name, query, state.batch_size, self.heads, self.head_dim, state.k.device)
        self._check_prompt("read", query.prompt)
        scores = self.relevance(state.k, state.valid, query.prompt, query.prompt_mask)
        index, ok = top_k_frames(scores, state.valid, state.stamp, self.bank_frames)  # (b B)
        return frames_to_context(
            gather_frames(state.k, index, 2), gather_frames(state.v, index, 2), state.pos.gather(1, index), ok
        )

    @typechecked
    def write(self, state: PromptBankState, chunk: Chunk) -> PromptBankState:
        """Keep the top-``B`` for ``chunk.prompt``, then insert the segment's prototype."""
        check_state(f"{self._name}.write", state, PromptBankState)
        check_state_matches(f"{self._name}.write", state, self)
        check_chunk(
            self._name, chunk, state.batch_size, self.heads, self.head_dim, state.k.device, self.tokens_per_frame
        )
        self._check_prompt("write", chunk.prompt)
        dtype = state.k.dtype
        slots = torch.arange(self.bank_frames + 1, device=state.k.device)

        scores = self.relevance(state.k, state.valid, chunk.prompt, chunk.prompt_mask)
        freed = rank_frames(scores, state.valid, state.stamp)[:, -1]  # (b,) the one candidate reads left out
        kept = state.valid & (slots != freed[:, None])

        k = split_frames(chunk.k, self.tokens_per_frame)  # (b h f t d)
        v = split_frames(chunk.v, self.tokens_per_frame)
        pos = chunk.frame_positions.long()
        if self.prototype == "first":
            src = torch.zeros_like(pos[:, :1])
        else:
            ok = torch.ones_like(pos, dtype=torch.bool)
            fit = self.relevance(k, ok, chunk.prompt, chunk.prompt_mask)
            src = rank_frames(fit, ok, torch.zeros_like(pos))[:, :1]  # ties: the earliest frame
        proto_k = gather_frames(k, src, 2).to(dtype)  # (b h 1 t d)
        proto_v = gather_frames(v, src, 2).to(dtype)
        proto_pos = pos.gather(1, src)  # (b 1)

        dup = kept & (state.pos == proto_pos)
        target = torch.where(dup.any(dim=1), dup.long().argmax(dim=1), freed)
        put = slots == target[:, None]  # (b P)
        put5 = put[:, None, :, None, None]
        writes = state.writes + 1
        return PromptBankState(
            k=torch.where(put5, proto_k, state.k),
            v=torch.where(put5, proto_v, state.v),
            pos=torch.where(put, proto_pos, state.pos),
            valid=kept | put,
            stamp=torch.where(put, writes[:, None], state.stamp),
            writes=writes,
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, tokens_per_frame={self.tokens_per_frame}, "
            f"bank_frames={self.bank_frames}, prompt_dim={self.prompt_dim}, prototype={self.prototype!r}"
        )


register_memory("prompt_bank", PromptBankMemory)
