"""Memory for diffusers' ``WanTransformer3DModel`` (Wan 2.1 / 2.2) and Wan-derived models' self-attention.

Wan-derived models (SkyReels-V2, the autoregressive diffusion-forcing one) are recognised
by their structure (diffusers processors, Wan's rotary, Wan-style ``attn1``), not their
class. A mask the host passes to ``attn1`` (SkyReels-V2's block-causal mask, one block of
``num_frame_per_block`` frames attending to itself and earlier blocks) is followed for the
segment's own tokens; memory slots, being earlier chunks, are visible to every query.

:func:`attach_wan` installs a :class:`WanMemoryProcessor` on the chosen ``attn1`` layers
with diffusers' own ``set_attn_processor`` and returns a :class:`memkit.MemorySession`.
diffusers does not forward per-call arguments to Wan's processors, so everything a call
needs (the states, the segment's frame positions) lives in that session object: never in
globals. Detaching puts the very same stock processor objects back.

The math is the stock ``WanAttnProcessor``'s (projections, ``norm_q``/``norm_k`` across
heads, Wan's interleaved 3-D rotary, output projection); only the attention core is
memkit's. Wan's rotary embedding splits each head's channels into a time part (rotated
by frame index) and height/width parts (rotated by the token's row and column). A memory
key is rotated with the time part at the frame index it was *recorded* at and the
spatial part of its place in the frame. Because rotary attention depends only on
position differences, memkit counts frames from the current segment's first frame: the
segment itself is rotated exactly as stock Wan rotates a clip (so ``NoMemory`` reproduces
the stock output), memory frames sit at their true (negative) distance, and a stream can
run past Wan's ``rope_max_seq_len`` frames.

diffusers is imported only when :func:`attach_wan` runs, never by ``import memkit``.
"""

import functools
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from memkit.errors import AttachError, ShapeError
from memkit.integrations import selection, session
from memkit.integrations.hub import Hub
from memkit.integrations.layer_attend import LayerAttend
from memkit.integrations.selection import LayerMemories, LayerSelector
from memkit.integrations.session import MemorySession
from memkit.layers.memory_attention import Rotate

__all__ = ["attach_wan", "WanMemoryProcessor", "WanSelfAttentionAdapter", "wan_rotary_freqs", "memkit_backend"]


def _require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "memkit.integrations.diffusers_wan needs diffusers >= 0.36 with the Wan transformer: "
            "pip install 'memkit-video[diffusers]'"
        ) from err


def wan_rotary_freqs(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Wan's rotary ``cos, sin`` for one axis at integer ``positions``, ``(...) -> (... dim)``.

    The same numbers as the rows of ``WanRotaryPosEmbed``'s table (float64 angles,
    each frequency repeated for its channel pair, float32 result), at any position,
    negative or past ``rope_max_seq_len``.

    Example:
        >>> import torch
        >>> from memkit.integrations.diffusers_wan import wan_rotary_freqs
        >>> cos, sin = wan_rotary_freqs(torch.tensor([0, 3]), dim=8)
        >>> cos.shape, cos[0].tolist() == [1.0] * 8
        (torch.Size([2, 8]), True)
    """
    dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim))
    angles = positions.to(dtype)[..., None] * freqs
    cos = angles.cos().repeat_interleave(2, dim=-1).float()
    sin = angles.sin().repeat_interleave(2, dim=-1).float()
    return cos, sin


def _wan_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # stock WanAttnProcessor's apply_rotary_emb: channel pairs (2i, 2i+1) rotate together
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttentionAdapter:
    """The :class:`memkit.integrations.AttentionAdapter` for a Wan self-attention layer.

    Runs the stock ``WanAttnProcessor`` math for ``attn1`` (fused or separate
    projections, ``norm_q``/``norm_k``, Wan rotary, ``to_out``) with memkit's attention
    core in the middle; the rotary of each call comes from Wan's own ``rotary_emb``
    (spatial part) and :func:`wan_rotary_freqs` (time part, counted from the segment's
    first frame).

    Args:
        t_dim: channels of the time part of Wan's rotary (``transformer.rope.t_dim``).
        theta: rotary base (Wan: 10000).

    Example:
        >>> from memkit.integrations import WanSelfAttentionAdapter
        >>> WanSelfAttentionAdapter(t_dim=8)
        WanSelfAttentionAdapter(t_dim=8, theta=10000.0)
    """

    def __init__(self, t_dim: int, theta: float = 10000.0) -> None:
        self.t_dim, self.theta = t_dim, theta
        self._checked: tuple[weakref.ref[Tensor], int] | None = None

    def __call__(
        self,
        attn: Any,
        attend: LayerAttend,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is not None or kwargs:
            raise AttachError(
                f"{attend.name}: memkit's Wan processor handles self-attention; it was called with "
                "encoder_hidden_states or extra arguments"
            )
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
        rotate = None
        if rotary_emb is not None:
            frame_positions, tokens_per_frame = attend.layout(q)
            rotate = self.rotary(rotary_emb, frame_positions[:, 0], tokens_per_frame)
        backend = memkit_backend(getattr(getattr(attn, "processor", None), "_attention_backend", None))
        # SkyReels-V2's diffusion forcing passes a block-causal (1 1 n n) mask: the segment follows it,
        # memory slots (earlier chunks) stay visible to every query
        out = attend(q, k, v, mask=attention_mask, hidden=hidden_states, rotary=rotate, backend=backend)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def rotary(self, rotary_emb: tuple[Tensor, Tensor], origin: Tensor, tokens_per_frame: int) -> Rotate:
        """``rotate(x, positions)`` for one call: Wan's 3-D rotary at frame ``positions - origin``.

        Args:
            rotary_emb: the ``(cos, sin)`` Wan passes to its processors, ``(1 n 1 d)`` each.
            origin: ``(b,)`` frame index that counts as frame 0 (the segment's first frame).
            tokens_per_frame: ``t``; token ``j`` of a frame-major sequence sits at place
                ``j % t`` of its frame; memory slots sit at ``Context.places`` when the memory
                gives them (``-1``: no place, turned along time only), else the same rule.
        """
        cos_all, sin_all = rotary_emb
        self._check_frame_size(cos_all, tokens_per_frame)
        t_dim, t = self.t_dim, tokens_per_frame
        spatial_cos, spatial_sin = cos_all[0, :t, 0, t_dim:], sin_all[0, :t, 0, t_dim:]

        def rotate(x: Tensor, positions: Tensor, places: Tensor | None = None) -> Tensor:
            pos = positions[:, None] if positions.ndim == 2 else positions  # (b, 1 or h, n)
            cos_t, sin_t = wan_rotary_freqs(pos - origin[:, None, None], t_dim, self.theta)
            shape = (*cos_t.shape[:-1], -1)
            if places is None:  # whole frames, frame-major
                place = torch.arange(x.shape[2], device=x.device) % t
                cos_s, sin_s = spatial_cos[place].expand(shape), spatial_sin[place].expand(shape)
            else:  # Context.places; -1: a slot with no place in a frame turns along time only
                none = (places < 0)[..., None]
                safe = places.clamp(min=0) % t
                cos_s = torch.where(none, 1.0, spatial_cos[safe]).to(cos_all.dtype)
                sin_s = torch.where(none, 0.0, spatial_sin[safe]).to(sin_all.dtype)
            cos = torch.cat([cos_t.to(cos_all.dtype), cos_s], dim=-1)
            sin = torch.cat([sin_t.to(sin_all.dtype), sin_s], dim=-1)
            return _wan_rotate(x, cos, sin)

        rotate.takes_places = True  # type: ignore[attr-defined]
        return rotate

    def _check_frame_size(self, cos_all: Tensor, t: int) -> None:
        # every layer of one forward gets the same rotary_emb tensor: check it once
        if self._checked is not None and self._checked[0]() is cos_all and self._checked[1] == t:
            return
        n, t_dim = cos_all.shape[1], self.t_dim
        same_frame = torch.equal(cos_all[0, 0, 0, :t_dim], cos_all[0, t - 1, 0, :t_dim])
        same_place = n <= t or torch.equal(cos_all[0, 0, 0, t_dim:], cos_all[0, t, 0, t_dim:])
        if not (same_frame and same_place):
            raise ShapeError(
                f"Wan: session.set_segment gives {n // t} frames of {t} tokens, but the latents' rotary layout "
                "has frames of another size; give one frame position per latent frame after patching "
                "(num_frames // patch_size[0])"
            )
        self._checked = (weakref.ref(cos_all), t)

    def __repr__(self) -> str:
        return f"WanSelfAttentionAdapter(t_dim={self.t_dim}, theta={self.theta})"


#: diffusers attention backends (``AttentionBackendName`` values) and the memkit backend that
#: runs the same kernel family over a segment plus its memory context.
DIFFUSERS_BACKENDS: dict[str, str] = {
    "native": "sdpa",
    "_native_cudnn": "sdpa",
    "_native_efficient": "sdpa",
    "_native_flash": "sdpa",
    "_native_math": "math",
    "xformers": "xformers",
}


def memkit_backend(diffusers_backend: Any) -> str | None:
    """The memkit backend for a diffusers ``set_attention_backend`` choice (``None``: the session's).

    Backends memkit has no counterpart for (flash-attn, sage, flex, hub kernels: they take no
    memory context) leave the session's backend in charge, with a warning; the stock
    processor still uses the choice wherever memkit is not attached.

    Example:
        >>> from memkit.integrations.diffusers_wan import memkit_backend
        >>> memkit_backend("native"), memkit_backend("_native_math"), memkit_backend(None)
        ('sdpa', 'math', None)
    """
    if diffusers_backend is None:
        return None
    name = str(getattr(diffusers_backend, "value", diffusers_backend))
    if name in DIFFUSERS_BACKENDS:
        return DIFFUSERS_BACKENDS[name]
    warnings.warn(
        f"diffusers attention backend {name!r} has no memkit counterpart for attention over a memory context; "
        f"memkit's layers use the session's backend (memkit: {', '.join(sorted(set(DIFFUSERS_BACKENDS.values())))})",
        UserWarning,
        stacklevel=3,
    )
    return None


class WanMemoryProcessor:
    """A diffusers attention processor that routes one Wan attention layer through memkit.

    Installed by :func:`attach_wan` (with ``set_attn_processor``); not built by hand.
    When the model's active :class:`memkit.MemorySession` attached this layer, the call
    runs :class:`WanSelfAttentionAdapter` with that session's state; otherwise it calls
    the stock processor it replaced (``original``), unchanged.

    It follows diffusers' ``model.set_attention_backend(...)``: the choice is passed on to
    the stock processor (so it holds after :meth:`memkit.MemorySession.detach` too) and
    memkit's attention core uses the matching memkit backend (see :func:`memkit_backend`).

    Example:
        >>> import pytest, memkit
        >>> diffusers = pytest.importorskip("diffusers")
        >>> from memkit.integrations import WanMemoryProcessor, attach_wan
        >>> wan = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1)
        >>> with attach_wan(wan, memkit.NoMemory()):
        ...     print(wan.attn_processors["blocks.0.attn1.processor"])
        WanMemoryProcessor(original=WanAttnProcessor)
        >>> type(wan.attn_processors["blocks.0.attn1.processor"]).__name__
        'WanAttnProcessor'
    """

    _parallel_config = None

    def __init__(self, hub: Hub, original: Any) -> None:
        self._memkit_hub = hub
        self.original = original
        self._backend: Any = getattr(original, "_attention_backend", None)

    @property
    def _attention_backend(self) -> Any:
        """What diffusers' ``set_attention_backend`` chose for this layer (``None``: the default)."""
        return self._backend

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self._backend = backend
        if hasattr(self.original, "_attention_backend"):
            self.original._attention_backend = backend

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Same signature as diffusers WanAttnProcessor. Returns ``(b n D)``."""
        return self._memkit_hub.dispatch(
            attn,
            functools.partial(self.original, attn),
            (hidden_states, encoder_hidden_states, attention_mask, rotary_emb),
            kwargs,
        )

    def __repr__(self) -> str:
        return f"WanMemoryProcessor(original={type(self.original).__name__})"


class _ProcessorInstaller:
    """Routes Wan attention layers through the hub by swapping their diffusers processors."""

    kind = "diffusers processors"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original: dict[str, Any] = dict(model.attn_processors)
        self._ours: dict[str, WanMemoryProcessor] = {}

    def sync(self, hub: Hub, modules: Mapping[nn.Module, str]) -> None:
        names = set(modules.values())
        processors = {}
        for key, original in self.original.items():
            name = key.removesuffix(".processor")
            if name in names:
                processors[key] = self._ours.setdefault(name, WanMemoryProcessor(hub, original))
            else:
                processors[key] = original
        self.model.set_attn_processor(processors)

    def restore(self) -> None:
        self.model.set_attn_processor(dict(self.original))


def attach_wan(
    transformer: nn.Module,
    memory: LayerMemories,
    *,
    layers: LayerSelector | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> MemorySession:
    """Give memory to the self-attention (``attn1``) layers of a diffusers Wan transformer.

    Use it like :func:`memkit.attach`: before denoising each chunk call
    ``session.set_segment(frame_positions=...)`` with one frame index per *latent* frame
    of the chunk (after patching); run the transformer as usual (every memory layer reads);
    then ``session.commit(clean_latents, timestep=..., encoder_hidden_states=...)`` writes
    the finished chunk. Tokens per frame are inferred (``(H / p_h) (W / p_w)``).

    Args:
        transformer: a ``diffusers.WanTransformer3DModel`` or a Wan-derived model
            (``SkyReelsV2Transformer3DModel``, recognised by structure).
        memory: a :class:`memkit.Memory`, a ``{layer name: memory}`` dict, or
            ``factory(name, attn) -> Memory`` (``attn.heads`` heads of
            ``attn.inner_dim // attn.heads`` channels).
        layers: which ``attn1`` layers (see :data:`memkit.integrations.LayerSelector`);
            default every self-attention layer (``blocks.*.attn1``).
        batch_size, device, dtype, backend: as in :func:`memkit.attach`.

    Returns:
        The new, active :class:`memkit.MemorySession`; ``detach()`` puts the stock
        processors back.

    Raises:
        ImportError: diffusers is not installed.

    Example:
        >>> import pytest, torch, memkit
        >>> diffusers = pytest.importorskip("diffusers")
        >>> from memkit.integrations import attach_wan
        >>> wan = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1).eval()
        >>> latents, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 8)  # 2 latent frames of 2x2 tokens
        >>> with torch.no_grad(), attach_wan(wan, lambda name, attn: memkit.FIFOMemory(2, 16, 4, frames=2)) as s:
        ...     s.set_segment(frame_positions=[0, 1])
        ...     _ = s.commit(latents, torch.tensor([0]), text)
        ...     s.set_segment(frame_positions=[2, 3])
        ...     out = wan(latents, torch.tensor([500]), text).sample
        >>> out.shape, s.layer_names
        (torch.Size([1, 4, 2, 4, 4]), ('blocks.0.attn1',))
    """
    _require_diffusers()
    why_not = _not_wan_like(transformer)
    if why_not is not None:
        raise AttachError(
            "attach_wan: expected a diffusers WanTransformer3DModel or a Wan-derived model "
            f"(SkyReelsV2Transformer3DModel), got {type(transformer).__name__}: {why_not}"
        )
    if layers is None:
        layers = list(memory) if isinstance(memory, Mapping) else _is_wan_self_attention
    chosen = selection.select_layers(transformer, layers)
    for name, module in chosen:
        if not _is_wan_self_attention(name, module):
            raise AttachError(
                f"attach_wan: {name!r} is not a Wan self-attention layer (a WanAttention that is not cross-attention)"
            )
    rope: Any = transformer.rope
    adapter = WanSelfAttentionAdapter(int(rope.t_dim), float(getattr(rope, "theta", 10000.0)))
    return session.attach_layers(
        transformer,
        memory,
        [name for name, _ in chosen],
        adapter,
        lambda: _ProcessorInstaller(transformer),
        _ProcessorInstaller.kind,
        rotary=None,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        backend=backend,
    )


#: What a Wan-style attention module has (WanAttention, SkyReelsV2Attention, ...): its processor
#: is called as ``processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)``.
_WAN_ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k", "heads", "processor")


def _is_wan_self_attention(name: str, module: nn.Module) -> bool:
    """A Wan-style self-attention layer, recognised by its structure (not its class)."""
    if not all(hasattr(module, part) for part in _WAN_ATTENTION_PARTS):
        return False
    return getattr(module, "is_cross_attention", None) is False


def _not_wan_like(transformer: nn.Module) -> str | None:
    """Why ``transformer`` is not a Wan-derived diffusers model, or ``None`` when it is.

    Wan-derived: diffusers attention processors, Wan's rotary (``rope`` with a time part
    ``t_dim``, handing ``(cos, sin)`` to its processors) and Wan-style self-attention layers.
    """
    if not isinstance(transformer, nn.Module) or not hasattr(transformer, "set_attn_processor"):
        return "it has no diffusers attention processors (set_attn_processor)"
    rope = getattr(transformer, "rope", None)
    if rope is None or not isinstance(getattr(rope, "t_dim", None), int):
        return "it has no Wan rotary embedding (.rope with a time part t_dim)"
    if not any(_is_wan_self_attention(n, m) for n, m in transformer.named_modules()):
        return "it has no Wan-style self-attention layer (to_q/to_k/to_v, norm_q/norm_k, not cross-attention)"
    return None
