"""Memory state: immutable dataclasses of tensors that are torch pytrees.

A memory module holds parameters only; everything that changes from segment to segment
lives in a state object that flows in and out of ``read`` and ``write``. Declaring a
state is one decorator::

    @memory_state
    class MyState(MemoryState):
        keys: Tensor      # (b h m d)
        count: Tensor     # (b,)

Every field is a tensor (or ``None``) whose first dimension is the batch, so batch
selection, ``.to(device)``, ``detach()`` and pytree maps work on any state. Shapes are
fixed by ``init_state``: nothing grows with the length of the video.
"""

import contextlib
import dataclasses
import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar, dataclass_transform

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from memkit.errors import ShapeError, StateError
from memkit.layer_states import LayerStates
from memkit.typing import DIM_NAMES, checking

__all__ = [
    "MemoryState",
    "memory_state",
    "state_nbytes",
    "map_tensors",
    "check_init_args",
    "check_state_matches",
    "tensor_paths",
    "map_tensor_paths",
    "LayerStates",
    "state_classes",
]

S = TypeVar("S")
T = TypeVar("T", bound="MemoryState")


def map_tensors(fn: Callable[[Tensor], Tensor], tree: S) -> S:
    """Apply ``fn`` to every tensor leaf of a pytree (states, tuples of states...)."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, Tensor) else x, tree)


def state_nbytes(tree: Any) -> int:
    """Bytes held by every tensor in a pytree of states."""
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(tree) if isinstance(x, Tensor))


class MemoryState:
    """Base class of memory states (use with :func:`memory_state`).

    Methods return new states; a state is never changed in place.
    """

    # the first data field (the first child of the pytree), set by @memory_state: batch_size reads it
    _first_field: ClassVar[str | None] = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant over a stream)."""
        return state_nbytes(self)

    @property
    def batch_size(self) -> int:
        """The batch size the state was made for (the first dimension of its tensors)."""
        # every read and write asks: the first field answers in most states without flattening the tree
        name = type(self)._first_field
        if name is not None:
            first = getattr(self, name)
            if isinstance(first, Tensor):
                return int(first.shape[0])
            if isinstance(first, MemoryState):
                with contextlib.suppress(StateError):
                    return first.batch_size
        for leaf in pytree.tree_leaves(self):
            if isinstance(leaf, Tensor):
                return int(leaf.shape[0])
        raise StateError(f"{type(self).__name__} has no tensors, so no batch size")

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields replaced (the dataclasses.replace of this state)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to(self: T, *args: Any, **kwargs: Any) -> T:
        """Move or cast every tensor, as ``Tensor.to``; integer and boolean tensors keep their dtype."""

        def move(x: Tensor) -> Tensor:
            if x.is_floating_point():
                return x.to(*args, **kwargs)
            device = kwargs.get("device")
            for a in args:
                if isinstance(a, (torch.device, str)):
                    device = a
            return x.to(device=device) if device is not None else x

        return map_tensors(move, self)

    def detach(self: T) -> T:
        """Cut the autograd history of every tensor (truncated backprop between segments)."""
        return map_tensors(Tensor.detach, self)

    def index_batch(self: T, index: int | slice | Tensor | list[int]) -> T:
        """Select batch items; an integer keeps the batch dimension (size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return map_tensors(lambda x: x[index], self)


@dataclass_transform(frozen_default=True, eq_default=False)
def memory_state(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass registered as a torch pytree.

    Its fields become the pytree's children, in declaration order, so
    ``torch.utils._pytree.tree_map``, ``torch.compile`` and ``torch.save`` see through it.
    """
    dc = dataclasses.dataclass(frozen=True, eq=False)(cls)
    pytree.register_dataclass(dc)
    fields = dataclasses.fields(dc)  # type: ignore[arg-type]  # dc is a dataclass now
    dc._first_field = fields[0].name if fields else None
    return dc


def state_classes(tree: Any) -> list[type]:
    """Every :class:`MemoryState` class in a pytree of states, sub-states included, sorted by name.

    What ``torch.load(weights_only=True)`` must be allowed to rebuild a ``torch.save`` of the states.

    Example:
        >>> import torch, memkit
        >>> states = (memkit.FIFOMemory(1, 2, 1).init_state(1), memkit.FIFOMemory(1, 2, 1).init_state(1))
        >>> ", ".join(c.__name__ for c in state_classes(states))
        'FrameBuffer, SinkWindowState'
        >>> with torch.serialization.safe_globals(state_classes(states)):
        ...     pass  # torch.load(path, weights_only=True) here
    """
    found: dict[str, type] = {}

    def visit(node: Any) -> None:
        if isinstance(node, MemoryState):
            found[f"{type(node).__module__}.{type(node).__qualname__}"] = type(node)
        if node is not None and not isinstance(node, Tensor):
            for _, child, _ in _children(node, ""):
                visit(child)

    visit(tree)
    return sorted(found.values(), key=lambda c: (c.__name__, c.__module__))


def like_states(template: Any, states: Any) -> tuple[Any, ...]:
    """``states`` in ``template``'s container: a :class:`LayerStates` with its names, else a tuple."""
    if isinstance(template, LayerStates):
        return template.with_states(states)
    return tuple(states)


# ----------------------------------------------------------------------------------- field paths
# memkit names the tensors of a state by its own field paths (``[0].window.k``,
# ``['blocks.0.attn'].states[1].k``), never by torch's pytree key types and their formatting,
# which differ between torch versions (a registered dataclass's fields were mapping keys in
# some): saved files and messages must not change under a torch upgrade. The order is the
# pytree's leaf order. The spelling is the one ``torch.utils._pytree.keystr`` gave in the torch
# versions memkit's state files were first written with, so those files still load.


def _children(node: Any, path: str) -> Iterator[tuple[str, Any, str | None]]:
    """``(path, child, field)`` of one container (``field``: the state field, for a MemoryState)."""
    if isinstance(node, MemoryState) and dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield f"{path}.{f.name}", getattr(node, f.name), f.name
    elif isinstance(node, tuple) and hasattr(node, "_fields"):  # a namedtuple
        for name in node._fields:
            yield f"{path}.{name}", getattr(node, name), None
    elif isinstance(node, (tuple, list)):
        for i, child in enumerate(node):
            yield f"{path}[{i}]", child, None
    elif isinstance(node, dict):
        for key, child in node.items():
            yield f"{path}[{key!r}]", child, None
    else:
        raise StateError(
            f"state{path} is a {type(node).__name__}: states hold tensors (or None) in @memory_state classes, "
            "tuples, lists and dicts"
        )


def _walk(
    tree: Any, path: str = "", holders: tuple[tuple[Any, str], ...] = ()
) -> Iterator[tuple[str, Tensor, tuple[tuple[Any, str], ...]]]:
    """Every tensor as ``(path, tensor, holders)``: the ``(state, field)`` pairs holding it, outermost first."""
    if isinstance(tree, Tensor):
        yield path or "[]", tree, holders
    elif tree is not None:
        for p, child, f in _children(tree, path):
            yield from _walk(child, p, holders if f is None else (*holders, (tree, f)))


def tensor_paths(tree: Any) -> list[tuple[str, Tensor]]:
    """Every tensor of a pytree of states with memkit's field path to it, in pytree order.

    Example:
        >>> import memkit
        >>> state = memkit.FIFOMemory(heads=1, head_dim=2, tokens_per_frame=1, frames=2).init_state(1)
        >>> [path for path, _ in tensor_paths((state,))][:3]
        ['[0].sink.k', '[0].sink.v', '[0].sink.pos']
    """
    return [(p, x) for p, x, _ in _walk(tree)]


def map_tensor_paths(fn: Callable[[str, Tensor], Tensor], tree: S) -> S:
    """``tree`` rebuilt with ``fn(path, tensor)`` in place of every tensor (the structure kept)."""
    rebuilt: S = _rebuild(fn, tree, "")
    return rebuilt


def _rebuild(fn: Callable[[str, Tensor], Tensor], tree: Any, path: str) -> Any:
    if isinstance(tree, Tensor):
        return fn(path or "[]", tree)
    if tree is None:
        return None
    children = list(_children(tree, path))
    values = [_rebuild(fn, child, p) for p, child, _ in children]
    if isinstance(tree, MemoryState):
        return tree.replace(**{f: v for (_, _, f), v in zip(children, values, strict=True) if f is not None})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*values)
    if isinstance(tree, LayerStates):
        return tree.with_states(values)
    if isinstance(tree, (tuple, list)):
        return type(tree)(values)
    return type(tree)(zip(tree.keys(), values, strict=True))


def check_init_args(owner: str, batch_size: Any, device: Any = None, dtype: Any = None) -> int:
    """Refuse ``init_state`` arguments no memory can use; returns ``batch_size`` as an int.

    One rule for every memory: ``batch_size`` is an integer (not a bool) of at least 1,
    ``device`` is ``None`` or something ``torch.device`` accepts, and ``dtype`` is ``None`` or
    a floating-point ``torch.dtype``. Raises :class:`memkit.ShapeError` saying which.

    Example:
        >>> check_init_args("MyMemory.init_state", 2)
        2
        >>> check_init_args("MyMemory.init_state", 0)
        Traceback (most recent call last):
        ...
        memkit.errors.ShapeError: MyMemory.init_state: batch_size must be an int >= 1 (streams), got 0
    """
    try:
        size = operator.index(batch_size)  # int, numpy and 0-d integer tensors; never float
    except TypeError:
        size = None
    if isinstance(batch_size, bool) or size is None or size < 1 or getattr(batch_size, "ndim", 0) != 0:
        raise ShapeError(f"{owner}: batch_size must be an int >= 1 (streams), got {batch_size!r}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ShapeError(f"{owner}: device {device!r} is not a torch device ({err})") from None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ShapeError(f"{owner}: dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    return size


class _Seen:
    """What :func:`check_state_matches` knows about one memory: templates and states already checked."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.templates: dict[tuple[int, torch.dtype | None], tuple[Any, list[Any]]] = {}
        self.ok: weakref.WeakSet[Any] = weakref.WeakSet()


_SEEN: "weakref.WeakKeyDictionary[Any, _Seen]" = weakref.WeakKeyDictionary()


def _settings(memory: Any) -> tuple[Any, ...]:
    """The plain settings of a memory: templates made before one of them changed are stale."""
    plain = (int, float, str, bool, type(None))
    return tuple((k, v) for k, v in vars(memory).items() if isinstance(v, plain) and k != "training")


def _seen(memory: Any) -> _Seen | None:
    try:
        seen = _SEEN.get(memory)
        if seen is None:
            seen = _SEEN[memory] = _Seen()
    except TypeError:  # neither hashable nor weakly referable: no cache
        return None
    key = _settings(memory) if hasattr(memory, "__dict__") else ()
    if seen.key != key:
        seen.key, seen.templates, seen.ok = key, {}, weakref.WeakSet()
    return seen


def _template(
    memory: Any, seen: _Seen | None, batch: int, dtype: torch.dtype | None, device: Any
) -> tuple[Any, list[Any]]:
    """``(treespec, leaves)`` of ``memory.init_state(batch)``: on the meta device (nothing allocated), cached."""
    cached = seen.templates.get((batch, dtype)) if seen is not None else None
    if cached is not None:
        return cached
    try:
        template, meta = memory.init_state(batch, device="meta", dtype=dtype), True
    except Exception:  # a memory whose init_state cannot run on the meta device: build it for real
        template, meta = memory.init_state(batch, device=device, dtype=dtype), False
    leaves, spec = pytree.tree_flatten(template)
    described = [(tuple(x.shape), x.dtype) if isinstance(x, Tensor) else x for x in leaves]
    if meta and seen is not None:
        seen.templates[(batch, dtype)] = (spec, described)
    return spec, described


def _short(memory: Any) -> str:
    """A memory's one-line repr (an ``nn.Module``'s repr lists its submodules over many lines)."""
    text = repr(memory)
    if "\n" in text and callable(getattr(memory, "extra_repr", None)):
        text = f"{type(memory).__name__}({memory.extra_repr()})"
    return text.splitlines()[0] if text else type(memory).__name__


def _describe_dim(holders: tuple[tuple[Any, str], ...], axis: int) -> str:
    """``"W (window frames)"`` when the state classes declare the field's layout, else ``"<axis>"``.

    The innermost state's declaration of the field holding the tensor gives the letters; a
    sub-state's generic ``F`` (e.g. a :class:`memkit.memories.frames.FrameBuffer`'s slots) takes the
    letter its holder declares for the field holding it (``layouts = {"window": "W"}``).
    """
    layouts = [getattr(type(owner), "layouts", {}).get(field) for owner, field in holders]
    letters = layouts[-1].split() if layouts and isinstance(layouts[-1], str) else []
    if axis < len(letters):
        letter = letters[axis]
        for outer in reversed(layouts[:-1]):
            if letter != "F":
                break
            if isinstance(outer, str) and len(outer.split()) == 1:
                letter = outer
        return f"{letter} ({DIM_NAMES[letter]})" if letter in DIM_NAMES else letter
    return str(axis)


def check_state_matches(owner: str, state: Any, memory: Any) -> None:
    """Refuse a state that ``memory`` would not have made: another configuration, batch mix-up, dtype or device.

    Compares the state's structure and every tensor's shape and dtype with what
    ``memory.init_state(batch, dtype=...)`` makes for the state's own batch size and
    floating dtype (built on the ``meta`` device, so nothing is allocated, and cached), and
    checks that every tensor lives on one device. A state already found to match is not
    checked again (states are immutable), so reading one state at every denoising step costs
    one lookup. Skipped inside ``torch.compile``. Raises :class:`memkit.StateError` naming
    the field and the dimension that differ, e.g.
    ``"SinkWindowMemory.read: state.window.k: dimension W (window frames) should be 3, got 5 ..."``.

    A memory's ``init_state`` should run on ``device="meta"`` (only shapes are needed);
    otherwise the template is built on the state's device at each check.

    Example:
        >>> import memkit
        >>> from memkit.state import check_state_matches
        >>> small, big = memkit.FIFOMemory(2, 8, 4, frames=3), memkit.FIFOMemory(2, 8, 4, frames=5)
        >>> check_state_matches("read", small.init_state(1), small)      # its own state: fine
        >>> try:
        ...     check_state_matches("read", big.init_state(1), small)
        ... except memkit.StateError as err:
        ...     print(str(err)[:71])
        read: state.window.k: dimension W (window frames) should be 3, got 5 (t
    """
    if not checking():  # switched off (memkit.typing.set_checks), compiling, or already checked
        return
    seen = _seen(memory)
    if seen is not None:
        try:
            if state in seen.ok:
                return
        except TypeError:
            pass
    leaves, spec = pytree.tree_flatten(state)
    tensors = [x for x in leaves if isinstance(x, Tensor)]
    first = tensors[0] if tensors else None
    if first is not None and first.ndim == 0:
        raise StateError(f"{owner}: a state tensor with no dimensions; every state tensor has the batch as dimension 0")
    batch = int(first.shape[0]) if first is not None else 1
    if batch < 1:
        raise StateError(f"{owner}: the state holds {batch} streams (dimension b of its tensors); at least 1 is needed")
    dtype = next((x.dtype for x in tensors if x.is_floating_point()), None)
    t_spec, t_leaves = _template(memory, seen, batch, dtype, first.device if first is not None else None)
    if spec != t_spec or any(
        isinstance(x, Tensor) != isinstance(t, tuple) for x, t in zip(leaves, t_leaves, strict=False)
    ):
        try:
            have = [p for p, _ in tensor_paths(state)]
        except StateError:
            have = []
        raise StateError(
            f"{owner}: the state's structure differs from what {_short(memory)} makes ({len(t_leaves)} leaves; "
            f"the state has {len(leaves)}: {', '.join('state' + h for h in have[:12]) or 'none'}): "
            "a state of another memory?"
        )
    device = first.device if first is not None else None
    bad = None
    for i, (x, t) in enumerate(zip(leaves, t_leaves, strict=True)):
        if isinstance(x, Tensor) and (tuple(x.shape) != t[0] or x.dtype != t[1] or x.device != device):
            bad = i
            break
    if bad is None:
        if seen is not None:
            try:
                seen.ok.add(state)
            except TypeError:
                pass
        return
    path, _, holders = list(_walk(state))[sum(isinstance(x, Tensor) for x in leaves[:bad])]
    name = "state" + path
    x, (shape, want_dtype) = leaves[bad], t_leaves[bad]
    if x.device != device:
        raise StateError(f"{owner}: {name} is on {x.device} but the state's first tensor is on {device}")
    if tuple(x.shape) != shape:
        if x.ndim != len(shape):
            detail = f"has {x.ndim} dimensions {tuple(x.shape)}, expected {len(shape)}"
        else:
            axis = next(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if a != b)
            detail = f"dimension {_describe_dim(holders, axis)} should be {shape[axis]}, got {x.shape[axis]}"
        raise StateError(
            f"{owner}: {name}: {detail} (the state has shape {tuple(x.shape)}, {_short(memory)} makes {shape}): "
            "a state made by a memory of another configuration?"
        )
    raise StateError(
        f"{owner}: {name}: dtype should be {want_dtype}, got {x.dtype} ({_short(memory)} makes its state in one "
        "floating dtype, with integer counters and boolean masks)"
    )
