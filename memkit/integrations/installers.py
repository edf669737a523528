"""Forward installers: how a module's calls are routed through the hub, and found again.

:class:`ForwardInstaller` (the :func:`memkit.attach` route) puts memkit's function at the
bottom of a module's forward chain, below any diffusers or accelerate hooks;
:func:`hub_of` finds the hub a module is routed through, by either route (forward or a
diffusers attention processor), from the module itself.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from memkit.integrations.hub import Hub

__all__ = ["ForwardInstaller", "hub_of"]


def hub_of(module: nn.Module) -> "Hub | None":
    """The hub a module is routed through, if any (found from the module itself: no globals)."""
    for _, _, fn in _forward_slots(module):
        route = getattr(fn, "_memkit_route", None)
        # `is`: diffusers copies a wrapped function's attributes onto its own wrapper
        if isinstance(route, _Route) and route.forward is fn and route.module is module and route.active:
            return route.hub
    hub = getattr(getattr(module, "processor", None), "_memkit_hub", None)
    return hub if isinstance(hub, Hub) else None


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

    hub: Hub
    module: nn.Module
    original: Callable[..., Any]  # what stood where memkit's function stands now
    had_instance_forward: bool
    forward: Callable[..., Any] = dataclasses.field(init=False)
    active: bool = True


class ForwardInstaller:
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

    def sync(self, hub: Hub, modules: Mapping[nn.Module, str]) -> None:
        for module in [m for m in self._saved if m not in modules]:
            self._unpatch(module)
        for module in modules:
            if module not in self._saved:
                self._patch(hub, module)

    def restore(self) -> None:
        for module in list(self._saved):
            self._unpatch(module)

    def _patch(self, hub: Hub, module: nn.Module) -> None:
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
