"""``PromptBankMemory``: a small bank of past frames retrieved by the text prompt (MemFlow NAM)."""

import math
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from memkit.checks import check_chunk, check_layout, check_query, check_state
from memkit.errors import ShapeError
from memkit.memo import TensorMemo, memo_active
from memkit.memories.frames import FrameBuffer, rank_frames, top_k_frames
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import Bool, Float, typechecked

__all__ = ["PromptBankMemory", "PromptBankState"]

PROTOTYPES = ("first", "best")
#: how the bank is updated: memkit's (top ``B`` of ``B + 1``) or MemFlow's release (top ``B - 1`` + prototype)
RULES = ("memkit", "memflow")
#: how a frame is scored against the prompt: memkit's softmax shares, or the release's mean raw logit
SCORES = ("softmax", "release")


# a memory's last relevance under no_grad (its plan's and its write's scoring of the same pool with the same prompt)
_RELEVANCE = TensorMemo()


@memory_state
class PromptBankState(MemoryState):
    """State of :class:`PromptBankMemory`: a pool of ``P = B + 1`` candidate frames.

    The pool is the bank kept after the last write plus the newest prototype; a read
    returns the ``B`` of them most relevant to its prompt. With ``rule="memflow"`` slots
    ``0 .. B-1`` are the bank the last segment read and slot ``B`` is the pending prototype.

    Attributes:
        pool: a :class:`memkit.memories.frames.FrameBuffer` of ``P`` slots: the candidates' keys
            (before rotary), values, frame positions and which slots hold a frame.
        stamp: ``(b P)`` the write (1, 2, ...) that inserted each candidate; ties prefer newer.
        writes: ``(b,)`` writes so far.

    Files saved before the buffer (format version 1) named the pool's tensors ``k, v, pos, valid``;
    :func:`memkit.load_states` maps the old names.

    Example:
        >>> import memkit
        >>> s = memkit.PromptBankMemory(heads=2, head_dim=8, tokens_per_frame=4, bank_frames=3).init_state(1)
        >>> s.pool.k.shape, s.pool.valid.shape
        (torch.Size([1, 2, 4, 4, 8]), torch.Size([1, 4]))
    """

    #: each field's layout (the pool's: the letter of its slots): how a state of another configuration is reported
    layouts: ClassVar[dict[str, str]] = {"pool": "P", "stamp": "b P", "writes": "b"}

    pool: FrameBuffer
    stamp: Tensor
    writes: Tensor


class PromptBankMemory(nn.Module):
    """A bank of ``B`` past frames chosen by relevance to the text prompt (MemFlow's NAM).

    Each recorded write offers the finished segment's **prototype**: its first frame
    (``prototype="first"``, as MemFlow) or the frame most relevant to the segment's prompt
    (``prototype="best"``); with ``record_interval=R`` only every ``R``-th write records one
    (writes ``0, R, 2R, ...``; MemFlow's release uses ``R = 3``). Two update rules:

    * ``rule="memkit"`` (default): the state is a pool of ``B + 1`` candidates (the bank and
      the newest prototype). ``read`` returns the top-``B`` candidates for ``query.prompt``;
      ``write`` drops the candidate that prompt's reads left out (scored with
      ``chunk.next_prompt`` when the host gives it, else ``chunk.prompt``) and inserts the new
      prototype in its slot. A prototype whose frame position is already kept replaces that
      entry, so no frame is held twice.
    * ``rule="memflow"`` (MemFlow's release, ``compress_kv_bank``): the state is the bank of
      ``B`` frames the last segment read plus the pending prototype. While fewer than ``B + 1``
      prototypes were recorded, the pending one fills the next slot; after that every read
      keeps the top ``B - 1`` bank frames for ``query.prompt`` and appends the pending
      prototype, re-appending it until a newer one is recorded (so, as released, a prototype
      can be held twice). ``write`` commits the set its reads returned (scored with
      ``chunk.prompt``, the prompt those reads used) and records the new prototype.

    In both rules the frame that makes room for segment ``s``'s prototype is chosen with the
    prompt of the segment that reads next. A frame that segment ``s``'s own reads left out is
    dropped at ``write`` unless the host passes ``chunk.next_prompt`` (memkit rule): that is
    how a frame relevant only to the prompt after a switch survives the switch.

    Relevance of candidate frame ``c`` to prompt tokens ``u_i`` (projected to head space),
    ``l[h,i,c,j] = u[h,i] . k[h,c,j] / sqrt(d)``:

    * ``score="softmax"`` (memkit; the paper's softmax, summed rather than averaged over a
      frame's ``t`` tokens, which ranks the same): ``a = softmax over all valid (c, j) of l``,
      ``score[c] = mean over heads and valid prompt tokens of sum_j a[h,i,c,j]``. Padded
      prompt tokens (``prompt_mask`` False) are excluded.
    * ``score="release"`` (MemFlow's code): ``score[c] = mean over heads, every prompt token
      (padding included, ``prompt_mask`` ignored) and the frame's tokens of l[h,i,c,j]``,
      raw logits, no softmax.

    Without a prompt (or with every prompt token padded) every score is equal and the
    tie-break decides: recency (memkit rule: the newest ``B`` frames) or slot order (memflow).

    The prompt ``(b p e)`` reaches head space by reshaping to ``(b p h d)`` when
    ``e == heads * head_dim``, else through ``prompt_proj``, a bias-free ``Linear(e, h d)``.
    A host that passes each layer's own cross-attention text keys ``(b p (h d))`` as the
    prompt scores with them directly, as MemFlow does. The top-``B`` choice is discrete, so
    ``prompt_proj`` receives no gradient from the attention output.

    Read returns ``B * t`` slots per head (the same frames for every head).

    **Relevance cut-off** (``min_relevance``, memkit rule only): a read masks out (``Context.mask``
    False) every returned frame whose score is below ``min_relevance``, so a read can hold fewer
    than ``B`` frames when few are relevant to its prompt, instead of filling the bank with frames
    of other scenes. With ``score="softmax"`` the scores of the ``B + 1`` candidates sum to 1, so
    ``min_relevance = 1 / (B + 1)`` keeps the frames that draw more than an equal share. A read
    without a prompt (or with every prompt token padded, softmax score) has no relevance to judge
    and masks nothing. Writes are unchanged (the cut-off only decides what a read returns).
    ``None`` (default) returns all ``B``, as MemFlow.

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
        rule: ``"memkit"`` or ``"memflow"``, the update rule above.
        record_interval: ``R``, record a prototype every ``R`` writes (MemFlow: 3).
        score: ``"softmax"`` or ``"release"``, the relevance formula above.
        min_relevance: the relevance cut-off above, or ``None`` (return all ``B``).

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PromptBankMemory(heads=2, head_dim=4, tokens_per_frame=2, bank_frames=2)
        >>> state = mem.init_state(1)
        >>> for s in range(3):   # three segments of 2 frames; each offers its first frame
        ...     k, pos = torch.randn(1, 2, 4, 4), torch.tensor([[2 * s, 2 * s + 1]])
        ...     state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 4, 8), pos, 2))
        >>> sorted(state.pool.pos[0].tolist())
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
        rule: str = "memkit",
        record_interval: int = 1,
        score: str = "softmax",
        min_relevance: float | None = None,
    ) -> None:
        super().__init__()
        if min(heads, head_dim, tokens_per_frame, bank_frames) < 1:
            raise ValueError(
                f"PromptBankMemory: heads, head_dim, tokens_per_frame and bank_frames must be positive, "
                f"got {heads}, {head_dim}, {tokens_per_frame}, {bank_frames}"
            )
        if prototype not in PROTOTYPES:
            raise ValueError(f"PromptBankMemory: prototype must be one of {PROTOTYPES}, got {prototype!r}")
        if rule not in RULES:
            raise ValueError(f"PromptBankMemory: rule must be one of {RULES}, got {rule!r}")
        if score not in SCORES:
            raise ValueError(f"PromptBankMemory: score must be one of {SCORES}, got {score!r}")
        if isinstance(record_interval, bool) or not isinstance(record_interval, int) or record_interval < 1:
            raise ValueError(f"PromptBankMemory: record_interval must be a positive int, got {record_interval!r}")
        if min_relevance is not None:
            if isinstance(min_relevance, bool) or not isinstance(min_relevance, int | float):
                raise ValueError(f"PromptBankMemory: min_relevance must be a number or None, got {min_relevance!r}")
            if not math.isfinite(min_relevance):
                raise ValueError(f"PromptBankMemory: min_relevance must be finite, got {min_relevance!r}")
            if rule != "memkit":
                raise ValueError(
                    "PromptBankMemory: min_relevance needs rule='memkit' (MemFlow's release returns its whole bank)"
                )
        if prompt_dim is not None and prompt_dim < 1:
            raise ValueError(f"PromptBankMemory: prompt_dim must be positive, got {prompt_dim}")
        self.heads, self.head_dim, self.tokens_per_frame = heads, head_dim, tokens_per_frame
        self.bank_frames, self.prototype = bank_frames, prototype
        self.rule, self.record_interval, self.score = rule, record_interval, score
        self.min_relevance = None if min_relevance is None else float(min_relevance)
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
            pool=FrameBuffer.empty(b, h, p, t, d, device=device, dtype=dtype),
            stamp=torch.zeros((b, p), device=device, dtype=torch.long),
            writes=torch.zeros((b,), device=device, dtype=torch.long),
        )

    def _check_prompt(self, where: str, prompt: Tensor | None, owner: str | None = None) -> None:
        if prompt is not None and prompt.shape[2] != self.prompt_dim:
            hint = "heads*head_dim" if self.prompt_proj is None else "prompt_dim"
            owner = owner or ("query.prompt" if where == "read" else "chunk.prompt")
            raise ShapeError(
                f"{self._name}.{where}: dimension e (prompt dim) of {owner} should be {self.prompt_dim} "
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
        tie-break decides). With ``score="softmax"`` invalid frames get no attention and score 0;
        with ``score="release"`` their score is meaningless and callers never select them.

        Example:
            >>> import torch, memkit
            >>> mem = memkit.PromptBankMemory(heads=1, head_dim=2, tokens_per_frame=1)
            >>> k = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 1, 2) * 5
            >>> s = mem.relevance(k, torch.tensor([[True, True]]), torch.tensor([[[0.0, 3.0]]]), None)
            >>> s.argmax(1).tolist()
            [1]
        """
        b, f = k.shape[0], k.shape[2]
        if prompt is None:
            return torch.zeros((b, f), device=k.device)
        # a segment scores the same pool with the same prompt twice (its plan's choice, then its write's
        # freed slot): the second time is a lookup. Inference only (no graph kept, weights fixed).
        inputs = (k, valid, prompt, prompt_mask, None if self.prompt_proj is None else self.prompt_proj.weight)
        active = memo_active(grad_ok=False)
        if active:
            hit: Tensor | None = _RELEVANCE.get(self, inputs)
            if hit is not None:
                return hit
        scores = self._relevance(k, valid, prompt, prompt_mask)
        return _RELEVANCE.put(self, inputs, None, scores) if active else scores

    def _relevance(self, k: Tensor, valid: Tensor, prompt: Tensor, prompt_mask: Tensor | None) -> Tensor:
        d = k.shape[-1]
        u = prompt if self.prompt_proj is None else self.prompt_proj(prompt.to(self.prompt_proj.weight.dtype))
        u = rearrange(u.float(), "b p (h d) -> b h p d", h=self.heads)
        if self.score == "release":
            # the mean of raw logits over prompt tokens (padding included), heads and the frame's
            # tokens is linear, so it equals the logit of the mean prompt token and mean key
            return torch.einsum("bhd,bhfd->bf", u.mean(dim=2), k.float().mean(dim=3)) / (math.sqrt(d) * self.heads)
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

    def _memflow_bank(
        self, state: PromptBankState, prompt: Tensor | None, prompt_mask: Tensor | None
    ) -> tuple[FrameBuffer, Tensor]:
        """The release's bank for a segment with ``prompt``: ``B`` slots and their stamps ``(b B)``."""
        bb = self.bank_frames
        bank, pend = state.pool.slots(0, bb), state.pool.slots(bb)
        bank_stamp, pend_stamp = state.stamp[:, :bb], state.stamp[:, bb:]
        recorded = torch.div(state.writes + self.record_interval - 1, self.record_interval, rounding_mode="floor")
        slots = torch.arange(bb, device=state.stamp.device)
        # filling: the pending prototype (re)written into slot recorded - 1, as the release's index arithmetic does
        put = (slots == (recorded - 1)[:, None]) & pend.valid
        fill, fill_stamp = pend.where(put, bank), torch.where(put, pend_stamp, bank_stamp)
        if bb > 1:
            scores = self.relevance(bank.k, bank.valid, prompt, prompt_mask)
            idx, _ = top_k_frames(scores, bank.valid, torch.zeros_like(bank.pos), bb - 1)  # best first, as torch.topk
            full, full_stamp = bank.gather(idx).cat(pend), torch.cat([bank_stamp.gather(1, idx), pend_stamp], dim=1)
        else:
            full, full_stamp = pend, pend_stamp
        is_full = (recorded > bb)[:, None]
        return full.where(is_full, fill), torch.where(is_full, full_stamp, fill_stamp)

    def select(self, state: PromptBankState, prompt: Tensor | None, prompt_mask: Tensor | None = None) -> FrameBuffer:
        """The ``B`` frames a read with ``prompt`` returns, as a :class:`memkit.memories.frames.FrameBuffer`.

        Example:
            >>> import torch, memkit
            >>> mem = memkit.PromptBankMemory(heads=2, head_dim=4, tokens_per_frame=2, bank_frames=2)
            >>> chosen = mem.select(mem.init_state(1), None)
            >>> chosen.k.shape, chosen.valid.tolist()
            (torch.Size([1, 2, 2, 2, 4]), [[False, False]])
        """
        if self.rule == "memflow":
            return self._memflow_bank(state, prompt, prompt_mask)[0]
        scores = self.relevance(state.pool.k, state.pool.valid, prompt, prompt_mask)
        index, _ = top_k_frames(scores, state.pool.valid, state.stamp, self.bank_frames)  # (b B)
        chosen = state.pool.gather(index)
        if self.min_relevance is not None and prompt is not None:
            relevant = scores.gather(1, index) >= self.min_relevance
            if prompt_mask is not None and self.score == "softmax":
                # every token padded: all scores are 0 and say nothing, so nothing is cut
                relevant = relevant | ~prompt_mask.any(dim=1, keepdim=True)
            chosen = chosen.replace(valid=chosen.valid & relevant)
        return chosen

    @typechecked
    def read(self, state: PromptBankState, query: Query) -> Context:
        """The ``B`` frames chosen for ``query.prompt``: ``(b h B*t d)``."""
        check_state(f"{self._name}.read", state, PromptBankState)
        check_state_matches(f"{self._name}.read", state, self)
        check_query(self._name, query, state.batch_size, self.heads, self.head_dim, state.pool.k.device)
        self._check_prompt("read", query.prompt)
        return self.select(state, query.prompt, query.prompt_mask).to_context()

    @typechecked
    def plan(self, state: PromptBankState, layout: ReadLayout) -> ReadPlan:
        """The prompt's choice of frames, made once per segment (the prompt is fixed within one)."""
        check_state(f"{self._name}.plan", state, PromptBankState)
        check_state_matches(f"{self._name}.plan", state, self)
        check_layout(self._name, layout, state.batch_size, state.pool.k.device)
        self._check_prompt("plan", layout.prompt, "layout.prompt")
        return ReadPlan(parts=(self.select(state, layout.prompt, layout.prompt_mask).to_context(),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _prototype(self, chunk: Chunk, dtype: torch.dtype) -> FrameBuffer:
        """The finished segment's prototype: one slot."""
        frames = FrameBuffer.from_chunk(chunk, self.tokens_per_frame)
        if self.prototype == "first":
            src = torch.zeros_like(frames.pos[:, :1])
        else:
            fit = self.relevance(frames.k, frames.valid, chunk.prompt, chunk.prompt_mask)
            src = rank_frames(fit, frames.valid, torch.zeros_like(frames.pos))[:, :1]  # ties: the earliest frame
        proto = frames.gather(src)
        return proto.replace(k=proto.k.to(dtype), v=proto.v.to(dtype))

    @typechecked
    def write(self, state: PromptBankState, chunk: Chunk) -> PromptBankState:
        """Commit the set this segment's reads chose, then record the segment's prototype."""
        check_state(f"{self._name}.write", state, PromptBankState)
        check_state_matches(f"{self._name}.write", state, self)
        check_chunk(
            self._name, chunk, state.batch_size, self.heads, self.head_dim, state.pool.k.device, self.tokens_per_frame
        )
        self._check_prompt("write", chunk.prompt)
        self._check_prompt("write", chunk.next_prompt, "chunk.next_prompt")
        proto = self._prototype(chunk, state.pool.k.dtype)
        record = (torch.remainder(state.writes, self.record_interval) == 0)[:, None]  # (b 1)
        writes = state.writes + 1
        if self.rule == "memflow":
            bank, stamp = self._memflow_bank(state, chunk.prompt, chunk.prompt_mask)
            return PromptBankState(
                pool=bank.cat(proto.where(record, state.pool.slots(-1))),
                stamp=torch.cat([stamp, torch.where(record, writes[:, None], state.stamp[:, -1:])], dim=1),
                writes=writes,
            )
        pool = state.pool
        slots = torch.arange(self.bank_frames + 1, device=pool.k.device)
        if chunk.next_prompt is not None:  # the host knows the next prompt: let it decide what goes
            scores = self.relevance(pool.k, pool.valid, chunk.next_prompt, chunk.next_prompt_mask)
        else:
            scores = self.relevance(pool.k, pool.valid, chunk.prompt, chunk.prompt_mask)
        freed = rank_frames(scores, pool.valid, state.stamp)[:, -1]  # (b,) the one candidate reads left out
        kept = pool.valid & ((slots != freed[:, None]) | ~record)

        dup = kept & (pool.pos == proto.pos)
        target = torch.where(dup.any(dim=1), dup.long().argmax(dim=1), freed)
        put = (slots == target[:, None]) & record  # (b P)
        return PromptBankState(
            pool=proto.where(put, pool).replace(valid=kept | put),
            stamp=torch.where(put, writes[:, None], state.stamp),
            writes=writes,
        )

    def extra_repr(self) -> str:
        options = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("rule", self.rule, "memkit"),
                ("record_interval", self.record_interval, 1),
                ("score", self.score, "softmax"),
                ("min_relevance", self.min_relevance, None),
            )
            if value != default
        )
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, tokens_per_frame={self.tokens_per_frame}, "
            f"bank_frames={self.bank_frames}, prompt_dim={self.prompt_dim}, prototype={self.prototype!r}{options}"
        )


register_memory("prompt_bank", PromptBankMemory)
