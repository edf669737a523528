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

from collections.abc import Mapping

import torch
from torch import nn

from memkit.integrations.adapters import multihead_attention_adapter
from memkit.integrations.installers import ForwardInstaller
from memkit.integrations.layer_attend import AttentionAdapter, LayerAttend
from memkit.integrations.layout import SegmentLayout
from memkit.integrations.selection import LayerMemories, LayerSelector
from memkit.integrations.session import MemorySession, attach_layers
from memkit.layers.memory_attention import Rotate

__all__ = [
    "attach",
    "MemorySession",
    "SegmentLayout",
    "LayerAttend",
    "AttentionAdapter",
    "LayerSelector",
    "LayerMemories",
    "multihead_attention_adapter",
]


def attach(
    model: nn.Module,
    memory: LayerMemories,
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
    return attach_layers(
        model,
        memory,
        layers,
        adapter,
        ForwardInstaller,
        ForwardInstaller.kind,
        rotary=rotary,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        backend=backend,
    )
