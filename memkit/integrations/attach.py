"""Give memory to the self-attention layers of a PyTorch model memkit did not write.

``attach`` wraps chosen attention modules of an existing model *without editing its
source*: an adapter (a few lines per attention type) says how that module turns its input
into ``q, k, v``; memkit supplies the attention core, which reads the layer's memory,
applies rotary embeddings (segment keys at their frames, memory keys at the frames they
were recorded at) and attends over both through :func:`memkit.layers.attend_with_context`,
the same code :class:`memkit.MemoryAttention` runs.

The returned :class:`MemorySession` holds one stream's per-layer states:

* ``session.set_segment(frame_positions=...)``: the frame layout of the segment about to
  be denoised (the host model does not know it);
* calling the model as usual: every attached layer *reads* its memory;
* ``session.commit(*model_args)``: the clean pass of a finished segment; runs the model
  once and *writes* the segment into every attached layer's memory;
* ``session.save_states(path)`` / ``session.load_states(path)``: the stream, one call each;
* ``session.detach()`` (or leaving ``with``): the model is exactly as it was.

Memories that are ``nn.Module`` s (with parameters to train) are registered on the host as
``model.memkit_memories`` while attached, so they are in its ``parameters()`` and
``state_dict()``, move with ``model.to()`` and follow ``train()``/``eval()``; ``detach``
removes the attribute.

How a layer is taken over: the module gets an instance attribute ``forward`` that shadows
its class's ``forward`` (``detach`` deletes it again), so parameters, buffers, submodules
and ``state_dict`` are never touched. Hooks compose: when the module already carries a
diffusers ``HookRegistry`` or accelerate hook, memkit's function goes at the bottom of that
chain instead (where the module's own forward was), so the hooks fire once per call around
memkit's attention whichever was installed first, and ``detach`` removes only memkit.
:mod:`memkit.integrations.diffusers_wan` uses diffusers' own attention processors instead,
with the same session.
"""

import contextlib
import dataclasses
import fnmatch
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memkit.errors import AttachError, ShapeError
from memkit.layers.memory_attention import Rotate, attend_with_context
from memkit.protocol import Chunk, Memory, Query, token_positions
from memkit.state import check_state_matches, map_tensors, state_nbytes
from memkit.typing import Float, check_floating, check_shape, typechecked

__all__ = [
    "attach",
    "MemorySession",
    "Segment",
    "LayerAttend",
    "AttentionAdapter",
    "LayerSelector",
    "MemorySpec",
    "multihead_attention_adapter",
]


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

#: Which modules get memory: a glob over module names (``"blocks.*.attn"``), a list of
#: exact names, an ``nn.Module`` subclass (or tuple of them), or ``predicate(name, module)``.
LayerSelector = str | Sequence[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool]

#: The memory of each layer: one :class:`memkit.Memory` for all (its states are still per
#: layer), a ``{name: memory}`` dict, or a factory ``memory(name, module) -> Memory``.
MemorySpec = Memory[Any] | Mapping[str, Memory[Any]] | Callable[[str, nn.Module], Memory[Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """The frame layout of the segment the host model is about to process.

    Attributes:
        frame_positions: ``(b f)`` or ``(1 f)`` integer frame index of each frame.
        tokens_per_frame: ``t``; ``None`` infers ``n // f`` at each layer.
        prompt: ``(b p e)`` prompt embedding for prompt-aware memories, or ``None``.
        prompt_mask: ``(b p)`` bool, True for real prompt tokens, or ``None``.

    Example:
        >>> import torch
        >>> from memkit.integrations import Segment
        >>> seg = Segment(torch.tensor([[4, 5]]))            # 2 frames, same for every batch item
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


def _as_frame_positions(frame_positions: Tensor | Sequence[int]) -> Tensor:
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


def _checked_rotary(rotate: Rotate | None, layer: str) -> Rotate | None:
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
class _Layer:
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

    def __init__(self, session: "MemorySession", layer: _Layer, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.session, self._layer = session, layer
        self._args, self._kwargs = args, kwargs

    @property
    def name(self) -> str:
        return self._layer.name

    @property
    def memory(self) -> Memory[Any]:
        return self._layer.memory

    @property
    def segment(self) -> Segment:
        """The session's current :class:`Segment` (raises if none was set)."""
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
            rotate=_checked_rotary(rotary if rotary is not None else session.rotary, layer.name),
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


class _Installer(Protocol):
    kind: str

    def sync(self, hub: "_Hub", modules: Mapping[nn.Module, str]) -> None:
        """Route exactly ``modules`` (module -> name) through ``hub``; restore every other."""

    def restore(self) -> None:
        """Put every module back as it was."""


#: The attribute under which :func:`attach` registers memories that are ``nn.Module`` s on the host.
MEMORIES_ATTR = "memkit_memories"


def _module_key(name: str, taken: Mapping[str, Any] | nn.ModuleDict) -> str:
    """A ModuleDict key for the memory of layer ``name`` (module names may not hold dots)."""
    base = name.replace(".", "-") or "model"
    key, i = base, 2
    while key in taken:
        key, i = f"{base}-{i}", i + 1
    return key


class _Hub:
    """The sessions attached to one model: the last one is active.

    The hub also registers every memory that is an ``nn.Module`` (parameters to train,
    e.g. :class:`memkit.RecurrentMemory`) on the host, as ``model.memkit_memories`` (an
    ``nn.ModuleDict`` keyed by the first layer using each memory, dots written as ``-``), so
    they are in ``model.parameters()`` and ``model.state_dict()``, move with ``model.to()``
    and follow ``model.train()``/``eval()``. Detaching the last session using a memory
    unregisters it; detaching the last session removes the attribute.
    """

    def __init__(self, model: nn.Module, installer: _Installer) -> None:
        self.model, self.installer = model, installer
        self.sessions: list[MemorySession] = []
        self._inside: set[nn.Module] = set()
        self._memories: nn.ModuleDict | None = None

    @property
    def active(self) -> "MemorySession | None":
        return self.sessions[-1] if self.sessions else None

    def add(self, session: "MemorySession") -> None:
        owned = self.model._modules.get(MEMORIES_ATTR)
        if hasattr(self.model, MEMORIES_ATTR) and (owned is None or owned is not self._memories):
            raise AttachError(
                f"attach: {type(self.model).__name__} already has an attribute {MEMORIES_ATTR!r}, where memkit "
                "registers memories with parameters; rename it"
            )
        self.sessions.append(session)
        self._sync()
        self._register(session)

    def remove(self, session: "MemorySession") -> None:
        self.sessions.remove(session)
        self._unregister()
        if self.sessions:
            self._sync()
        else:
            self.installer.restore()

    def _register(self, session: "MemorySession") -> None:
        modules = [(layer.name, layer.memory) for layer in session._layers if isinstance(layer.memory, nn.Module)]
        if not modules:
            return
        if self._memories is None:
            self._memories = nn.ModuleDict().train(self.model.training)
            setattr(self.model, MEMORIES_ATTR, self._memories)
        held = {id(m) for m in self._memories.values()}
        params = [p for n, p in self.model.named_parameters() if not n.startswith(f"{MEMORIES_ATTR}.")]
        for name, memory in modules:
            if id(memory) in held:
                continue
            held.add(id(memory))
            assert isinstance(memory, nn.Module)
            # the host owns it now: its device and its training mode
            if params and any(p.device != params[0].device for p in memory.parameters()):
                memory.to(params[0].device)
            memory.train(self.model.training)
            self._memories[_module_key(name, self._memories)] = memory

    def _unregister(self) -> None:
        if self._memories is None:
            return
        used = {id(layer.memory) for s in self.sessions for layer in s._layers}
        for key in [k for k, m in self._memories.items() if id(m) not in used]:
            del self._memories[key]
        if not len(self._memories):
            if self.model._modules.get(MEMORIES_ATTR) is self._memories:
                delattr(self.model, MEMORIES_ATTR)
            self._memories = None

    def promote(self, session: "MemorySession") -> None:
        self.sessions.remove(session)
        self.sessions.append(session)

    def _sync(self) -> None:
        modules = {layer.module: layer.name for s in self.sessions for layer in s._layers}
        self.installer.sync(self, modules)

    def dispatch(
        self, module: nn.Module, fallback: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        session = self.active
        layer = session._by_module.get(module) if session is not None else None
        # inside its own adapter a module is its original self: the adapter may call it
        if session is None or layer is None or module in self._inside:
            return fallback(*args, **kwargs)
        self._inside.add(module)
        try:
            return layer.adapter(module, LayerAttend(session, layer, args, kwargs), *args, **kwargs)
        finally:
            self._inside.discard(module)


def _hub_of(module: nn.Module) -> "_Hub | None":
    """The hub a module is routed through, if any (found from the module itself: no globals)."""
    for _, _, fn in _forward_slots(module):
        route = getattr(fn, "_memkit_route", None)
        # `is`: diffusers copies a wrapped function's attributes onto its own wrapper
        if isinstance(route, _Route) and route.forward is fn and route.module is module and route.active:
            return route.hub
    hub = getattr(getattr(module, "processor", None), "_memkit_hub", None)
    return hub if isinstance(hub, _Hub) else None


def _forward_slots(module: nn.Module) -> Iterator[tuple[Any, str, Any]]:
    """``(holder, attribute, callable)`` of every place a module's forward chain keeps a forward.

    The module's own ``forward`` (an instance attribute shadowing the class's), accelerate's
    ``module._old_forward`` (what its hook calls), and each function reference of a diffusers
    ``HookRegistry`` (``module._diffusers_hook``). The innermost comes last.
    """
    if "forward" in module.__dict__:
        yield module.__dict__, "forward", module.__dict__["forward"]
    registry = module.__dict__.get("_diffusers_hook")
    for ref in reversed(getattr(registry, "_fn_refs", None) or []):
        for attr in ("forward", "original_forward"):
            fn = getattr(ref, attr, None)
            if fn is not None:
                yield ref, attr, fn
    if "_old_forward" in module.__dict__:
        yield module.__dict__, "_old_forward", module.__dict__["_old_forward"]


def _innermost_slot(module: nn.Module) -> tuple[Any, str] | None:
    """Where the forward chain of hooks installed on ``module`` calls the module's own forward.

    memkit goes there, below every hook, so that hooks installed before :func:`attach` still
    run once per call around memkit's attention (and hooks installed after wrap it the same
    way). ``None`` when the module has no hook chain memkit knows (then memkit shadows
    ``forward`` itself).
    """
    registry = module.__dict__.get("_diffusers_hook")
    refs = getattr(registry, "_fn_refs", None)
    if refs:
        # the first hook registered calls the real forward (through new_forward's original_forward if it has one)
        ref = refs[0]
        return (ref, "original_forward") if getattr(ref, "original_forward", None) is not None else (ref, "forward")
    if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook"):  # accelerate's add_hook_to_module
        return module.__dict__, "_old_forward"
    return None


def _set_slot(holder: Any, attr: str, value: Any) -> None:
    if isinstance(holder, dict):
        holder[attr] = value
    else:
        setattr(holder, attr, value)


@dataclasses.dataclass(eq=False)
class _Route:
    """One module routed through a hub: the function memkit put in its forward chain."""

    hub: _Hub
    module: nn.Module
    original: Callable[..., Any]  # what stood where memkit's function stands now
    had_instance_forward: bool
    forward: Callable[..., Any] = dataclasses.field(init=False)
    active: bool = True


class _ForwardInstaller:
    """Routes a module through the hub by putting a function at the bottom of its forward chain.

    Without hooks that is an instance attribute ``forward`` shadowing the class's. With a
    diffusers ``HookRegistry`` or accelerate hook already on the module, memkit's function
    replaces the module's own forward *inside* that chain, so those hooks still fire once
    per call around it. Hooks added after :func:`attach` wrap memkit's function as they
    would wrap ``forward``. ``detach`` puts back exactly what memkit replaced, wherever that
    now is in the chain, and never removes a hook; if memkit's function was captured where it
    cannot be found, it stays as a pass-through to the module's own forward.
    """

    kind = "forward"

    def __init__(self) -> None:
        self._saved: dict[nn.Module, _Route] = {}

    def sync(self, hub: _Hub, modules: Mapping[nn.Module, str]) -> None:
        for module in [m for m in self._saved if m not in modules]:
            self._unpatch(module)
        for module in modules:
            if module not in self._saved:
                self._patch(hub, module)

    def restore(self) -> None:
        for module in list(self._saved):
            self._unpatch(module)

    def _patch(self, hub: _Hub, module: nn.Module) -> None:
        slot = _innermost_slot(module)
        holder, attr = slot if slot is not None else (module.__dict__, "forward")
        original = module.forward if slot is None else holder[attr] if isinstance(holder, dict) else getattr(*slot)
        route = _Route(hub, module, original, had_instance_forward="forward" in module.__dict__)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not route.active:
                return route.original(*args, **kwargs)
            return route.hub.dispatch(route.module, route.original, args, kwargs)

        forward._memkit_route = route  # type: ignore[attr-defined]
        route.forward = forward
        _set_slot(holder, attr, forward)
        self._saved[module] = route

    def _unpatch(self, module: nn.Module) -> None:
        route = self._saved.pop(module)
        route.active = False
        found = [(holder, attr) for holder, attr, fn in _forward_slots(module) if fn is route.forward]
        for holder, attr in found:
            if holder is module.__dict__ and attr == "forward" and not route.had_instance_forward:
                del module.__dict__["forward"]  # the class's forward shows through again
            else:
                _set_slot(holder, attr, route.original)
        # not found: a hook we do not know captured it; inactive, it passes every call to the original


def _select_layers(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module]]:
    # memories registered by an earlier attach are never layers
    named = [(n, m) for n, m in model.named_modules() if n.split(".")[0] != MEMORIES_ATTR]
    if isinstance(layers, str):
        chosen = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, layers)]
    elif isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(c, type) for c in layers)):
        chosen = [(n, m) for n, m in named if isinstance(m, layers)]
    elif callable(layers):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    elif isinstance(layers, Sequence):
        by_name = dict(named)
        missing = [n for n in layers if n not in by_name]
        if missing:
            raise AttachError(f"attach: {type(model).__name__} has no module named {missing[0]!r}")
        chosen = [(n, by_name[n]) for n in layers]
    else:
        raise AttachError(f"attach: layers must be a glob, names, a module type or a predicate, got {layers!r}")
    if not chosen:
        raise AttachError(f"attach: no module of {type(model).__name__} matched layers={layers!r}")
    return chosen


def _resolve_memory(spec: MemorySpec, name: str, module: nn.Module) -> Memory[Any]:
    if isinstance(spec, Memory):
        return spec
    if isinstance(spec, Mapping):
        if name not in spec:
            raise AttachError(f"attach: the memory dict has no entry for layer {name!r}")
        memory = spec[name]
    elif callable(spec):
        memory = spec(name, module)
    else:
        raise AttachError(f"attach: memory must be a Memory, a dict or a factory, got {type(spec).__name__}")
    if not isinstance(memory, Memory):
        raise AttachError(f"attach: the memory for layer {name!r} is not a memkit.Memory: {memory!r}")
    return memory


def _resolve_adapter(
    spec: AttentionAdapter | Mapping[type, AttentionAdapter], name: str, module: nn.Module
) -> AttentionAdapter:
    if isinstance(spec, Mapping):
        for cls in type(module).__mro__:
            if cls in spec:
                return spec[cls]
        raise AttachError(f"attach: no adapter for layer {name!r} of type {type(module).__name__}")
    if not callable(spec):
        raise AttachError(f"attach: adapter must be callable, got {type(spec).__name__}")
    return spec


def _attach(
    model: nn.Module,
    memory: MemorySpec,
    layers: LayerSelector | None,
    adapter: AttentionAdapter | Mapping[type, AttentionAdapter],
    installer: Callable[[], _Installer],
    kind: str,
    *,
    rotary: Rotate | None,
    batch_size: int | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    backend: str,
) -> "MemorySession":
    if not isinstance(model, nn.Module):
        raise AttachError(f"attach: expected an nn.Module, got {type(model).__name__}")
    if layers is None:
        if not isinstance(memory, Mapping):
            raise AttachError(
                "attach: say which layers get memory (layers=...) or pass memory as a {name: memory} dict"
            )
        layers = list(memory)
    chosen = _select_layers(model, layers)
    if isinstance(memory, Mapping):
        extra = sorted(set(memory) - {n for n, _ in chosen})
        if extra:
            raise AttachError(f"attach: the memory dict names {extra[0]!r}, which is not among the selected layers")
    resolved = [
        _Layer(name, module, _resolve_memory(memory, name, module), _resolve_adapter(adapter, name, module))
        for name, module in chosen
    ]
    hubs = {h for m in model.modules() if (h := _hub_of(m)) is not None}
    hub = next(iter(hubs)) if len(hubs) == 1 else None
    if hubs and (hub is None or hub.model is not model):
        raise AttachError(
            f"attach: part of this {type(model).__name__} already carries memory attached through another model; "
            "attach every session to the same (outermost) model"
        )
    if hub is not None and hub.installer.kind != kind:
        raise AttachError(
            f"attach: this model already carries memory attached by the {hub.installer.kind!r} route; "
            f"detach those sessions before attaching by the {kind!r} route"
        )
    if hub is None:
        hub = _Hub(model, installer())
    session = MemorySession(
        hub, resolved, rotary=rotary, batch_size=batch_size, device=device, dtype=dtype, backend=backend
    )
    hub.add(session)
    return session


class MemorySession:
    """One stream's memory states for a model that :func:`attach` gave memory.

    Reads happen inside the model's own forward (every attached layer, every denoising
    step); :meth:`commit` runs the model's clean pass over a finished segment and writes
    every attached layer. States are pure memkit states: ``session.states`` can be saved,
    branched and put back with :meth:`set_states`.

    Activation: several sessions may be attached to one model (say, two streams); exactly
    one is *active*, and only its states are read or written when the model runs. The
    active session is the one attached or :meth:`activate`-d most recently;
    ``with session.active():`` activates it for the block and then restores the previous
    order; :meth:`commit` activates its session for the clean pass. A layer that the active
    session did not attach runs its original forward. Sessions are not thread-safe.

    Do not build one directly: use :func:`attach` or
    :func:`memkit.integrations.attach_wan`.

    Example:
        >>> import torch, memkit
        >>> from torch import nn
        >>> from memkit.integrations import multihead_attention_adapter
        >>> class Host(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        ...     def forward(self, x):
        ...         return self.attn(x, x, x, need_weights=False)[0]
        >>> model, x = Host().eval(), torch.randn(1, 8, 16)  # a segment: 2 frames of 4 tokens
        >>> a = memkit.attach(model, memkit.FIFOMemory(2, 8, 4, frames=2), layers=nn.MultiheadAttention,
        ...                   adapter=multihead_attention_adapter)
        >>> b = memkit.attach(model, memkit.FIFOMemory(2, 8, 4, frames=2), layers=nn.MultiheadAttention,
        ...                   adapter=multihead_attention_adapter)
        >>> b.is_active, a.is_active   # the most recently attached session is active
        (True, False)
        >>> a.set_segment([0, 1]); b.set_segment([0, 1])
        >>> _ = a.commit(x)             # a commits (activating itself for the clean pass); b stays empty
        >>> a.set_segment([2, 3]); b.set_segment([2, 3])
        >>> with a.active():
        ...     ya = model(x)
        >>> bool((ya != model(x)).any())   # outside the block b is active again: no past
        True
        >>> a.detach(); b.detach()
    """

    def __init__(
        self,
        hub: _Hub,
        layers: list[_Layer],
        *,
        rotary: Rotate | None,
        batch_size: int | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        backend: str,
    ) -> None:
        self._hub: _Hub | None = hub
        self._model = hub.model
        self._layers = layers
        self._by_module = {layer.module: layer for layer in layers}
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names) or len(self._by_module) != len(layers):
            raise AttachError("attach: a layer was selected twice")
        self.rotary, self.backend = rotary, backend
        self._init = (batch_size, device, dtype)
        self._states: dict[str, Any] = {}
        self._segment: Segment | None = None
        self._staged: dict[str, Any] | None = None
        self.reset()

    # ----- what the session holds

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The attached layers' module names, in module order."""
        return tuple(layer.name for layer in self._layers)

    @property
    def memories(self) -> dict[str, Memory[Any]]:
        """``{layer name: memory}``."""
        return {layer.name: layer.memory for layer in self._layers}

    @property
    def states(self) -> dict[str, Any]:
        """``{layer name: state}`` (a copy of the dict; ``None`` for a layer not run yet when created lazily)."""
        return {layer.name: self._states.get(layer.name) for layer in self._layers}

    def set_states(self, states: Mapping[str, Any]) -> None:
        """Replace the per-layer states (e.g. with ones saved from ``states`` earlier).

        Every layer needs an entry; ``None`` means "not created yet" (made at first use).
        A state its layer's memory would not have made (another class or configuration,
        e.g. a window of 5 frames for a window of 2) is refused with :class:`memkit.StateError`
        naming the layer, the field and the dimension.
        """
        if not isinstance(states, Mapping):
            raise AttachError(f"set_states: expected a {{layer name: state}} dict, got {type(states).__name__}")
        unknown = sorted(set(states) - set(self.layer_names), key=str)
        if unknown:
            raise AttachError(f"set_states: {unknown[0]!r} is not an attached layer (layers: {self.layer_names})")
        missing = sorted(set(self.layer_names) - set(states))
        if missing:
            raise AttachError(f"set_states: no state for layer {missing[0]!r}")
        for layer in self._layers:
            state = states[layer.name]
            if state is not None:
                check_state_matches(f"set_states: layer {layer.name!r}", state, layer.memory)
        self._states = {name: states[name] for name in self.layer_names}

    def to(self, *args: Any, **kwargs: Any) -> "MemorySession":
        """Move (or cast) every state as ``Tensor.to`` does; integer and boolean tensors keep their dtype.

        ``model.to(device)`` moves the host and its registered memories; the session's
        states are values it holds, so move them with ``session.to(device)``. Returns the session.
        """

        def move(x: Tensor) -> Tensor:
            if x.is_floating_point():
                return x.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (torch.device, str))), None))
            return x.to(device=device) if device is not None else x

        self._states = {name: map_tensors(move, s) for name, s in self._states.items()}
        return self

    def save_states(self, path: str | os.PathLike[str]) -> None:
        """Save every layer's state to one file (:func:`memkit.save_states` format), atomically.

        Works at any point of the stream, also before the first segment (a session made
        with ``batch_size=None`` then holds no state yet, and the file says so). Each
        layer's memory class and configuration are recorded and checked by :meth:`load_states`.
        """
        from memkit.io import save_states

        states = [(layer.name, self._states.get(layer.name)) for layer in self._layers]
        present = {name: state for name, state in states if state is not None}
        save_states(path, present, [layer.memory for layer in self._layers])

    def load_states(self, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> None:
        """Load states saved by :meth:`save_states` into this session (no template needed).

        The file's tensors say the batch size and dtype; the states land on ``device``
        (default: the session's ``device``, else each layer's parameters' device). Refused
        with :class:`memkit.CheckpointError`, saying what differs, when the file was saved by
        a session with other layers or memories, or is damaged. Layers the file holds no
        state for start empty. Works before the first segment.
        """
        from memkit.io import load_states, read_header

        header = read_header(path)
        shapes: dict[str, Any] = header["tensors"]
        names = list(shapes)

        def held(layer: _Layer) -> list[str]:
            prefix = f"[{layer.name!r}]"
            return [n for n in names if n == prefix or n.startswith((f"{prefix}.", f"{prefix}["))]

        present = [layer for layer in self._layers if held(layer)]
        template: dict[str, Any] = {}
        for layer in present:
            saved = [shapes[n] for n in held(layer)]
            batch = int(saved[0]["shape"][0]) if saved[0]["shape"] else 1
            floats = [getattr(torch, s["dtype"].removeprefix("torch."), None) for s in saved]
            dtype = next((d for d in floats if isinstance(d, torch.dtype) and d.is_floating_point), None)
            template[layer.name] = self._new_state(layer, batch, device=device, dtype=dtype)
        loaded = load_states(path, template, [layer.memory for layer in self._layers])
        self.reset()
        self._states.update(loaded)

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's state (constant over a stream once created)."""
        return state_nbytes(tuple(self._states.values()))

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of memories that are ``nn.Module``s (each once): train them with the host."""
        seen: set[int] = set()
        for layer in self._layers:
            if isinstance(layer.memory, nn.Module):
                for p in layer.memory.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p

    def reset(self) -> None:
        """Forget the stream: empty states (created now if ``batch_size`` was given, else on first use)."""
        batch_size, device, dtype = self._init
        self._states = {}
        if batch_size is None:
            return
        for layer in self._layers:
            self._states[layer.name] = self._new_state(layer, batch_size, device=device, dtype=dtype)

    def _new_state(
        self, layer: _Layer, batch_size: int, *, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> Any:
        """An empty state on ``device`` (default: the session's, else the layer's parameters')."""
        _, init_device, init_dtype = self._init
        params = [p for p in layer.module.parameters() if p.is_floating_point()]
        dev = device if device is not None else init_device if init_device is not None else None
        dev = dev if dev is not None else (params[0].device if params else None)
        dt = dtype if dtype is not None else init_dtype if init_dtype is not None else None
        dt = dt if dt is not None else (params[0].dtype if params else None)
        return layer.memory.init_state(batch_size, device=dev, dtype=dt)

    def _state_for(self, layer: _Layer, q: Tensor) -> Any:
        state = self._states.get(layer.name)
        if state is None:
            _, _, dtype = self._init
            state = layer.memory.init_state(int(q.shape[0]), device=q.device, dtype=dtype or q.dtype)
            self._states[layer.name] = state
        return state

    # ----- the segment layout

    def set_segment(
        self,
        frame_positions: Tensor | Sequence[int],
        tokens_per_frame: int | None = None,
        *,
        prompt: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> None:
        """Say which frames the next model calls process (the host model does not know).

        Args:
            frame_positions: integer frame index of each frame of the segment, ``(f)``
                (same for every batch item), ``(b f)``, or a list of ints.
            tokens_per_frame: ``t``, tokens per frame at the attached layers; ``None``
                infers ``n // f`` at each layer.
            prompt: ``(b p e)`` prompt embedding for prompt-aware memories.
            prompt_mask: ``(b p)`` bool, True for real prompt tokens.
        """
        self._require_attached()
        fp = _as_frame_positions(frame_positions)
        if tokens_per_frame is not None and (
            isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1
        ):
            raise ShapeError(f"tokens_per_frame: expected a positive int, got {tokens_per_frame!r}")
        if prompt is not None:
            check_floating("prompt", prompt)
            p = check_shape("prompt", prompt, "b p e")
            if prompt_mask is not None:
                check_shape("prompt_mask", prompt_mask, "b p", b=p["b"], p=p["p"])
        elif prompt_mask is not None:
            raise ShapeError("prompt_mask was given without prompt")
        self._segment = Segment(fp, tokens_per_frame, prompt, prompt_mask)

    @property
    def segment(self) -> Segment | None:
        """The current :class:`Segment`, or ``None`` before :meth:`set_segment`."""
        return self._segment

    def _require_segment(self) -> Segment:
        if self._segment is None:
            raise AttachError(
                "no segment layout: call session.set_segment(frame_positions=...) before running the model"
            )
        return self._segment

    # ----- activation

    @property
    def attached(self) -> bool:
        return self._hub is not None

    @property
    def is_active(self) -> bool:
        """Whether the model's attached layers use this session's states now."""
        return self._hub is not None and self._hub.active is self

    def activate(self) -> None:
        """Make this the session the model's attached layers use (until another is attached or activated)."""
        self._require_attached().promote(self)

    @contextlib.contextmanager
    def active(self) -> Iterator["MemorySession"]:
        """Activate this session for a ``with`` block, then restore the previous order."""
        hub = self._require_attached()
        before = list(hub.sessions)
        hub.promote(self)
        try:
            yield self
        finally:
            now = hub.sessions
            hub.sessions = [s for s in before if s in now] + [s for s in now if s not in before]

    def _require_attached(self) -> _Hub:
        if self._hub is None:
            raise AttachError("this MemorySession is detached; attach again to use memory")
        return self._hub

    # ----- writing

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        """The clean pass of a finished segment: run ``model(*args, **kwargs)`` and write it.

        Every attached layer reads its memory as during denoising, then writes the
        segment's pre-rotary keys, values and input hidden states (laid out by the current
        :meth:`set_segment`) into it. The new states replace the old ones only when the
        whole forward succeeded. Gradients flow as the caller's autograd mode says (wrap
        in ``torch.no_grad()`` for inference). Returns the model's output.
        """
        self._require_attached()
        self._require_segment()
        if self._staged is not None:
            raise AttachError("commit called while a commit is running")
        with self.active():
            self._staged = {}
            try:
                out = self._model(*args, **kwargs)
            finally:
                staged, self._staged = self._staged, None
        if not staged:
            raise AttachError(
                f"commit ran {type(self._model).__name__} but none of the attached layers {self.layer_names} was "
                "called, so nothing was written"
            )
        self._states.update(staged)
        return out

    # ----- detaching

    def detach(self) -> None:
        """Take this session off the model; when it was the last, the model is exactly as before.

        Its states stay readable (``session.states``). Calling ``detach`` twice is harmless.
        """
        if self._hub is not None:
            hub, self._hub = self._hub, None
            hub.remove(self)

    def __enter__(self) -> "MemorySession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        status = "active" if self.is_active else ("attached" if self.attached else "detached")
        layers = ", ".join(f"{layer.name}: {layer.memory!r}" for layer in self._layers[:3])
        more = f", ... ({len(self._layers)} layers)" if len(self._layers) > 3 else ""
        return f"MemorySession({status}, {type(self._model).__name__}, {{{layers}{more}}})"


def attach(
    model: nn.Module,
    memory: MemorySpec,
    *,
    adapter: AttentionAdapter | Mapping[type, AttentionAdapter],
    layers: LayerSelector | None = None,
    rotary: Rotate | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> MemorySession:
    """Give memory to chosen self-attention layers of ``model`` without editing its source.

    Args:
        model: any ``nn.Module``; it is changed only by an instance-level ``forward`` on
            each chosen layer and, when some memories are ``nn.Module`` s, by
            ``model.memkit_memories`` (an ``nn.ModuleDict`` holding them, moved to the model's
            device and training mode), both removed by :meth:`MemorySession.detach`.
        memory: a :class:`memkit.Memory` for every layer (shared object, one state per
            layer), a ``{layer name: memory}`` dict, or ``factory(name, module) -> Memory``.
        adapter: ``adapter(module, attend, *args, **kwargs)`` (see
            :class:`AttentionAdapter`), or ``{attention class: adapter}``.
        layers: which modules (see :data:`LayerSelector`); may be omitted when
            ``memory`` is a dict.
        rotary: ``rotate(x (b h n d), positions) -> x`` applied to queries and keys at
            integer frame positions, ``(b n)`` for the segment's tokens and ``(b h m)`` for
            memory keys (e.g. :func:`memkit.layers.apply_rotary`); ``None`` when the model
            has no rotary embedding. Must be the rotation the model applies itself. When it
            fails, :class:`memkit.AttachError` names the shapes it was given.
        batch_size: create the states now (on each layer's device and dtype unless
            ``device``/``dtype`` say otherwise); ``None`` creates them at first use, from the
            queries' batch, device and dtype.
        backend: attention backend (see :func:`memkit.attend`).

    Returns:
        The new, active :class:`MemorySession` (a context manager that detaches on exit).

    Example:
        >>> import torch, memkit
        >>> from torch import nn
        >>> from memkit.integrations import multihead_attention_adapter
        >>> class Host(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        ...     def forward(self, x):
        ...         return self.attn(x, x, x, need_weights=False)[0]
        >>> model, x = Host().eval(), torch.randn(1, 8, 16)   # a segment: 2 frames of 4 tokens
        >>> with memkit.attach(model, memkit.FIFOMemory(heads=2, head_dim=8, tokens_per_frame=4, frames=2),
        ...                    layers="attn", adapter=multihead_attention_adapter) as session:
        ...     session.set_segment(frame_positions=[0, 1])
        ...     y0 = model(x)               # reads (the memory is empty)
        ...     _ = session.commit(x)       # clean pass: writes frames 0 and 1
        ...     session.set_segment(frame_positions=[2, 3])
        ...     y1 = model(x)               # same input, now attending to frames 0 and 1 too
        >>> bool((y0 != y1).any()), "forward" in model.attn.__dict__
        (True, False)
    """
    return _attach(
        model,
        memory,
        layers,
        adapter,
        _ForwardInstaller,
        _ForwardInstaller.kind,
        rotary=rotary,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        backend=backend,
    )


def multihead_attention_adapter(module: nn.MultiheadAttention, attend: LayerAttend, *args: Any, **kwargs: Any) -> Any:
    """An :class:`AttentionAdapter` for ``torch.nn.MultiheadAttention`` used as self-attention.

    Supports ``batch_first=True`` modules with packed input projections, called as
    ``mha(x, x, x)`` without masks; returns ``(output (b n D), None)`` like
    ``need_weights=False``.

    Example:
        >>> import torch, memkit
        >>> from torch import nn
        >>> from memkit.integrations import multihead_attention_adapter
        >>> mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 8, 16)
        >>> want = mha(x, x, x, need_weights=False)[0]
        >>> with memkit.attach(mha, memkit.NoMemory(), layers="", adapter=multihead_attention_adapter) as s:
        ...     s.set_segment([0, 1])
        ...     got = mha(x, x, x)[0]
        >>> torch.allclose(got, want, atol=1e-6)
        True
    """
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    bound = dict(zip(names, args, strict=False)) | kwargs
    query = bound.get("query")
    if not isinstance(query, Tensor):
        raise AttachError("multihead_attention_adapter: expected the query tensor as the first argument")
    x: Tensor = query
    if not module.batch_first or not module._qkv_same_embed_dim:
        raise AttachError("multihead_attention_adapter needs batch_first=True and equal q/k/v embedding sizes")
    if bound.get("key") is not x or bound.get("value") is not x:
        raise AttachError("multihead_attention_adapter supports self-attention only: call mha(x, x, x)")
    if any(bound.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or bound.get("is_causal"):
        raise AttachError("multihead_attention_adapter does not support attention masks")
    assert module.in_proj_weight is not None  # packed projections were checked above
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, module.num_heads, -1)).permute(2, 0, 3, 1, 4)
    out = attend(q, k, v, hidden=x)
    return module.out_proj(out.transpose(1, 2).flatten(2)), None
