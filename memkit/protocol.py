"""The memory protocol and the three small records that cross it.

A segment-autoregressive video transformer denoises segment ``s`` many times and then
moves on. A memory is therefore read many times per segment and written once:

* ``read(state, query) -> Context``: at every denoising step, at every memory layer.
  Pure and cheap. The context holds keys/values in head space that the segment's
  queries attend to besides their own keys.
* ``write(state, chunk) -> state``: once per finished segment, from the *clean*
  segment. Returns the next state; never changes the old one.

Keys in a :class:`Chunk` and a :class:`Context` are **before** rotary embedding; every
context slot carries its frame position, so the attention layer rotates kept keys at the
position they were recorded at, however long ago.
"""

import dataclasses
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from memkit.errors import NonFiniteError, ShapeError
from memkit.typing import (
    Bool,
    Float,
    Int,
    check_bool,
    check_floating,
    check_integer,
    check_shape,
    outside,
    typecheck_enabled,
)

__all__ = [
    "Query",
    "Chunk",
    "Context",
    "Memory",
    "ReadLayout",
    "ReadPlan",
    "plan_read",
    "read_dynamic",
    "read_planned",
    "empty_context",
    "token_positions",
]

StateT = TypeVar("StateT")


def _check_prompt(owner: str, prompt: Tensor | None, mask: Tensor | None, batch: int, name: str = "prompt") -> None:
    if prompt is None:
        if mask is not None:
            raise ShapeError(f"{owner}.{name}_mask was given without {owner}.{name}")
        return
    check_floating(f"{owner}.{name}", prompt)
    sizes = check_shape(f"{owner}.{name}", prompt, "b p e", b=batch)
    if mask is not None:
        check_bool(f"{owner}.{name}_mask", mask)
        check_shape(f"{owner}.{name}_mask", mask, "b p", b=batch, p=sizes["p"])


def _check_layout(owner: str, frame_positions: Tensor, tokens_per_frame: int, batch: int, tokens: int) -> None:
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ShapeError(f"{owner}.tokens_per_frame: expected a positive int, got {tokens_per_frame!r}")
    check_integer(f"{owner}.frame_positions", frame_positions)
    sizes = check_shape(f"{owner}.frame_positions", frame_positions, "b f", b=batch)
    if sizes["f"] == 0:
        # refused at the door: every memory would need its own rule for an empty segment
        raise ShapeError(f"{owner}.frame_positions: dimension f (frames) should be at least 1, got 0 (empty segment)")
    if sizes["f"] * tokens_per_frame != tokens:
        raise ShapeError(
            f"{owner}: inconsistent frame layout: {sizes['f']} frames x {tokens_per_frame} tokens per frame "
            f"= {sizes['f'] * tokens_per_frame}, but dimension n (tokens) is {tokens}"
        )


def _check_meta(owner: str, meta: Tensor | None, frame_positions: Tensor) -> None:
    if meta is None:
        return
    check_floating(f"{owner}.frame_meta", meta)
    b, f = frame_positions.shape
    check_shape(f"{owner}.frame_meta", meta, "b f c", b=b, f=f)


@dataclasses.dataclass(frozen=True, eq=False)
class Query:
    """What a memory may look at when it is read (once per denoising step).

    Attributes:
        q: the segment's queries before rotary embedding, ``(b h n d)``.
        frame_positions: frame index of each of the segment's frames, ``(b f)``, ``f >= 1``;
            ``n = f * tokens_per_frame``, tokens laid out frame-major.
        tokens_per_frame: tokens in one frame.
        prompt: the segment's prompt embedding ``(b p e)``, if the host has one.
        prompt_mask: ``(b p)`` bool, True for real prompt tokens, False for padding.
        frame_meta: per-frame metadata ``(b f c)`` the host supplies, if any: a camera pose, a
            time stamp, any vector describing each frame. Memories that retrieve by it
            (:class:`memkit.PoseRetrievalMemory`) need it; every other memory ignores it.
    """

    q: Float[Tensor, "b h n d"]
    frame_positions: Int[Tensor, "b f"]
    tokens_per_frame: int
    prompt: Float[Tensor, "b p e"] | None = None
    prompt_mask: Bool[Tensor, "b p"] | None = None
    frame_meta: Float[Tensor, "b f c"] | None = None

    def __post_init__(self) -> None:
        if not outside():  # built by memkit from tensors already checked at the door
            return
        check_floating("query.q", self.q)
        s = check_shape("query.q", self.q, "b h n d")
        _check_layout("query", self.frame_positions, self.tokens_per_frame, s["b"], s["n"])
        _check_prompt("query", self.prompt, self.prompt_mask, s["b"])
        _check_meta("query", self.frame_meta, self.frame_positions)

    @property
    def batch_size(self) -> int:
        return int(self.q.shape[0])

    @property
    def layout(self) -> "ReadLayout":
        """What the query shares with every other query of its segment (all but ``q``)."""
        return ReadLayout(self.frame_positions, self.tokens_per_frame, self.prompt, self.prompt_mask, self.frame_meta)


@dataclasses.dataclass(frozen=True, eq=False)
class Chunk:
    """What a finished (clean) segment offers a memory when it is written.

    Attributes:
        k: keys before rotary embedding, ``(b h n d)``.
        v: values, ``(b h n d)``.
        hidden: the attention layer's input hidden states, ``(b n D)``.
        frame_positions: frame index of each frame, ``(b f)``, ``f >= 1``, ``n = f * tokens_per_frame``.
        tokens_per_frame: tokens in one frame.
        prompt: the segment's prompt embedding ``(b p e)``, if any.
        prompt_mask: ``(b p)`` bool, True for real prompt tokens.
        next_prompt: the prompt of the segment that will read next ``(b p' e)``, when the host
            knows it (a scheduled prompt switch). A memory that evicts by relevance to the
            prompt (:class:`memkit.PromptBankMemory`) lets it decide, so a frame that matters
            only after the switch is not dropped before the new prompt is seen.
        next_prompt_mask: ``(b p')`` bool, True for real tokens of ``next_prompt``.
        frame_meta: per-frame metadata ``(b f c)`` (a camera pose...), stored by the memories
            that retrieve by it and ignored by the others (see :attr:`Query.frame_meta`).
    """

    k: Float[Tensor, "b h n d"]
    v: Float[Tensor, "b h n d"]
    hidden: Float[Tensor, "b n D"]
    frame_positions: Int[Tensor, "b f"]
    tokens_per_frame: int
    prompt: Float[Tensor, "b p e"] | None = None
    prompt_mask: Bool[Tensor, "b p"] | None = None
    next_prompt: Float[Tensor, "b p2 e2"] | None = None
    next_prompt_mask: Bool[Tensor, "b p2"] | None = None
    frame_meta: Float[Tensor, "b f c"] | None = None

    def __post_init__(self) -> None:
        if outside():  # built by the user; one built by memkit holds tensors already checked
            self._check_shapes()
        if typecheck_enabled() and not torch.compiler.is_compiling():
            # a NaN written once is read by every later segment: refuse it at the door, wherever the chunk
            # was built (a model's own keys can go non-finite). Reading the answer back waits for the
            # device (a sync per write), so it follows the checking switches
            for name in ("k", "v", "hidden", "prompt", "next_prompt", "frame_meta"):
                x = getattr(self, name)
                if x is not None and not bool(torch.isfinite(x).all()):
                    bad = int((~torch.isfinite(x)).sum())
                    raise NonFiniteError(
                        f"chunk.{name}: {bad} non-finite value(s) (NaN/Inf) in a segment about to be written; "
                        "memkit refuses to write them into memory"
                    )

    def _check_shapes(self) -> None:
        check_floating("chunk.k", self.k)
        check_floating("chunk.v", self.v)
        check_floating("chunk.hidden", self.hidden)
        s = check_shape("chunk.k", self.k, "b h n d")
        check_shape("chunk.v", self.v, "b h n d", b=s["b"], h=s["h"], n=s["n"], d=s["d"])
        check_shape("chunk.hidden", self.hidden, "b n D", b=s["b"], n=s["n"])
        _check_layout("chunk", self.frame_positions, self.tokens_per_frame, s["b"], s["n"])
        _check_prompt("chunk", self.prompt, self.prompt_mask, s["b"])
        _check_prompt("chunk", self.next_prompt, self.next_prompt_mask, s["b"], "next_prompt")
        _check_meta("chunk", self.frame_meta, self.frame_positions)

    @property
    def num_frames(self) -> int:
        return int(self.frame_positions.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.k.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """Keys/values a memory hands to attention.

    Attributes:
        k: keys before rotary embedding, ``(b h m d)``.
        v: values, ``(b h m d)``.
        mask: ``(b h m)`` bool, True where a slot holds something; invalid slots are
            never attended to (a context with no valid slot contributes nothing).
        positions: ``(b h m)`` integer frame position at which to rotate each key.
        places: ``(b h m)`` integer place of each slot in the frame it was recorded in (its
            token index there), ``-1`` for a slot with no place in a frame (a learned
            summary slot); ``None`` (memories that store whole frames, frame-major): the
            slot's index in this context, modulo tokens per frame. Used by 3-D rotary
            embeddings (:class:`memkit.integrations.rotary.TableRotary`, Wan's).
    """

    k: Float[Tensor, "b h m d"]
    v: Float[Tensor, "b h m d"]
    mask: Bool[Tensor, "b h m"]
    positions: Int[Tensor, "b h m"]
    places: Int[Tensor, "b h m"] | None = None

    def __post_init__(self) -> None:
        if not outside():  # built by memkit (a memory's read): its tensors are the memory's own
            return
        check_floating("context.k", self.k)
        check_floating("context.v", self.v)
        check_bool("context.mask", self.mask)
        check_integer("context.positions", self.positions)
        s = check_shape("context.k", self.k, "b h m d")
        check_shape("context.v", self.v, "b h m d", b=s["b"], h=s["h"], m=s["m"], d=s["d"])
        check_shape("context.mask", self.mask, "b h m", b=s["b"], h=s["h"], m=s["m"])
        check_shape("context.positions", self.positions, "b h m", b=s["b"], h=s["h"], m=s["m"])
        if self.places is not None:
            check_integer("context.places", self.places)
            check_shape("context.places", self.places, "b h m", b=s["b"], h=s["h"], m=s["m"])

    @property
    def num_slots(self) -> int:
        return int(self.k.shape[2])

    @staticmethod
    def concat(contexts: "list[Context] | tuple[Context, ...]") -> "Context":
        """One context holding every slot of ``contexts`` (attention over it is the same)."""
        if len(contexts) == 1:
            return contexts[0]
        places = None
        if any(c.places is not None for c in contexts):
            # each part keeps its own places: a part without them counts its slots from 0
            places = torch.cat(
                [
                    c.places
                    if c.places is not None
                    else torch.arange(c.num_slots, device=c.k.device).expand(c.mask.shape)
                    for c in contexts
                ],
                dim=2,
            )
        return Context(
            k=torch.cat([c.k for c in contexts], dim=2),
            v=torch.cat([c.v for c in contexts], dim=2),
            mask=torch.cat([c.mask for c in contexts], dim=2),
            positions=torch.cat([c.positions for c in contexts], dim=2),
            places=places,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ReadLayout:
    """A segment's layout: what every denoising step's :class:`Query` of that segment shares.

    A memory prepares a :class:`ReadPlan` from a state and a layout once per segment (see
    :func:`plan_read`); only the queries ``q`` change from step to step.

    Attributes:
        frame_positions: ``(b f)``, ``f >= 1``.
        tokens_per_frame: tokens in one frame.
        prompt: ``(b p e)`` or None.
        prompt_mask: ``(b p)`` bool or None.
        frame_meta: ``(b f c)`` per-frame metadata or None (see :attr:`Query.frame_meta`).

    Example:
        >>> import torch, memkit
        >>> memkit.ReadLayout(torch.tensor([[3, 4]]), tokens_per_frame=8).batch_size
        1
    """

    frame_positions: Int[Tensor, "b f"]
    tokens_per_frame: int
    prompt: Float[Tensor, "b p e"] | None = None
    prompt_mask: Bool[Tensor, "b p"] | None = None
    frame_meta: Float[Tensor, "b f c"] | None = None

    def __post_init__(self) -> None:
        if not outside():
            return
        _check_meta("layout", self.frame_meta, self.frame_positions)
        check_integer("layout.frame_positions", self.frame_positions)
        f = check_shape("layout.frame_positions", self.frame_positions, "b f")
        _check_layout("layout", self.frame_positions, self.tokens_per_frame, f["b"], f["f"] * self.tokens_per_frame)
        _check_prompt("layout", self.prompt, self.prompt_mask, f["b"])

    @property
    def batch_size(self) -> int:
        return int(self.frame_positions.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class ReadPlan:
    """What a memory prepared for the reads of one segment (every denoising step reads through it).

    The context a read returns is the concatenation of ``parts`` in order: a
    :class:`Context` is prepared once per segment (it does not depend on the step's
    queries: a frame sink, a window, a prompt-chosen bank); ``None`` marks a part computed
    at each step from the queries (``read_dynamic``, e.g. SparseKV's top-k routing).
    An attention layer rotates the prepared parts' keys once per segment.

    Attributes:
        parts: prepared contexts and ``None`` placeholders, in the order a read concatenates them.
        state: the state the plan was made from (a memory without a ``plan`` method reads it).
        extra: anything else the memory's ``read_dynamic`` needs (memory-specific).
    """

    parts: tuple[Context | None, ...]
    state: Any = None
    extra: Any = None


def plan_read(memory: Any, state: Any, layout: ReadLayout) -> ReadPlan:
    """The plan of ``memory``'s reads from ``state`` for one segment laid out as ``layout``.

    A memory may implement ``plan(state, layout) -> ReadPlan`` and
    ``read_dynamic(plan, query) -> tuple[Context, ...]`` (one context per ``None`` part);
    for one that does not, the plan reads ``state`` in full at every step. Either way
    ``read_planned(memory, plan_read(memory, state, query.layout), query)`` equals
    ``memory.read(state, query)`` for every query of the segment.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.SinkWindowMemory(2, 8, 4, sink_frames=1, window_frames=2)
        >>> state = mem.init_state(1)
        >>> query = memkit.Query(torch.randn(1, 2, 8, 8), torch.tensor([[0, 1]]), 4)
        >>> plan = memkit.plan_read(mem, state, query.layout)      # once per segment
        >>> torch.equal(memkit.read_planned(mem, plan, query).k, mem.read(state, query).k)   # each step
        True
    """
    make = getattr(memory, "plan", None)
    if make is None:
        return ReadPlan(parts=(None,), state=state)
    plan: ReadPlan = make(state, layout)
    return plan


def read_dynamic(memory: Any, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
    """The contexts of ``plan``'s ``None`` parts for ``query`` (in order)."""
    fn = getattr(memory, "read_dynamic", None)
    if fn is None:
        return (memory.read(plan.state, query),)
    parts: tuple[Context, ...] = fn(plan, query)
    return parts


def read_planned(memory: Any, plan: ReadPlan, query: Query) -> Context:
    """What ``memory.read(plan.state, query)`` returns, read through ``plan`` (see :func:`plan_read`)."""
    dynamic = iter(read_dynamic(memory, plan, query) if any(p is None for p in plan.parts) else ())
    parts = [p if p is not None else next(dynamic) for p in plan.parts]
    if not parts:
        return empty_context(query)
    return Context.concat(parts)


def empty_context(query: Query, dtype: torch.dtype | None = None) -> Context:
    """A context with no slots, shaped for ``query`` (what :class:`NoMemory` returns)."""
    b, h, _, d = query.q.shape
    dtype = dtype or query.q.dtype
    z = query.q.new_zeros((b, h, 0, d), dtype=dtype)
    return Context(
        k=z,
        v=z,
        mask=torch.zeros((b, h, 0), dtype=torch.bool, device=query.q.device),
        positions=torch.zeros((b, h, 0), dtype=torch.long, device=query.q.device),
    )


def token_positions(frame_positions: Tensor, tokens_per_frame: int) -> Tensor:
    """Frame position of every token, ``(b f) -> (b f*t)``, tokens laid out frame-major."""
    return frame_positions.repeat_interleave(tokens_per_frame, dim=1)


@runtime_checkable
class Memory(Protocol[StateT]):
    """The protocol every memkit memory implements (generic over its state type).

    Modules hold parameters only; the state flows in and out. ``read`` and ``write``
    are pure: they never change the state they are given.
    """

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> StateT:
        """The empty state for ``batch_size`` streams; its shapes never change afterwards."""
        ...

    def read(self, state: StateT, query: Query) -> Context:
        """Keys/values the current segment may attend to (called at every denoising step)."""
        ...

    def write(self, state: StateT, chunk: Chunk) -> StateT:
        """The state after the finished segment ``chunk`` (called once per segment)."""
        ...
