"""``MemorySession``: one stream's per-layer states for a model memkit gave memory.

:func:`attach_layers` is the one way a session is made, by every route
(:func:`memkit.attach`, :func:`memkit.integrations.attach_wan`): it selects the layers,
resolves their memories and adapters, and adds the session to the model's hub.
"""

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from memkit.errors import AttachError, ShapeError
from memkit.integrations.hub import Hub, Installer
from memkit.integrations.installers import hub_of
from memkit.integrations.layer_attend import AttachedLayer, AttentionAdapter
from memkit.integrations.layout import SegmentLayout, as_frame_positions
from memkit.integrations.selection import LayerMemories, LayerSelector, resolve_adapter, resolve_memory, select_layers
from memkit.layers.memory_attention import Rotate
from memkit.layers.states import load_layer_states, save_layer_states
from memkit.protocol import Memory
from memkit.state import LayerStates, check_state_matches, map_tensors, state_nbytes
from memkit.typing import check_floating, check_shape

__all__ = ["MemorySession", "attach_layers"]


def attach_layers(
    model: nn.Module,
    memory: LayerMemories,
    layers: LayerSelector | None,
    adapter: AttentionAdapter | Mapping[type, AttentionAdapter],
    installer: Callable[[], Installer],
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
    chosen = select_layers(model, layers)
    if isinstance(memory, Mapping):
        extra = sorted(set(memory) - {n for n, _ in chosen})
        if extra:
            raise AttachError(f"attach: the memory dict names {extra[0]!r}, which is not among the selected layers")
    resolved = [
        AttachedLayer(name, module, resolve_memory(memory, name, module), resolve_adapter(adapter, name, module))
        for name, module in chosen
    ]
    hubs = {h for m in model.modules() if (h := hub_of(m)) is not None}
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
        hub = Hub(model, installer())
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

    States: ``session.states`` is a :class:`memkit.state.LayerStates`, the container the
    reference backbone and :func:`memkit.init_memory_states` use, named by the attached
    layers (:attr:`layer_names`, in module order), with the same life cycle: made at attach
    and by :meth:`reset`, saved by :meth:`save_states` and loaded by :meth:`load_states`
    through :func:`memkit.layers.save_layer_states` / :func:`memkit.layers.load_layer_states`
    (the tensors of a file are named ``[0].window.k`` as for any per-layer states).

    Before first use: with ``batch_size`` given, every layer's empty state is made at
    attach (and at each :meth:`reset`), on ``device`` (default: the layer's parameters').
    With ``batch_size=None`` (the default), a layer's entry is ``None`` until the layer
    first runs; its state is then made from that call's queries (batch size, device,
    dtype), one layer at a time. Lazily, per layer, because a host may keep its layers
    on different devices or in different dtypes, or move them in only when they run
    (offloading): each state is made where its layer computes.

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
        hub: Hub,
        layers: list[AttachedLayer],
        *,
        rotary: Rotate | None,
        batch_size: int | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        backend: str,
    ) -> None:
        self._hub: Hub | None = hub
        self._model = hub.model
        self._layers = layers
        self._by_module = {layer.module: layer for layer in layers}
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names) or len(self._by_module) != len(layers):
            raise AttachError("attach: a layer was selected twice")
        self.rotary, self.backend = rotary, backend
        self._init = (batch_size, device, dtype)
        self._index = {name: i for i, name in enumerate(names)}
        self._states = LayerStates([None] * len(names), names)
        self._segment: SegmentLayout | None = None
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
    def states(self) -> LayerStates:
        """The per-layer states, a :class:`memkit.state.LayerStates` named by :attr:`layer_names`.

        ``None`` for a layer that has not run yet when the session was made with
        ``batch_size=None``. Read by name (``states["blocks.0.attn1"]``, ``keys()``,
        ``items()``, ``dict(states)``) or by position; iterating yields the states, not the
        names. States are immutable values: keep one to branch the stream and put it back
        with :meth:`set_states`.

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
            >>> session = memkit.attach(Host().eval(), memkit.FIFOMemory(2, 8, 4, frames=2), layers=["attn"],
            ...                         adapter=multihead_attention_adapter)
            >>> session.states                                       # no state before the layer first runs
            LayerStates(attn=None)
            >>> session.set_segment([0, 1])
            >>> x = torch.randn(3, 8, 16)                           # 3 streams, 2 frames of 4 tokens
            >>> _ = session.commit(x)
            >>> session.states, session.states["attn"].batch_size
            (LayerStates(attn=SinkWindowState), 3)
            >>> kept = session.states
            >>> _ = session.commit(x)
            >>> session.set_states(kept)                            # back to the branch point
            >>> session.states["attn"] is kept["attn"]
            True
            >>> session.detach()
        """
        return self._states

    def set_states(self, states: LayerStates | Mapping[str, Any]) -> None:
        """Replace the per-layer states (e.g. with ones kept from :attr:`states` earlier).

        Takes a :class:`memkit.state.LayerStates` or a ``{layer name: state}`` mapping; every
        attached layer needs an entry, in any order, and no other name may appear (else
        :class:`memkit.AttachError`). ``None`` means "not created yet" (made at first use).
        A state its layer's memory would not have made (another class or configuration,
        e.g. a window of 5 frames for a window of 2) is refused with :class:`memkit.StateError`
        naming the layer, the field and the dimension.
        """
        if isinstance(states, LayerStates):
            given: Mapping[str, Any] = dict(states.items())
        elif isinstance(states, Mapping):
            given = states
        else:
            raise AttachError(
                f"set_states: expected a LayerStates or a {{layer name: state}} dict, got {type(states).__name__} "
                f"(a plain tuple does not say which layer each state is for: LayerStates(states, names))"
            )
        unknown = sorted(set(given) - set(self.layer_names), key=str)
        if unknown:
            raise AttachError(f"set_states: {unknown[0]!r} is not an attached layer (layers: {self.layer_names})")
        missing = sorted(set(self.layer_names) - set(given))
        if missing:
            raise AttachError(f"set_states: no state for layer {missing[0]!r}")
        for layer in self._layers:
            state = given[layer.name]
            if state is not None:
                check_state_matches(f"set_states: layer {layer.name!r}", state, layer.memory)
        self._states = LayerStates((given[name] for name in self.layer_names), self.layer_names)

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

        self._states = map_tensors(move, self._states)
        return self

    def save_states(self, path: str | os.PathLike[str]) -> None:
        """Save every layer's state to one file (:func:`memkit.save_states` format), atomically.

        Works at any point of the stream, also before the first segment (a session made
        with ``batch_size=None`` then holds no state yet, and the file says so). Each
        layer's memory class and configuration are recorded and checked by :meth:`load_states`.
        Saved by :func:`memkit.layers.save_layer_states`, as every container of per-layer
        states: the tensors are named by the layer's place (``[0].window.k``).
        """
        save_layer_states(path, self._states, [layer.memory for layer in self._layers])

    def load_states(self, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> None:
        """Load states saved by :meth:`save_states` into this session (no template needed).

        The file's tensors say the batch size and dtype; the states land on ``device``
        (default: the session's ``device``, else each layer's parameters' device). Refused
        with :class:`memkit.CheckpointError`, saying what differs, when the file was saved by
        a session with other layers or memories, or is damaged. Layers the file holds no
        state for start empty (``None`` until first use with ``batch_size=None``). Works
        before the first segment. Read by :func:`memkit.layers.load_layer_states`, which also
        reads files saved before sessions kept a :class:`memkit.state.LayerStates` (tensors
        named by layer, ``['blocks.0.attn1'].window.k``).
        """
        layers = self._layers

        def template(i: int, batch: int, dtype: torch.dtype | None) -> Any:
            return self._new_state(layers[i], batch, device=device, dtype=dtype)

        memories = [layer.memory for layer in layers]
        loaded = load_layer_states(path, self.layer_names, memories, template, absent_as_none=True)
        fresh = self._fresh()
        self._states = loaded.with_states(f if s is None else s for s, f in zip(loaded, fresh, strict=True))

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's state (constant over a stream once created)."""
        return state_nbytes(self._states)

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
        self._states = self._fresh()

    def _fresh(self) -> LayerStates:
        """Empty states, or ``None`` for every layer when the batch size is learnt at first use."""
        batch_size, device, dtype = self._init
        if batch_size is None:
            return LayerStates([None] * len(self._layers), self.layer_names)
        return LayerStates(
            (self._new_state(layer, batch_size, device=device, dtype=dtype) for layer in self._layers),
            self.layer_names,
        )

    def _new_state(
        self, layer: AttachedLayer, batch_size: int, *, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> Any:
        """An empty state on ``device`` (default: the session's, else the layer's parameters')."""
        _, init_device, init_dtype = self._init
        params = [p for p in layer.module.parameters() if p.is_floating_point()]
        dev = device if device is not None else init_device if init_device is not None else None
        dev = dev if dev is not None else (params[0].device if params else None)
        dt = dtype if dtype is not None else init_dtype if init_dtype is not None else None
        dt = dt if dt is not None else (params[0].dtype if params else None)
        return layer.memory.init_state(batch_size, device=dev, dtype=dt)

    def _state_for(self, layer: AttachedLayer, q: Tensor) -> Any:
        i = self._index[layer.name]
        state = self._states[i]
        if state is None:
            _, _, dtype = self._init
            state = layer.memory.init_state(int(q.shape[0]), device=q.device, dtype=dtype or q.dtype)
            self._states = self._states.with_states((*self._states[:i], state, *self._states[i + 1 :]))
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
        fp = as_frame_positions(frame_positions)
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
        self._segment = SegmentLayout(fp, tokens_per_frame, prompt, prompt_mask)

    @property
    def segment(self) -> SegmentLayout | None:
        """The current :class:`SegmentLayout`, or ``None`` before :meth:`set_segment`."""
        return self._segment

    def _require_segment(self) -> SegmentLayout:
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

    def _require_attached(self) -> Hub:
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
        self._states = self._states.with_states(staged.get(name, s) for name, s in self._states.items())
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
