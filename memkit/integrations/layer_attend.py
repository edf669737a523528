"""The per-layer attend: what an adapter calls in place of its attention core.

:class:`LayerAttend` reads the layer's memory for the session's segment, rotates and
attends over [memory; segment] with :func:`memkit.layers.attend_with_context`, and stages
the layer's write during a commit.
"""

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from memkit.attention.masked import attend_masked
from memkit.errors import AttachError, ShapeError
from memkit.integrations.layout import SegmentLayout
from memkit.layers.memory_attention import Rotate, attend_with_context
from memkit.protocol import Chunk, Context, Memory, Query, token_positions
from memkit.typing import Float, check_floating, check_shape, typechecked

if TYPE_CHECKING:
    from memkit.integrations.session import MemorySession

__all__ = ["AttentionAdapter", "AttachedLayer", "LayerAttend", "ExtraTokens", "checked_rotary", "segment_mask"]


AttentionAdapter = Callable[..., Any]
"""How to run one attention module with memkit's attention core in the middle.

Called as ``adapter(module, attend, *args, **kwargs)`` in place of
``module(*args, **kwargs)``: compute ``q, k, v`` ``(b h n d)`` *before* rotary embedding
with the module's own projections, call ``attend(q, k, v)`` (a :class:`LayerAttend`), and
finish as the module does (output projection, return type). Inside its adapter the
module is its original self: calling it there runs its own ``forward``. For example::

    def adapter(attn, attend, x, pos):
        q, k, v = attn.qkv(x).unflatten(-1, (3, attn.heads, -1)).permute(2, 0, 3, 1, 4)
        return attn.out(attend(q, k, v).transpose(1, 2).flatten(2))
"""


def checked_rotary(rotate: Rotate | None, layer: str) -> Rotate | None:
    """The user's rotary, with what memkit passed it named when it fails (positions ``(b n)`` or ``(b h m)``)."""
    if rotate is None:
        return None
    fn: Rotate = rotate

    def checked(x: Tensor, positions: Tensor, **places: Tensor) -> Tensor:
        memory = positions.ndim == 3
        what = "(b h m): memory keys, each head its own slots" if memory else "(b n): the segment's tokens"
        try:
            out = fn(x, positions, **places)
        except Exception as err:  # the user's code: say what it was given
            raise AttachError(
                f"layer {layer!r}: the rotary function failed on x {'(b h m d)' if memory else '(b h n d)'} = "
                f"{tuple(x.shape)} with positions {what} = {tuple(positions.shape)}: {type(err).__name__}: {err}. "
                "memkit calls rotary(x, positions) "
                "with integer frame positions shaped (b n) for the segment's queries and keys and (b h m) for "
                "memory keys; a rotary written for (b n) only can start with `if pos.ndim == 2: pos = pos[:, None]`"
            ) from err
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise AttachError(
                f"layer {layer!r}: the rotary function returned {got} for x {tuple(x.shape)} and positions "
                f"{what} = {tuple(positions.shape)}; it must return a tensor shaped like x"
            )
        return out

    checked.takes_places = getattr(fn, "takes_places", False)  # type: ignore[attr-defined]
    return checked


@dataclasses.dataclass(eq=False)
class AttachedLayer:
    name: str
    module: nn.Module
    memory: Memory[Any]
    adapter: AttentionAdapter


class LayerAttend:
    """memkit's attention core for one call of one attached layer: what an adapter calls.

    ``attend(q, k, v)`` reads the layer's memory for the session's current segment,
    rotates (when the session has a rotary) and attends; during
    :meth:`MemorySession.commit` it also writes the segment into the memory.

    Attributes:
        session: the :class:`MemorySession` whose state is used.
        name: the layer's module name.
        memory: the layer's memory.

    Example:
        >>> import torch, memkit
        >>> from torch import nn
        >>> def adapter(lin, attend, x):                  # a toy "attention": q = k = v = lin(x)
        ...     q = lin(x).unflatten(-1, (2, -1)).transpose(1, 2)          # (b h n d)
        ...     print(attend.name, attend.layout(q)[0].tolist(), attend.layout(q)[1])
        ...     return attend(q, q, q).transpose(1, 2).flatten(2)
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> with memkit.attach(model, memkit.NoMemory(), layers="0", adapter=adapter) as session:
        ...     session.set_segment([0, 1, 2])
        ...     model(torch.randn(1, 6, 8)).shape
        0 [[0, 1, 2]] 2
        torch.Size([1, 6, 8])
    """

    def __init__(self, session: "MemorySession", layer: AttachedLayer, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.session, self._layer = session, layer
        self._args, self._kwargs = args, kwargs

    @property
    def name(self) -> str:
        return self._layer.name

    @property
    def memory(self) -> Memory[Any]:
        return self._layer.memory

    @property
    def segment(self) -> SegmentLayout:
        """The session's current :class:`SegmentLayout` (raises if none was set)."""
        return self.session._require_segment()

    def layout(self, q: Tensor) -> tuple[Tensor, int]:
        """``frame_positions (b f)`` and ``tokens_per_frame`` for queries ``q (b h n d)``."""
        return self.segment.layout(int(q.shape[0]), int(q.shape[2]), q.device)

    @typechecked
    def __call__(
        self,
        q: Float[Tensor, "b h n d"],
        k: Float[Tensor, "b h n d"],
        v: Float[Tensor, "b h n d"],
        *,
        mask: Tensor | None = None,
        extra: "ExtraTokens | None" = None,
        hidden: Float[Tensor, "b n D"] | None = None,
        rotary: Rotate | None = None,
        backend: str | None = None,
    ) -> Float[Tensor, "b h n d"]:
        """Attention of the segment over its own tokens and the layer's memory.

        Args:
            q, k, v: ``(b h n d)`` before rotary embedding; tokens laid out frame-major.
            mask: the host's own mask over the segment's keys, boolean, True = may be
                attended: ``(b n)`` key padding, or ``(b|1 h|1 n n)`` / ``(b|1 n n)`` per
                query (e.g. a frame-level block-causal mask). Memory slots are the past:
                every query sees every valid slot, whatever this mask says.
            extra: keys and values attended in this call only (a prompt's, in joint
                text-video attention): never rotated, never written to memory. To serve
                the extra tokens' own queries too, use :meth:`joint`.
            hidden: the layer's input ``(b n D)``, stored in the chunk a commit writes
                (default: the module call's first tensor argument of that shape).
            rotary: ``rotate(x, positions)`` for this call, overriding the session's.
            backend: memkit attention backend for this call (see :func:`memkit.attend`),
                overriding the session's (e.g. the one the host chose for this layer).

        Returns:
            ``(b h n d)``: the attention output before the module's output projection.
        """
        if extra is not None and extra.q is not None:
            raise AttachError(f"layer {self.name!r}: extra tokens with queries go through attend.joint(...)")
        out, _ = self._run(q, k, v, mask, extra, hidden, rotary, backend)
        return out

    def joint(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        extra: "ExtraTokens",
        *,
        mask: Tensor | None = None,
        hidden: Tensor | None = None,
        rotary: Rotate | None = None,
        backend: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Joint attention: the segment's tokens and ``extra`` tokens (a prompt) in one sequence.

        The segment's queries and the extra tokens' queries ``extra.q`` both attend over
        [memory; extra; segment], as stock joint attention (CogVideoX, HunyuanVideo,
        Mochi) attends over [text; video], with the memory's slots added. Only the segment
        is rotated and written to memory. ``mask`` may only be key padding ``(b n)`` here
        (a per-query segment mask would not say what the extra queries see).

        Returns:
            ``(out (b h n d), extra_out (b h e d))``.
        """
        if extra.q is None:
            raise AttachError(f"layer {self.name!r}: attend.joint needs extra.q (the extra tokens' queries)")
        out, extra_out = self._run(q, k, v, mask, extra, hidden, rotary, backend)
        assert extra_out is not None
        return out, extra_out

    def _run(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        extra: "ExtraTokens | None",
        hidden: Tensor | None,
        rotary: Rotate | None,
        backend: str | None,
    ) -> tuple[Tensor, Tensor | None]:
        check_floating("q", q)
        s = check_shape("q", q, "b h n d")
        check_shape("k", k, "b h n d", b=s["b"], h=s["h"], n=s["n"], d=s["d"])
        check_shape("v", v, "b h n d", b=s["b"], h=s["h"], n=s["n"])
        session, layer = self.session, self._layer
        segment = self.segment
        fp, t = segment.layout(s["b"], s["n"], q.device)
        state = session._state_for(layer, q)
        query = Query(q, fp, t, segment.prompt, segment.prompt_mask)
        context = layer.memory.read(state, query)
        raw = rotary if rotary is not None else session.rotary
        rotate = checked_rotary(raw, layer.name)
        backend = backend if backend is not None else session.backend
        extra_out = None
        # a 3-D rotary that takes slot places gets them (Context.places) through the route below
        with_places = context.places is not None and getattr(raw, "takes_places", False)
        if mask is None and extra is None and not with_places:
            out = attend_with_context(q, k, v, context, token_positions(fp, t), rotate=rotate, backend=backend)
        else:
            out, extra_out = _attend_masked(
                self.name, q, k, v, context, token_positions(fp, t), mask, extra, rotate, backend
            )
        staged = session._staged
        if staged is not None:
            if layer.name in staged:
                raise AttachError(
                    f"layer {layer.name!r} ran twice during one commit; a commit writes each memory layer once"
                )
            hidden = hidden if hidden is not None else self._default_hidden(s["b"], s["n"])
            chunk = Chunk(k, v, hidden, fp, t, segment.prompt, segment.prompt_mask)
            staged[layer.name] = layer.memory.write(state, chunk)
        return out, extra_out

    def _default_hidden(self, b: int, n: int) -> Tensor:
        for x in (*self._args, *self._kwargs.values()):
            if isinstance(x, Tensor) and x.ndim == 3 and tuple(x.shape[:2]) == (b, n) and x.is_floating_point():
                return x
        raise AttachError(
            f"layer {self.name!r}: commit needs the layer's input hidden states (b n D) with b={b}, n={n}; "
            "none of the module's arguments has that shape, so pass attend(q, k, v, hidden=...) in the adapter"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ExtraTokens:
    """Tokens that join one attention call without being part of the video: a prompt's.

    Joint text-video attention (CogVideoX, HunyuanVideo, Mochi) runs the prompt's tokens
    and the video's in one sequence. The prompt's keys and values are attended by the
    video's queries (and, through :meth:`LayerAttend.joint`, the prompt's own queries
    attend over memory, prompt and video); they are never rotated and never written to
    memory.

    Attributes:
        k, v: ``(b h e d)``, after the host's own normalisation, with no rotary.
        mask: ``(b e)`` bool key padding (True = a real token), or ``None``.
        q: ``(b h e d)`` the extra tokens' queries, or ``None`` when only their keys and
            values take part.

    Example:
        >>> import torch
        >>> from memkit.integrations import ExtraTokens
        >>> text = torch.randn(1, 2, 5, 8)
        >>> ExtraTokens(text, text, mask=torch.tensor([[True, True, True, False, False]])).num_tokens
        5
    """

    k: Tensor
    v: Tensor
    mask: Tensor | None = None
    q: Tensor | None = None

    def __post_init__(self) -> None:
        check_floating("extra.k", self.k)
        s = check_shape("extra.k", self.k, "b h e d")
        check_shape("extra.v", self.v, "b h e d", b=s["b"], h=s["h"], e=s["e"])
        if self.q is not None:
            check_shape("extra.q", self.q, "b h e d", b=s["b"], h=s["h"], e=s["e"], d=s["d"])
        if self.mask is not None:
            if self.mask.dtype != torch.bool:
                raise ShapeError(
                    f"extra.mask: expected a boolean key padding mask (True = real token), got {self.mask.dtype}"
                )
            check_shape("extra.mask", self.mask, "b e", e=s["e"])

    @property
    def num_tokens(self) -> int:
        return int(self.k.shape[2])


def segment_mask(mask: Tensor, b: int, h: int, n: int) -> Tensor:
    """The host's mask over the segment's keys as ``(b|1 h|1 n|1 n)`` bool (True = may be attended).

    Accepts key padding ``(b n)`` and per-query masks ``(b|1 n n)`` or ``(b|1 h|1 n n)``.

    Example:
        >>> import torch
        >>> segment_mask(torch.ones(2, 6, dtype=torch.bool), 2, 4, 6).shape
        torch.Size([2, 1, 1, 6])
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(f"mask: expected a boolean mask (True = may be attended), got {got}")
    if mask.ndim == 2:
        check_shape("mask (key padding)", mask, "b n", n=n)
        out = mask[:, None, None, :]
    elif mask.ndim in (3, 4):
        full = mask[:, None] if mask.ndim == 3 else mask
        if full.shape[-1] != n or full.shape[-2] not in (1, n):
            raise ShapeError(
                f"mask: dimension n (the segment's tokens) should be {n} on the last two axes, got {tuple(mask.shape)}"
            )
        if full.shape[1] not in (1, h):
            raise ShapeError(f"mask: dimension h (heads) should be 1 or {h}, got {full.shape[1]}")
        out = full
    else:
        raise ShapeError(f"mask: expected (b n), (b n n) or (b h n n), got shape {tuple(mask.shape)}")
    if out.shape[0] not in (1, b):
        raise ShapeError(f"mask: dimension b (batch) should be 1 or {b}, got {out.shape[0]}")
    return out


def _attend_masked(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    context: Context,
    positions: Tensor,
    mask: Tensor | None,
    extra: ExtraTokens | None,
    rotate: Rotate | None,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    """[memory; extra; segment] under the host's masks; what :func:`attend_with_context` does, plus masks."""
    b, h, n, _ = q.shape
    own = None if mask is None else segment_mask(mask.to(q.device), b, h, n)
    ck = context.k
    if rotate is not None:
        q, k = rotate(q, positions), rotate(k, positions)
        if context.places is not None and getattr(rotate, "takes_places", False):
            ck = rotate(ck, context.positions, places=context.places)  # type: ignore[call-arg]
        else:
            ck = rotate(ck, context.positions)
    # an invalid slot contributes nothing, whatever it holds (as in memkit.attend)
    slots = context.mask[..., None]
    memory = (torch.where(slots, ck, 0), torch.where(slots, context.v, 0), context.mask[:, :, None, :])
    if extra is None:
        return attend_masked(q, [memory, (k, v, own)], backend=backend), None
    if extra.k.shape[:2] != (b, h) or extra.k.shape[-1] != q.shape[-1]:
        raise ShapeError(
            f"layer {name!r}: extra.k {tuple(extra.k.shape)} should be (b h e d) with b={b}, h={h}, d={q.shape[-1]}"
        )
    extra_mask = None if extra.mask is None else extra.mask.to(q.device)[:, None, None, :]
    text = (extra.k, extra.v, extra_mask)
    if extra.q is None:
        return attend_masked(q, [memory, text, (k, v, own)], backend=backend), None
    if own is not None and own.shape[2] != 1:
        raise AttachError(
            f"layer {name!r}: joint attention takes a key padding mask (b n) for the segment, not a per-query mask "
            f"{tuple(mask.shape) if mask is not None else ()}"
        )
    e = extra.num_tokens
    queries = torch.cat([q, extra.q.to(q.dtype)], dim=2)
    out = attend_masked(queries, [memory, text, (k, v, own)], backend=backend)
    return out[:, :, :n], out[:, :, n : n + e]
