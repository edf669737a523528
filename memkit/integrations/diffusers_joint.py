"""Memory for diffusers' joint text-video transformers: CogVideoX, HunyuanVideo, Mochi.

These models run the prompt's tokens and the video's tokens through one attention: the
prompt is part of every attention call, not a cross-attention layer. Each adapter below
reruns the stock processor's math (projections, q/k norms, the model's rotary, output
projections) with memkit's joint attention core in the middle
(:meth:`memkit.integrations.LayerAttend.joint`): the video's queries and the prompt's
queries attend over [memory; prompt; video]; only the video is rotated and written to
memory; the prompt's padding mask is the prompt's :class:`~memkit.integrations.ExtraTokens`
mask. With :class:`memkit.NoMemory` every layer computes what the stock processor
computes (the tests check 1e-5).

They attach by the generic :func:`memkit.attach` route (the module's ``forward``), so
``attach_cogvideox``, ``attach_hunyuan_video`` and ``attach_mochi`` are one call each.
Rotary: each model builds its table from frame 0 of the call; memkit places memory keys
relative to the segment's first frame with :class:`memkit.integrations.rotary.TableRotary`.

diffusers is never imported here: the models are recognised by their structure.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from memkit.errors import AttachError
from memkit.integrations.attach import attach
from memkit.integrations.layer_attend import ExtraTokens, LayerAttend
from memkit.integrations.rotary import TableRotary, axis_frequencies
from memkit.integrations.selection import LayerMemories, LayerSelector
from memkit.integrations.session import MemorySession

__all__ = [
    "CogVideoXAttentionAdapter",
    "HunyuanVideoAttentionAdapter",
    "MochiAttentionAdapter",
    "attach_cogvideox",
    "attach_hunyuan_video",
    "attach_mochi",
]


def _heads(x: Tensor, heads: int) -> Tensor:
    """``(b n D) -> (b n h d)``."""
    return x.unflatten(2, (heads, -1))


def _refuse_extra(name: str, model: str, **given: Any) -> None:
    extra = sorted(k for k, v in given.items() if v is not None)
    if extra:
        raise AttachError(
            f"{name}: memkit's {model} adapter was called with {', '.join(extra)}, which it does not handle"
        )


class CogVideoXAttentionAdapter:
    """The adapter for CogVideoX's ``attn1`` (text and video in one sequence, text first).

    Args:
        head_dim: ``attention_head_dim`` of the transformer; the rotary's frame part is
            its first ``head_dim // 4`` channels (diffusers' ``get_3d_rotary_pos_embed``).
        theta: rotary base (10000).

    Example:
        >>> from memkit.integrations import CogVideoXAttentionAdapter
        >>> CogVideoXAttentionAdapter(head_dim=16)
        CogVideoXAttentionAdapter(head_dim=16, theta=10000.0, frame_origin='chunk')
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, *, frame_origin: str = "chunk") -> None:
        self.head_dim, self.theta, self.frame_origin = head_dim, theta, frame_origin
        self.time_freqs = axis_frequencies((head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3), theta)

    def __call__(
        self,
        attn: Any,
        attend: LayerAttend,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        _refuse_extra(attend.name, "CogVideoX", attention_mask=attention_mask, **kwargs)
        b, text = hidden_states.shape[0], encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (_heads(f(x), attn.heads).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        rotate = None
        if image_rotary_emb is not None:
            fp, t = attend.layout(q[:, :, text:])
            cos, sin = image_rotary_emb
            rotate = TableRotary(
                cos[..., 0::2], sin[..., 0::2], self.time_freqs, t, fp[:, 0], frame_origin=self.frame_origin
            )
        prompt = ExtraTokens(k[:, :, :text], v[:, :, :text], q=q[:, :, :text])
        out, prompt_out = attend.joint(
            q[:, :, text:], k[:, :, text:], v[:, :, text:], prompt, hidden=hidden_states, rotary=rotate
        )
        y = torch.cat([prompt_out, out], dim=2).transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
        y = attn.to_out[1](attn.to_out[0](y))
        prompt_y, video_y = y.split([text, y.shape[1] - text], dim=1)
        return video_y, prompt_y

    def __repr__(self) -> str:
        origin = self.frame_origin
        return f"CogVideoXAttentionAdapter(head_dim={self.head_dim}, theta={self.theta}, frame_origin={origin!r})"


class HunyuanVideoAttentionAdapter:
    """The adapter for HunyuanVideo's dual-stream and single-stream blocks' ``attn``.

    Dual-stream blocks project the prompt with their own ``add_*_proj`` and finish it with
    ``to_add_out``; single-stream blocks project ``[video; prompt]`` together and leave the
    output projection to the block. The key padding mask HunyuanVideo passes on every call
    (``(b 1 1 n+p)``, the prompt's padding) is split into the video's part and the prompt's.

    Args:
        rope_axes_dim: the transformer's ``rope_axes_dim`` (frame, height, width channels).
        theta: ``rope_theta`` (256).

    Example:
        >>> from memkit.integrations import HunyuanVideoAttentionAdapter
        >>> HunyuanVideoAttentionAdapter((4, 6, 6))
        HunyuanVideoAttentionAdapter(rope_axes_dim=(4, 6, 6), theta=256.0, frame_origin='chunk')
    """

    def __init__(self, rope_axes_dim: tuple[int, ...], theta: float = 256.0, *, frame_origin: str = "chunk") -> None:
        self.rope_axes_dim, self.theta, self.frame_origin = (
            tuple(int(d) for d in rope_axes_dim),
            float(theta),
            frame_origin,
        )
        self.time_freqs = axis_frequencies(self.rope_axes_dim, self.theta)

    def __call__(
        self,
        attn: Any,
        attend: LayerAttend,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        _refuse_extra(attend.name, "HunyuanVideo", **kwargs)
        if encoder_hidden_states is None:
            raise AttachError(f"{attend.name}: memkit's HunyuanVideo adapter serves the joint (video + prompt) blocks")
        n = hidden_states.shape[1]
        if attn.add_q_proj is None:  # single stream: one projection over [video; prompt]
            x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
            q, k, v = (_heads(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            (q, pq), (k, pk), (v, pv) = ((y[:, :n], y[:, n:]) for y in (q, k, v))
        else:
            q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            p = encoder_hidden_states
            pq, pk, pv = (_heads(f(p), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                pq = attn.norm_added_q(pq)
            if attn.norm_added_k is not None:
                pk = attn.norm_added_k(pk)
        q, k, v, pq, pk, pv = (y.transpose(1, 2) for y in (q, k, v, pq, pk, pv))
        video_mask = prompt_mask = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.ndim != 4 or attention_mask.shape[1:3] != (1, 1):
                raise AttachError(
                    f"{attend.name}: expected HunyuanVideo's boolean key padding mask (b 1 1 n), got "
                    f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            video_mask, prompt_mask = attention_mask[:, 0, 0, :n], attention_mask[:, 0, 0, n:]
        rotate = None
        if image_rotary_emb is not None:
            fp, t = attend.layout(q)
            cos, sin = image_rotary_emb
            rotate = TableRotary(
                cos[..., 0::2], sin[..., 0::2], self.time_freqs, t, fp[:, 0], frame_origin=self.frame_origin
            )
        prompt = ExtraTokens(pk, pv, mask=prompt_mask, q=pq)
        out, prompt_out = attend.joint(q, k, v, prompt, mask=video_mask, hidden=hidden_states, rotary=rotate)
        video_y = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        prompt_y = prompt_out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_out", None) is not None:
            video_y = attn.to_out[1](attn.to_out[0](video_y))
        if getattr(attn, "to_add_out", None) is not None:
            prompt_y = attn.to_add_out(prompt_y)
        return video_y, prompt_y

    def __repr__(self) -> str:
        return (
            f"HunyuanVideoAttentionAdapter(rope_axes_dim={self.rope_axes_dim}, theta={self.theta}, "
            f"frame_origin={self.frame_origin!r})"
        )


class MochiAttentionAdapter:
    """The adapter for Mochi's ``attn1`` (video and prompt projected apart, attended together).

    Mochi's rotary is learned: each head turns each channel pair by
    ``t * f[0] + y * f[1] + x * f[2]`` with ``f`` the transformer's ``pos_frequencies``
    ``(3 h p)``; the frame part ``f[0]`` places memory keys in time. The stock processor
    drops the prompt's padding tokens (a prefix of real tokens is assumed, as Mochi's
    pipeline makes) and gives them a zero output; so does this adapter.

    Args:
        pos_frequencies: the transformer's ``pos_frequencies`` parameter (read at each call,
            so training it is followed).

    Example:
        >>> import torch
        >>> from memkit.integrations import MochiAttentionAdapter
        >>> MochiAttentionAdapter(torch.zeros(3, 2, 8))
        MochiAttentionAdapter(heads=2, pairs=8, frame_origin='chunk')
    """

    def __init__(self, pos_frequencies: Tensor, *, frame_origin: str = "chunk") -> None:
        self.pos_frequencies, self.frame_origin = pos_frequencies, frame_origin

    def __call__(
        self,
        attn: Any,
        attend: LayerAttend,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        _refuse_extra(attend.name, "Mochi", **kwargs)
        q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        p = encoder_hidden_states
        pq, pk, pv = (_heads(f(p), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            pq = attn.norm_added_q(pq)
        if attn.norm_added_k is not None:
            pk = attn.norm_added_k(pk)
        q, k, v, pq, pk, pv = (y.transpose(1, 2) for y in (q, k, v, pq, pk, pv))
        rotate = None
        if image_rotary_emb is not None:
            fp, t = attend.layout(q)
            cos, sin = image_rotary_emb  # (n h p)
            freqs = self.pos_frequencies[0].detach()
            rotate = TableRotary(
                cos.transpose(0, 1), sin.transpose(0, 1), freqs, t, fp[:, 0], frame_origin=self.frame_origin
            )
        prompt_mask = None if attention_mask is None else attention_mask.bool()
        prompt = ExtraTokens(pk, pv, mask=prompt_mask, q=pq)
        out, prompt_out = attend.joint(q, k, v, prompt, hidden=hidden_states, rotary=rotate)
        if prompt_mask is not None:  # the stock processor never computes padding tokens: zero, as there
            prompt_out = torch.where(prompt_mask[:, None, :, None], prompt_out, 0)
        video_y = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2, 3)))
        prompt_y = prompt_out.transpose(1, 2).flatten(2, 3)
        if hasattr(attn, "to_add_out"):
            prompt_y = attn.to_add_out(prompt_y)
        return video_y, prompt_y

    def __repr__(self) -> str:
        heads, pairs = self.pos_frequencies.shape[1:]
        return f"MochiAttentionAdapter(heads={heads}, pairs={pairs}, frame_origin={self.frame_origin!r})"


def _config(model: nn.Module, what: str) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise AttachError(f"{what}: expected a diffusers model with a .config, got {type(model).__name__}")
    return config


def _blocks(model: nn.Module, what: str, *paths: str) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    found = [n for n in names for p in paths if n.startswith(p + ".") and n.count(".") == p.count(".") + 2]
    found = [n for n in found if n.rsplit(".", 1)[-1] in ("attn", "attn1")]
    if not found:
        raise AttachError(f"{what}: {type(model).__name__} has no attention layers under {' or '.join(paths)}")
    return found


def attach_cogvideox(
    transformer: nn.Module,
    memory: LayerMemories,
    *,
    layers: LayerSelector | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    frame_origin: str = "chunk",
) -> MemorySession:
    """Give memory to the joint attention (``transformer_blocks.*.attn1``) of a CogVideoX transformer.

    Use it as :func:`memkit.attach`: ``session.set_segment(frame_positions=...)`` with one
    position per latent frame (CogVideoX 1.5: per ``patch_size_t`` latent frames, as its
    rotary table counts them), the transformer as usual (with the pipeline's
    ``image_rotary_emb`` for the chunk's frames), ``session.commit(...)`` with the clean
    latents. Needs rotary position embeddings (CogVideoX 5B, 1.5): CogVideoX-2B adds a
    position embedding to its input, outside attention, so memory frames cannot be
    placed in time; it is refused.

    Example:
        >>> import pytest, torch, memkit
        >>> diffusers = pytest.importorskip("diffusers")
        >>> from memkit.integrations import attach_cogvideox
        >>> cog = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
        ...     time_embed_dim=8, text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=5,
        ...     max_text_seq_length=3, use_rotary_positional_embeddings=True)
        >>> attach_cogvideox(cog, memkit.NoMemory()).layer_names
        ('transformer_blocks.0.attn1',)
    """
    what = "attach_cogvideox"
    config = _config(transformer, what)
    embed = getattr(transformer, "patch_embed", None)
    if getattr(embed, "use_positional_embeddings", False) or getattr(embed, "use_learned_positional_embeddings", False):
        raise AttachError(
            f"{what}: this CogVideoX adds a position embedding to its input (use_rotary_positional_embeddings="
            f"{config.get('use_rotary_positional_embeddings')}), outside attention: memory keys cannot be placed in "
            "time, so memkit does not support it (CogVideoX-2B); rotary CogVideoX (5B, 1.5) is supported"
        )
    chosen = layers if layers is not None else _blocks(transformer, what, "transformer_blocks")
    if isinstance(memory, Mapping) and layers is None:
        chosen = list(memory)
    adapter = CogVideoXAttentionAdapter(int(config["attention_head_dim"]), frame_origin=frame_origin)
    return attach(
        transformer, memory, adapter=adapter, layers=chosen, batch_size=batch_size, device=device, dtype=dtype,
        backend=backend,
    )  # fmt: skip


def attach_hunyuan_video(
    transformer: nn.Module,
    memory: LayerMemories,
    *,
    layers: LayerSelector | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    frame_origin: str = "chunk",
) -> MemorySession:
    """Give memory to HunyuanVideo's dual-stream and single-stream blocks (``*transformer_blocks.*.attn``).

    The token refiner (prompt-only attention) keeps its stock attention. Rotary comes from
    the transformer's own table of each call; the prompt's padding mask is followed.

    Example:
        >>> import pytest, torch, memkit
        >>> diffusers = pytest.importorskip("diffusers")
        >>> from memkit.integrations import attach_hunyuan_video
        >>> hy = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
        ...     attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=8,
        ...     pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
        >>> attach_hunyuan_video(hy, memkit.NoMemory()).layer_names
        ('transformer_blocks.0.attn', 'single_transformer_blocks.0.attn')
    """
    what = "attach_hunyuan_video"
    config = _config(transformer, what)
    chosen = (
        layers if layers is not None else _blocks(transformer, what, "transformer_blocks", "single_transformer_blocks")
    )
    if isinstance(memory, Mapping) and layers is None:
        chosen = list(memory)
    adapter = HunyuanVideoAttentionAdapter(
        tuple(config["rope_axes_dim"]), float(config["rope_theta"]), frame_origin=frame_origin
    )
    return attach(
        transformer, memory, adapter=adapter, layers=chosen, batch_size=batch_size, device=device, dtype=dtype,
        backend=backend,
    )  # fmt: skip


def attach_mochi(
    transformer: nn.Module,
    memory: LayerMemories,
    *,
    layers: LayerSelector | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    frame_origin: str = "chunk",
) -> MemorySession:
    """Give memory to Mochi's joint attention (``transformer_blocks.*.attn1``).

    Example:
        >>> import pytest, torch, memkit
        >>> diffusers = pytest.importorskip("diffusers")
        >>> from memkit.integrations import attach_mochi
        >>> mochi = diffusers.MochiTransformer3DModel(num_attention_heads=2, attention_head_dim=16, num_layers=1,
        ...     pooled_projection_dim=8, in_channels=4, text_embed_dim=8, time_embed_dim=8, max_sequence_length=4)
        >>> attach_mochi(mochi, memkit.NoMemory()).layer_names
        ('transformer_blocks.0.attn1',)
    """
    what = "attach_mochi"
    _config(transformer, what)
    freqs = getattr(transformer, "pos_frequencies", None)
    if not isinstance(freqs, Tensor) or freqs.ndim != 3 or freqs.shape[0] != 3:
        raise AttachError(
            f"{what}: expected Mochi's learned rotary pos_frequencies (3 h p) on {type(transformer).__name__}"
        )
    chosen = layers if layers is not None else _blocks(transformer, what, "transformer_blocks")
    if isinstance(memory, Mapping) and layers is None:
        chosen = list(memory)
    adapter = MochiAttentionAdapter(freqs, frame_origin=frame_origin)
    return attach(
        transformer, memory, adapter=adapter, layers=chosen, batch_size=batch_size, device=device, dtype=dtype,
        backend=backend,
    )  # fmt: skip
