"""``MemoryAttention``: a self-attention layer that reads and writes a memory."""

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from memkit.attention.attend import attend_parts, check_attend_inputs
from memkit.errors import ShapeError
from memkit.layers.rotary import apply_rotary, rotate_with, segment_rotary_table
from memkit.memories.none import NoMemory
from memkit.protocol import Chunk, Context, Memory, Query, ReadLayout, ReadPlan, plan_read, read_dynamic
from memkit.typing import Bool, Float, Int, at_door, check_floating, check_shape, outside, typechecked

#: ``rotate(x, positions) -> x``: rotary embedding of ``x (b h n d)`` at integer frame positions
#: ``(b n)`` (shared by every head) or ``(b h n)``.
Rotate = Callable[[Tensor, Tensor], Tensor]


def attend_with_context(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    context: Context,
    positions: Tensor,
    *,
    rotate: Rotate | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of a segment over its own tokens and a memory's context, rotary included.

    The one place where pre-rotary keys meet their positions: the segment's ``q`` and
    ``k`` are rotated at ``positions``, each context key at the position it was recorded
    at (``context.positions``), then :func:`memkit.attend` runs over both.
    :class:`MemoryAttention` and :mod:`memkit.integrations` share it.

    Args:
        q, k, v: the segment's queries, keys and values before rotary, ``(b h n d)``.
        context: what the memory returned, keys before rotary, ``(b h m d)``.
        positions: frame position of each segment token, ``(b n)`` or ``(b h n)``.
        rotate: ``rotate(x, positions)``; ``None`` for a model without rotary embeddings.
        backend: attention backend (see :func:`memkit.attend`).

    Returns:
        ``(b h n d)``.

    Example:
        >>> import torch, functools, memkit
        >>> from memkit.layers import apply_rotary, attend_with_context
        >>> q = k = v = torch.randn(1, 2, 6, 8)
        >>> ctx = memkit.Context(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
        ...                      torch.ones(1, 2, 3, dtype=torch.bool), torch.zeros(1, 2, 3, dtype=torch.long))
        >>> pos = torch.tensor([[1, 1, 2, 2, 3, 3]])
        >>> attend_with_context(q, k, v, ctx, pos, rotate=apply_rotary).shape
        torch.Size([1, 2, 6, 8])
    """
    if outside():  # called by the user (inside memkit, the caller checked what it hands over)
        check_attend_inputs(q, k, v, (context,))
    ck = context.k
    if rotate is not None:
        q, k, ck = rotate(q, positions), rotate(k, positions), rotate(ck, context.positions)
    # the rotated keys go straight to the backend: no second Context is built (or checked)
    parts = [(ck, context.v, context.mask)] if ck.shape[2] > 0 else []
    return attend_parts(q, k, v, parts, backend)


def clamp_context_positions(context: Context, frame_positions: Tensor, max_distance: int) -> Context:
    """``context`` with every slot at most ``max_distance`` frames before the segment's first frame.

    The rotary position of a slot older than that becomes ``min(frame_positions) - max_distance``;
    newer slots keep theirs. Keys, values and mask are returned as they are.

    Example:
        >>> import torch, memkit
        >>> from memkit.layers import clamp_context_positions
        >>> ctx = memkit.Context(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4),
        ...                      torch.ones(1, 1, 3, dtype=torch.bool), torch.tensor([[[0, 20, 38]]]))
        >>> clamp_context_positions(ctx, torch.tensor([[40, 41]]), 8).positions.tolist()
        [[[32, 32, 38]]]
    """
    return Context(
        k=context.k,
        v=context.v,
        mask=context.mask,
        positions=_clamped(context.positions, frame_positions, max_distance),
    )


def _clamped(positions: Tensor, frame_positions: Tensor, max_distance: int) -> Tensor:
    floor = frame_positions.long().min(dim=1).values - max_distance  # (b,)
    return torch.maximum(positions, floor[:, None, None].to(positions.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPlan:
    """One segment's reads of a :class:`MemoryAttention`, prepared once (see :meth:`MemoryAttention.plan`).

    Pass it to the layer in place of the state at every denoising step of that segment: the
    memory's prepared parts are already rotated at their positions, so a step only computes
    what depends on its queries. Writing through a plan writes ``state``.

    Attributes:
        state: the memory state the plan was made from.
        plan: the memory's :class:`memkit.ReadPlan`.
        parts: per part of ``plan``, ``(rotated k, v, mask)`` when prepared, ``None`` when read at each step.
        frame_positions: the segment's ``(b f)``; ``tokens_per_frame``: its ``t``.
    """

    state: Any
    plan: ReadPlan
    parts: tuple[tuple[Tensor, Tensor, Tensor] | None, ...]
    frame_positions: Tensor
    tokens_per_frame: int


class MemoryAttention(nn.Module):
    """Multi-head self-attention over a segment plus what its memory returns.

    A drop-in self-attention layer for a segment-autoregressive video transformer:
    ``q, k, v`` projections, rotary embeddings at explicit frame positions (applied to the
    segment's keys and to memory keys at the positions they were recorded), a
    :class:`memkit.Memory`, and :func:`memkit.attend`.

    Args:
        dim: model dimension ``D``.
        heads: attention heads ``h``.
        memory: any :class:`memkit.Memory` built for ``heads`` and ``dim // heads``;
            :class:`NoMemory` when omitted.
        head_dim: ``d``, default ``dim // heads``.
        rope_theta: rotary base.
        qk_norm: RMS-normalise queries and keys per head (stabilises long rollouts).
        backend: attention backend (see :func:`memkit.attend`).
        max_distance: ``D``: memory keys further back than ``D`` frames from the segment's
            first frame are rotated as if exactly ``D`` frames back (LongLive-style
            re-indexing), so a model meets no query-key distance at generation time that it
            did not meet in training, however long the video; ``None`` = the true positions.

    Shapes: ``x (b n D)`` with ``n = f * t`` tokens laid out frame-major, ``frame_positions (b f)``.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.SinkWindowMemory(4, 8, 2, sink_frames=1, window_frames=2)
        >>> attn = memkit.MemoryAttention(32, 4, memory=mem)
        >>> state = attn.init_state(1)
        >>> x, pos = torch.randn(1, 6, 32), torch.tensor([[0, 1, 2]])
        >>> y, state = attn.forward_and_write(x, state, pos)   # clean pass: read, then write
        >>> attn(x, state, pos + 3).shape                       # next segment reads frames 0..2
        torch.Size([1, 6, 32])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        memory: Memory[Any] | None = None,
        *,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        backend: str = "auto",
        max_distance: int | None = None,
    ) -> None:
        super().__init__()
        if max_distance is not None and (isinstance(max_distance, bool) or not isinstance(max_distance, int)):
            raise TypeError(f"max_distance must be an int >= 0 or None, got {max_distance!r}")
        if max_distance is not None and max_distance < 0:
            raise ValueError(f"max_distance must be an int >= 0 or None, got {max_distance}")
        self.max_distance = max_distance
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) unless head_dim is given")
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.rope_theta = rope_theta
        self.backend = backend
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.memory: Memory[Any] = memory if memory is not None else NoMemory()
        self._compiled: Callable[..., Tensor] | None = None

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Any:
        """The memory's empty state, on the layer's device and in its dtype unless told otherwise.

        A bf16 layer gets a bf16 state (half the bytes of a float32 one); integer and
        boolean fields (positions, counters, masks) keep their own dtypes.

        Example:
            >>> import torch, memkit
            >>> attn = memkit.MemoryAttention(32, 4, memory=memkit.FIFOMemory(4, 8, 2, frames=2)).to(torch.bfloat16)
            >>> attn.init_state(1).window.k.dtype
            torch.bfloat16
        """
        if device is None:
            device = self.to_qkv.weight.device
        if dtype is None:
            dtype = self.to_qkv.weight.dtype
        return self.memory.init_state(batch_size, device=device, dtype=dtype)

    @property
    def has_memory(self) -> bool:
        """Whether the layer carries a memory (anything but :class:`memkit.NoMemory`): only those write.

        Example:
            >>> import memkit
            >>> fifo = memkit.FIFOMemory(4, 8, 2)
            >>> memkit.MemoryAttention(32, 4).has_memory, memkit.MemoryAttention(32, 4, fifo).has_memory
            (False, True)
        """
        return not isinstance(self.memory, NoMemory)

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}"]
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        if getattr(self, "max_distance", None) is not None:
            parts.append(f"max_distance={self.max_distance}")
        if not isinstance(self.memory, nn.Module):
            # a memory with parameters prints as a submodule; one without is shown here
            parts.append(f"memory={self.memory!r}")
        return ", ".join(parts)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v

    def _rotated(self, context: Context, frame_positions: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(k rotated at its positions, v, mask)`` of a memory's context; None when it has no slot."""
        if context.k.shape[2] == 0:
            return None
        positions = context.positions
        if self.max_distance is not None:
            positions = _clamped(positions, frame_positions, self.max_distance)
        return apply_rotary(context.k, positions, self.rope_theta), context.v, context.mask

    @typechecked
    def plan(
        self,
        state: Any,
        frame_positions: Int[Tensor, "b f"],
        tokens_per_frame: int,
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        frame_meta: Float[Tensor, "b f c"] | None = None,
    ) -> LayerPlan:
        """Prepare one segment's reads: what no step's queries change, read and rotated once.

        Pass the result in place of ``state`` to :meth:`forward` (or ``forward_and_write``) at
        every denoising step of the segment, with the same ``frame_positions`` and prompt; the
        outputs equal those of reading ``state`` at each step, bit for bit.

        Example:
            >>> import torch, memkit
            >>> attn = memkit.MemoryAttention(32, 4, memory=memkit.SinkWindowMemory(4, 8, 2, window_frames=2))
            >>> state, pos, x = attn.init_state(1), torch.tensor([[0, 1, 2]]), torch.randn(1, 6, 32)
            >>> plan = attn.plan(state, pos, tokens_per_frame=2)         # once per segment
            >>> torch.equal(attn(x, plan, pos), attn(x, state, pos))    # each step reads through it
            True
        """
        layout = ReadLayout(frame_positions, tokens_per_frame, prompt, prompt_mask, frame_meta)
        plan = plan_read(self.memory, state, layout)
        parts = tuple(None if p is None else self._rotated(p, frame_positions) for p in plan.parts)
        return LayerPlan(state, plan, parts, frame_positions, tokens_per_frame)

    def _check(self, x: Tensor, frame_positions: Tensor) -> int:
        check_floating("x", x)
        s = check_shape("x", x, "b n D", D=self.dim)
        weight = self.to_qkv.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ShapeError(
                f"x: dtype {x.dtype} does not match the layer's parameters ({weight.dtype}); cast the input "
                f"(x.to({weight.dtype})) or the layer (layer.to({x.dtype})), or run under torch.autocast"
            )
        f = check_shape("frame_positions", frame_positions, "b f", b=s["b"])["f"]
        if f == 0:
            raise ShapeError("frame_positions: dimension f (frames) should be at least 1, got 0 (empty segment)")
        if s["n"] % f:
            raise ShapeError(
                f"x has {s['n']} tokens, which is not a whole number of tokens per frame for {f} frames "
                f"(frame_positions is (b f) = {tuple(frame_positions.shape)})"
            )
        return s["n"] // f

    @typechecked
    def forward(
        self,
        x: Float[Tensor, "b n D"],
        state: Any,
        frame_positions: Int[Tensor, "b f"],
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        frame_meta: Float[Tensor, "b f c"] | None = None,
    ) -> Float[Tensor, "b n D"]:
        """Attend over the segment and its memory; the state is only read.

        ``frame_meta (b f c)``: per-frame metadata (a camera pose) handed to the memory in
        :attr:`memkit.Query.frame_meta` / :attr:`memkit.Chunk.frame_meta`, for memories that
        retrieve by it (:class:`memkit.PoseRetrievalMemory`); others ignore it.
        """
        y, _ = self._step(x, state, frame_positions, prompt, prompt_mask, write=False, frame_meta=frame_meta)
        return y

    def _step(
        self, x: Tensor, state: Any, frame_positions: Tensor, prompt: Tensor | None, prompt_mask: Tensor | None,
        *, write: bool, frame_meta: Tensor | None = None,
    ) -> tuple[Tensor, Any]:  # fmt: skip
        # checked when the user calls the layer; inside a network, the network checked its own inputs
        t = self._check(x, frame_positions) if at_door() else x.shape[1] // frame_positions.shape[1]
        q, k, v = self._project(x)
        fn = self._read_attend if self._compiled is None else self._compiled
        out = fn(q, k, v, state, frame_positions, t, prompt, prompt_mask, frame_meta)
        y = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        if isinstance(state, LayerPlan):
            state = state.state
        if not write:
            return y, state
        chunk = Chunk(k, v, x, frame_positions, t, prompt, prompt_mask, frame_meta=frame_meta)
        return y, self.memory.write(state, chunk)

    def _write_only(
        self, x: Tensor, state: Any, frame_positions: Tensor, prompt: Tensor | None, prompt_mask: Tensor | None,
        frame_meta: Tensor | None = None,
    ) -> Any:  # fmt: skip
        """What ``step(..., write=True)`` writes, without the attention (a host that discards ``y``)."""
        t = x.shape[1] // frame_positions.shape[1]
        _, k, v = self._project(x)
        if isinstance(state, LayerPlan):
            state = state.state
        return self.memory.write(state, Chunk(k, v, x, frame_positions, t, prompt, prompt_mask, frame_meta=frame_meta))

    def compile_read_attend(self, **options: Any) -> "MemoryAttention":
        """Run each step's read + rotary + attention through ``torch.compile(fullgraph=True, **options)``.

        An option, measured in the benchmarks (section 2c): the projections and the write stay
        eager. Each layer gets its own compiled function (its own dynamo cache), so a network of
        many layers does not exhaust dynamo's recompile limit. Returns the layer.

        Example:
            >>> import torch, memkit
            >>> attn = memkit.MemoryAttention(16, 2, memory=memkit.FIFOMemory(2, 8, 2, frames=2))
            >>> _ = attn.compile_read_attend(backend="eager")
            >>> attn(torch.randn(1, 4, 16), attn.init_state(1), torch.tensor([[0, 1]])).shape
            torch.Size([1, 4, 16])
        """
        impl = type(self)._read_attend
        # dynamo keeps one cache per code object: a private copy per layer keeps the layers' graphs apart
        code = impl.__code__.replace(co_name=f"_read_attend_{id(self):x}")
        own = types.FunctionType(code, impl.__globals__, code.co_name, impl.__defaults__, impl.__closure__)
        self._compiled = torch.compile(types.MethodType(own, self), fullgraph=True, **options)
        return self

    def _read_attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Any,
        frame_positions: Tensor,
        t: int,
        prompt: Tensor | None,
        prompt_mask: Tensor | None,
        frame_meta: Tensor | None,
    ) -> Tensor:
        """One step's read of the memory (through a plan when given one), rotary and attention: ``(b h n d)``."""
        query = Query(q, frame_positions, t, prompt, prompt_mask, frame_meta=frame_meta)
        if isinstance(state, LayerPlan):
            # prepared parts as they are; the others read (and rotated) for this step's queries
            plan = state
            dynamic = iter(
                read_dynamic(self.memory, plan.plan, query) if any(p is None for p in plan.plan.parts) else ()
            )
            parts = [
                p if p is not None else self._rotated(next(dynamic), frame_positions)
                for p, mp in zip(plan.parts, plan.plan.parts, strict=True)
                if p is not None or mp is None
            ]
            ready = [p for p in parts if p is not None]
        else:
            rotated = self._rotated(self.memory.read(state, query), frame_positions)
            ready = [] if rotated is None else [rotated]
        # the segment's table is shared by every layer and step of the segment (see segment_rotary_table)
        cos, sin = segment_rotary_table(frame_positions, t, self.head_dim, self.rope_theta)
        return attend_parts(rotate_with(q, cos, sin), rotate_with(k, cos, sin), v, ready, self.backend)

    @typechecked
    def step(
        self,
        x: Float[Tensor, "b n D"],
        state: Any,
        frame_positions: Int[Tensor, "b f"],
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        *,
        write: bool = False,
        frame_meta: Float[Tensor, "b f c"] | None = None,
    ) -> tuple[Float[Tensor, "b n D"], Any]:
        """One call for a host's block: ``(y, state)``, the state written when ``write`` is true.

        The same as ``(forward(...), state)`` or :meth:`forward_and_write`, in one return
        shape, so a host's loop over its blocks needs no branch on the pass it runs. Shapes
        as in :meth:`forward`.

        Example:
            >>> import torch, memkit
            >>> attn = memkit.MemoryAttention(32, 4, memory=memkit.FIFOMemory(4, 8, 2, frames=2))
            >>> state = attn.init_state(1)
            >>> y, state = attn.step(torch.randn(1, 4, 32), state, torch.tensor([[0, 1]]), write=True)
            >>> y.shape, int(state.window.valid.sum())
            (torch.Size([1, 4, 32]), 2)
        """
        return self._step(x, state, frame_positions, prompt, prompt_mask, write=write, frame_meta=frame_meta)

    @typechecked
    def forward_and_write(
        self,
        x: Float[Tensor, "b n D"],
        state: Any,
        frame_positions: Int[Tensor, "b f"],
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        frame_meta: Float[Tensor, "b f c"] | None = None,
    ) -> tuple[Float[Tensor, "b n D"], Any]:
        """The clean pass of a finished segment: read the memory as ``forward`` does, then
        write the segment (its pre-rotary keys, values and the layer input) into it."""
        return self._step(x, state, frame_positions, prompt, prompt_mask, write=True, frame_meta=frame_meta)


def memory_layers(model: nn.Module) -> list[MemoryAttention]:
    """Every :class:`MemoryAttention` in ``model``, in module order (one state each)."""
    return [m for m in model.modules() if isinstance(m, MemoryAttention)]
