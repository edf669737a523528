"""Shape aliases, the checking switches, and shape checks with readable errors.

**Checks at the doors, trust inside.** memkit validates a user's data once, where it enters:
the public ``read``/``write`` of the memories, ``MemoryAttention.forward``, the backbone's
``forward``/``write``, :func:`memkit.attend` and the attached layers' ``attend``. What memkit
then hands from one of its own functions to another is trusted: a public entry point called
from inside another one (a layer reading its memory, a composition reading its members, the
backbone calling its layers) skips its jaxtyping check and its explicit checks, and the
:class:`memkit.Query`, :class:`memkit.Chunk` and :class:`memkit.Context` records memkit builds
itself are not validated again. A memory still checks the *state* it is handed at every read
and write (the state is the user's: it travels between calls), once per state object (the
check is cached), except inside a composition, which checks its members' states itself.

Two switches, both on by default:

* ``MEMKIT_CHECKS`` / :func:`set_checks`: **every** check at once, the jaxtyping checks, memkit's
  explicit checks and the non-finite check on written chunks. Off, memkit trusts every input
  (a bad one fails wherever torch notices, with torch's message): for long generation jobs
  whose shapes are known to be right.
* ``MEMKIT_TYPECHECK`` / :func:`set_typecheck`: the jaxtyping/beartype checks of public entry
  points alone (and the non-finite check, which waits for the device: a sync per write). Off,
  memkit's explicit checks still run and still name the dimension (they read only shapes,
  never values); the ``memkit`` command switches it off for its long jobs.

Inside ``torch.compile`` every check is skipped: jaxtyping and dynamo do not mix, and a
compiled graph has already been checked on its first eager call.
"""

import contextlib
import functools
import os
import re
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from jaxtyping import Bool, Float, Int, TypeCheckError, jaxtyped
from torch import Tensor

from memkit.errors import ShapeError

__all__ = [
    "Bool",
    "Float",
    "Int",
    "Tensor",
    "typecheck_enabled",
    "set_typecheck",
    "checks_enabled",
    "set_checks",
    "checking",
    "at_door",
    "outside",
    "trusted",
    "typechecked",
    "check_shape",
    "check_same_device",
    "DIM_NAMES",
]

_TYPECHECK: list[bool] = [os.environ.get("MEMKIT_TYPECHECK", "1") not in ("0", "false", "False", "")]
_CHECKS: list[bool] = [os.environ.get("MEMKIT_CHECKS", "1") not in ("0", "false", "False", "")]


class _Depth(threading.local):
    """Per thread: how many memkit entry points are running (``calls``) and trusted scopes (``trust``)."""

    calls = 0
    trust = 0


_DEPTH = _Depth()


def typecheck_enabled() -> bool:
    """Whether jaxtyping/beartype checks run at public entry points now (both switches on)."""
    return _TYPECHECK[0] and _CHECKS[0]


def set_typecheck(enabled: bool) -> bool:
    """Switch jaxtyping/beartype checking on or off for the whole process; returns the old value.

    memkit's explicit shape checks keep running (see :func:`set_checks` to switch off every check).

    Example:
        >>> from memkit.typing import set_typecheck
        >>> old = set_typecheck(False)   # e.g. for a long generation job
        >>> _ = set_typecheck(old)
    """
    old = _TYPECHECK[0]
    _TYPECHECK[0] = bool(enabled)
    return old


def checks_enabled() -> bool:
    """Whether memkit checks its inputs at all (the ``MEMKIT_CHECKS`` switch)."""
    return _CHECKS[0]


def set_checks(enabled: bool) -> bool:
    """The one switch for every check: jaxtyping, memkit's explicit checks, the non-finite check.

    Returns the old value. Off, nothing is validated: a malformed input fails wherever torch
    notices it, with torch's own message. The starting value comes from ``MEMKIT_CHECKS``
    (``1``, the default: on; ``0``: off).

    Example:
        >>> import torch, memkit
        >>> from memkit.typing import set_checks
        >>> old = set_checks(False)      # trust every input: no check of any kind
        >>> memkit.attend(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)).shape
        torch.Size([1, 2, 3, 8])
        >>> _ = set_checks(old)
    """
    old = _CHECKS[0]
    _CHECKS[0] = bool(enabled)
    return old


def checking() -> bool:
    """Whether a memory checks the state it is handed now (on, not compiling, not in :func:`trusted`)."""
    return _CHECKS[0] and not _DEPTH.trust and not torch.compiler.is_compiling()


def at_door() -> bool:
    """Whether the running entry point was called by the user (not by another memkit entry point).

    An entry point wrapped by :func:`typechecked` checks its arguments explicitly only when
    this is true: called from inside memkit, its inputs were checked where they entered.
    Outside any entry point (a plain function called by the user) it is true as well.
    """
    return _CHECKS[0] and _DEPTH.calls <= 1 and not _DEPTH.trust and not torch.compiler.is_compiling()


def outside() -> bool:
    """Whether no memkit entry point is running: a record built now comes from the user and is checked."""
    return _CHECKS[0] and not _DEPTH.calls and not _DEPTH.trust and not torch.compiler.is_compiling()


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Run memkit calls whose inputs were already checked (e.g. a composition's members) unchecked."""
    _DEPTH.trust += 1
    try:
        yield
    finally:
        _DEPTH.trust -= 1


F = TypeVar("F", bound=Callable[..., Any])

#: What each one-letter dimension in memkit's shape strings means.
DIM_NAMES: dict[str, str] = {
    "b": "batch",
    "h": "heads",
    "n": "tokens",
    "d": "head_dim",
    "m": "memory slots",
    "f": "frames",
    "t": "tokens per frame",
    "p": "prompt tokens",
    "e": "prompt dim",
    "D": "model dim",
    # the frame buffers of memkit's memory states (see each state's ``layouts``)
    "S": "sink frames",
    "W": "window frames",
    "C": "capacity",
    "A": "always-returned frames",
    "P": "bank candidates",
    "c": "metadata channels",
}


def typechecked(fn: F) -> F:
    """Mark ``fn`` a public entry point: check its jaxtyping annotations with beartype, unless switched off.

    Only the outermost entry point checks (see the module docstring): called from inside
    another one, ``fn`` runs unchecked, and :func:`at_door` tells its body so. A mismatch
    raises :class:`memkit.ShapeError` (the jaxtyping report, which lists every dimension it
    bound, is kept as the message and as ``__cause__``).
    """
    checked = jaxtyped(typechecker=_beartype())(fn)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        depth = _DEPTH
        outer = depth.calls
        depth.calls = outer + 1
        try:
            # only the outermost entry point checks: an inner one gets what memkit already checked
            if outer or depth.trust or not (_TYPECHECK[0] and _CHECKS[0]):
                return fn(*args, **kwargs)
            try:
                return checked(*args, **kwargs)
            except TypeCheckError as err:
                report = str(err)
                headline = summarize_typecheck_error(report)
                raise ShapeError(f"{headline}\n\n{report}" if headline else report) from err
        finally:
            depth.calls = outer

    # torch.compile keeps one cache per code object: every wrapper sharing one would make
    # the 9th compiled entry point hit dynamo's recompile limit, so each gets its own copy
    code = wrapper.__code__.replace(co_name=fn.__name__, co_qualname=f"typechecked.{fn.__qualname__}")
    unique = types.FunctionType(code, wrapper.__globals__, fn.__name__, wrapper.__defaults__, wrapper.__closure__)
    return functools.update_wrapper(unique, fn)  # type: ignore[return-value]


_DTYPE_KINDS = {"f": "floating-point", "bf": "floating-point", "i": "integer", "u": "integer", "bool": "boolean"}


def summarize_typecheck_error(report: str) -> str | None:
    """One line naming the offending argument and dimension, read off a jaxtyping report.

    jaxtyping lists every binding it made; this finds the first dimension of the failing
    argument whose size disagrees with an earlier binding (or a rank / dtype mismatch).
    Returns None when the report has another form.
    """
    param = re.search(r"typechecking parameter '([^']+)'", report)
    actual = re.search(r"Actual value: ([a-z]+)(\d*)\[([\d,]*)\]", report)
    expected = re.search(r"Expected type: <class '(\w+)\[\w+, '([^']*)'\]'>", report)
    if param and not expected:
        other = re.search(r"Expected type: <class '(?:[\w.]+\.)?(\w+)'>", report)
        value = re.search(r"Actual value: (\w+)", report)
        if other and value:
            return f"{param.group(1)}: expected a {other.group(1)}, got {value.group(1)}"
    if not (param and actual and expected):
        return None
    name = param.group(1)
    kind, spec = expected.group(1), expected.group(2).split()
    shape = [int(x) for x in actual.group(3).split(",") if x]
    dtype_kind = _DTYPE_KINDS.get(actual.group(1), actual.group(1))
    want_kind = {"Float": "floating-point", "Int": "integer", "Bool": "boolean"}.get(kind)
    if want_kind and dtype_kind != want_kind:
        return f"{name}: expected a {want_kind} tensor, got {actual.group(1)}{actual.group(2)}"
    if len(shape) != len(spec):
        return f"{name}: expected {len(spec)} dimensions ({' '.join(spec)}), got {len(shape)} with shape {tuple(shape)}"
    bindings = dict(re.findall(r"^(\w+)=(\d+)$", report, flags=re.MULTILINE))
    for dim, size in zip(spec, shape, strict=True):
        if dim in bindings and int(bindings[dim]) != size:
            return (
                f"{name}: dimension {_describe(dim)} should be {bindings[dim]}, got {size} "
                f"(shape ({' '.join(spec)}) = {tuple(shape)})"
            )
    return None


def _beartype() -> Any:
    from beartype import beartype

    return beartype


def _describe(dim: str) -> str:
    name = DIM_NAMES.get(dim)
    return f"{dim} ({name})" if name else dim


def check_shape(name: str, x: Tensor, spec: str, **expected: int) -> dict[str, int]:
    """Check that ``x`` has the layout ``spec`` (e.g. ``"b h n d"``) and sizes ``expected``.

    Returns the size bound to each dimension. Raises :class:`ShapeError` naming the
    dimension, what it should be and what it is.

    >>> check_shape("q", torch.zeros(2, 4, 8, 16), "b h n d", h=4)["n"]
    8
    """
    dims = spec.split()
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected a tensor of shape ({spec}), got {type(x).__name__}")
    if x.ndim != len(dims):
        raise ShapeError(f"{name}: expected {len(dims)} dimensions ({spec}), got {x.ndim} with shape {tuple(x.shape)}")
    sizes = dict(zip(dims, x.shape, strict=True))
    for dim, want in expected.items():
        if dim not in sizes:
            raise KeyError(f"check_shape: {dim!r} is not a dimension of {spec!r}")
        if sizes[dim] != want:
            raise ShapeError(
                f"{name}: dimension {_describe(dim)} should be {want}, got {sizes[dim]} "
                f"(shape ({spec}) = {tuple(x.shape)})"
            )
    return sizes


def check_integer(name: str, x: Tensor) -> None:
    """Refuse a non-tensor, or a floating-point or boolean tensor, where indices are expected."""
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected an integer tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ShapeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")


def check_bool(name: str, x: Tensor) -> None:
    """Refuse anything but a boolean tensor where a mask is expected."""
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected a boolean tensor, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise ShapeError(f"{name}: expected dtype torch.bool, got {x.dtype}")


def check_same_device(name: str, x: Tensor, device: torch.device) -> None:
    """Refuse a tensor that lives on another device than the state it meets."""
    if x.device != device:
        raise ShapeError(f"{name}: expected a tensor on device {device}, got one on {x.device}")


def check_floating(name: str, x: Tensor) -> None:
    """Refuse a non-tensor, or an integer or boolean tensor, where features are expected."""
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected a floating-point tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
