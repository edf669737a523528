"""The per-layer attend: what an adapter calls in place of its attention core.

:class:`LayerAttend` reads the layer's memory for the session's segment, rotates and
attends over [memory; segment] with :func:`memkit.layers.attend_with_context`, and stages
the layer's write during a commit.
"""

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from memkit.errors import AttachError
from memkit.integrations.layout import SegmentLayout
from memkit.layers.memory_attention import Rotate, attend_with_context
from memkit.protocol import Chunk, Memory, Query, token_positions
from memkit.typing import Float, check_floating, check_shape, typechecked

if TYPE_CHECKING:
    from memkit.integrations.session import MemorySession

__all__ = ["AttentionAdapter", "AttachedLayer", "LayerAttend", "checked_rotary"]


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

    def checked(x: Tensor, positions: Tensor) -> Tensor:
        memory = positions.ndim == 3
        what = "(b h m): memory keys, each head its own slots" if memory else "(b n): the segment's tokens"
        try:
            out = fn(x, positions)
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
        hidden: Float[Tensor, "b n D"] | None = None,
        rotary: Rotate | None = None,
        backend: str | None = None,
    ) -> Float[Tensor, "b h n d"]:
        """Attention of the segment over its own tokens and the layer's memory.

        Args:
            q, k, v: ``(b h n d)`` before rotary embedding; tokens laid out frame-major.
            hidden: the layer's input ``(b n D)``, stored in the chunk a commit writes
                (default: the module call's first tensor argument of that shape).
            rotary: ``rotate(x, positions)`` for this call, overriding the session's.
            backend: memkit attention backend for this call (see :func:`memkit.attend`),
                overriding the session's (e.g. the one the host chose for this layer).

        Returns:
            ``(b h n d)``: the attention output before the module's output projection.
        """
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
        out = attend_with_context(
            q,
            k,
            v,
            context,
            token_positions(fp, t),
            rotate=checked_rotary(rotary if rotary is not None else session.rotary, layer.name),
            backend=backend if backend is not None else session.backend,
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
        return out

    def _default_hidden(self, b: int, n: int) -> Tensor:
        for x in (*self._args, *self._kwargs.values()):
            if isinstance(x, Tensor) and x.ndim == 3 and tuple(x.shape[:2]) == (b, n) and x.is_floating_point():
                return x
        raise AttachError(
            f"layer {self.name!r}: commit needs the layer's input hidden states (b n D) with b={b}, n={n}; "
            "none of the module's arguments has that shape, so pass attend(q, k, v, hidden=...) in the adapter"
        )
