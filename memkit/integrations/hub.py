"""The hub: the sessions attached to one model, and how a routed call reaches the active one."""

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from memkit.errors import AttachError
from memkit.integrations.layer_attend import LayerAttend

if TYPE_CHECKING:
    from memkit.integrations.session import MemorySession

__all__ = ["Hub", "Installer", "MEMORIES_ATTR"]


class Installer(Protocol):
    kind: str

    def sync(self, hub: "Hub", modules: Mapping[nn.Module, str]) -> None:
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


class Hub:
    """The sessions attached to one model: the last one is active.

    The hub also registers every memory that is an ``nn.Module`` (parameters to train,
    e.g. :class:`memkit.RecurrentMemory`) on the host, as ``model.memkit_memories`` (an
    ``nn.ModuleDict`` keyed by the first layer using each memory, dots written as ``-``), so
    they are in ``model.parameters()`` and ``model.state_dict()``, move with ``model.to()``
    and follow ``model.train()``/``eval()``. Detaching the last session using a memory
    unregisters it; detaching the last session removes the attribute.
    """

    def __init__(self, model: nn.Module, installer: Installer) -> None:
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
