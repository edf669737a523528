"""``LayerStates``: the one container of a model's per-layer memory states.

A tuple of states in layer order that also reads by layer name. The reference backbone, the
tiny host (:func:`memkit.init_memory_states`) and :class:`memkit.integrations.MemorySession`
all keep their states in it; its life cycle (init, reset, save, load) lives in
:mod:`memkit.layers.states`. Also importable as ``memkit.state.LayerStates``.
"""

from typing import Any

import torch.utils._pytree as pytree

from memkit.errors import StateError

__all__ = ["LayerStates"]


class LayerStates(tuple):
    """A model's memory states, one per memory layer in module order, each under its layer's name.

    A tuple (indexing, ``len``, unpacking and iteration work as on the tuples models returned
    before) that also reads by layer name like a read-only mapping: ``states["blocks.0.attn"]``,
    ``"blocks.0.attn" in states``, :meth:`keys` (the names), :meth:`values`, :meth:`items`,
    :meth:`get`, and ``dict(states)`` gives ``{name: state}``. Iterating yields the *states*,
    as a tuple does, not the names as a dict would: ``set(states)`` is a set of states; use
    ``states.names`` (or ``keys()``) for the names.

    It is a pytree like any state, so :func:`memkit.state.map_tensors`, ``torch.compile`` and
    :func:`memkit.save_states` see through it; its tensors are named in a file exactly as a
    plain tuple's (``[0].window.k``), so files saved from tuples load into it and back. An
    entry is ``None`` for a :class:`~memkit.integrations.MemorySession`'s layer that has not
    run yet (a session made without a batch size); it holds no tensors, so a file holds
    nothing for it.

    One life cycle for the reference backbone, the tiny host and a session:
    :func:`memkit.init_memory_states` makes it (a fresh one is the reset);
    :func:`memkit.layers.save_layer_states` / :func:`memkit.layers.load_layer_states` save and
    load it, the layers' memories recorded and checked (through
    :func:`memkit.layers.save_memory_states` / :func:`memkit.layers.load_memory_states` for a
    model's :class:`memkit.MemoryAttention` layers, ``session.save_states`` /
    ``session.load_states`` for a model given memory by :func:`memkit.attach`).

    Attributes:
        names: the layers' names (``model.named_modules()``), in the order of the states.

    Example:
        >>> import torch, memkit
        >>> model = torch.nn.ModuleDict({"a": memkit.MemoryAttention(8, 2, memkit.FIFOMemory(2, 4, 1, frames=2)),
        ...                              "b": memkit.MemoryAttention(8, 2)})
        >>> states = memkit.init_memory_states(model, 1)
        >>> states.names, type(states["a"]).__name__, states[1] is states["b"]
        (('a', 'b'), 'SinkWindowState', True)
        >>> "a" in states, states.keys(), list(dict(states)) == list(states.names), states.get("c") is None
        (True, ('a', 'b'), True, True)
    """

    names: tuple[str, ...]

    def __new__(cls, states: Any, names: Any) -> "LayerStates":
        self = super().__new__(cls, states)
        self.names = tuple(str(n) for n in names)
        if len(self.names) != len(self) or len(set(self.names)) != len(self.names):
            raise StateError(
                f"LayerStates: expected one distinct name per state ({len(self)} states), got names {self.names}"
            )
        return self

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return super().__getitem__(self.names.index(key))
            except ValueError:
                raise KeyError(f"no memory layer named {key!r}; layers: {', '.join(self.names)}") from None
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        # a state is never a str: a name asks the mapping question, anything else the tuple's
        return key in self.names if isinstance(key, str) else super().__contains__(key)

    def keys(self) -> tuple[str, ...]:
        """The layers' names, in layer order (what ``dict(states)`` and ``{**states}`` key by)."""
        return self.names

    def values(self) -> tuple[Any, ...]:
        """The states, in layer order (the tuple itself, as a plain tuple)."""
        return tuple(self)

    def items(self) -> list[tuple[str, Any]]:
        """``(layer name, state)`` pairs, in layer order."""
        return list(zip(self.names, self, strict=True))

    def get(self, name: str, default: Any = None) -> Any:
        """The state of layer ``name``, or ``default`` when no layer has that name."""
        return self[name] if isinstance(name, str) and name in self.names else default

    def with_states(self, states: Any) -> "LayerStates":
        """The same layers holding ``states`` (one per layer, in order)."""
        return LayerStates(states, self.names)

    def __reduce__(self) -> tuple[Any, ...]:
        return (LayerStates, (tuple(self), self.names))

    def __repr__(self) -> str:
        shown = (f"{n}={'None' if s is None else type(s).__name__}" for n, s in self.items())
        return "LayerStates(" + ", ".join(shown) + ")"


pytree.register_pytree_node(
    LayerStates,
    lambda s: (list(s), s.names),
    lambda children, names: LayerStates(children, names),
    serialized_type_name="memkit.state.LayerStates",
)
