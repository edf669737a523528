"""``MALTNetwork``: the reference latent video diffusion transformer with memory.

One call denoises one segment. Every block's self-attention is a
:class:`memkit.MemoryAttention`; blocks listed in ``config.memory.layers`` carry the
configured memory, the others :class:`memkit.NoMemory`. The MALT life cycle:

* :meth:`MALTNetwork.forward` reads the memory states (every denoising step);
* :meth:`MALTNetwork.write` passes the finished, clean segment through the same network
  (``t = 0``, or a small noise level in training) and returns the next states.
"""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from einops import rearrange
from torch import Tensor, nn

from memkit.errors import CheckpointError, ShapeError
from memkit.layers import LayerPlan, init_memory_states
from memkit.memo import TensorMemo, memo_active
from memkit.memories.registry import build_from_spec
from memkit.models.malt.blocks import MALTBlock, _modulate, patchify, sincos_2d, timestep_embedding, unpatchify
from memkit.models.malt.config import MALTConfig, MemorySpec
from memkit.protocol import Memory
from memkit.state import like_states, map_tensors
from memkit.typing import Bool, Float, Int, at_door, check_shape, typechecked

__all__ = ["MALTNetwork", "CheckpointError", "patchify", "unpatchify"]


#: ``prediction="x0"``: the velocity ``(x_t - x0) / t`` divides by at least this (as JiT does),
#: so the velocity loss weights the clean-sample error by at most ``1 / 0.05**2``.
_X0_MIN_T = 0.05
# each network's projected prompt for the segment being generated (see MALTNetwork._memory_prompt)
_PROMPT = TensorMemo()


@dataclasses.dataclass(frozen=True)
class _Stream:
    """What flows from the embedding through the blocks to the head of one network call.

    Attributes:
        h: tokens ``(b n D)``.
        cond: per-frame conditioning ``(b f D)`` (timestep, pooled prompt, action).
        frame_positions: rotary positions ``(b f)`` (frame indices, or the camera's place).
        mem_prompt, mem_mask: the projected prompt the memories retrieve by, ``(b p D)``, ``(b p)``.
        cross_ctx: keys and mask of the prompt cross-attention (``prompt_mode="cross"``).
        frame_meta: per-frame metadata for the memories ``(b f 1)``: the camera pose when
            ``positions="pose"`` (what :class:`memkit.PoseRetrievalMemory` retrieves by), else None.
    """

    h: Tensor
    cond: Tensor
    frame_positions: Tensor
    mem_prompt: Tensor | None
    mem_mask: Tensor | None
    cross_ctx: tuple[Tensor, Tensor] | None
    frame_meta: Tensor | None = None

    def first(self, k: int) -> "_Stream":
        """The first ``k`` items of the batch."""

        def cut(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:k]

        cross = None if self.cross_ctx is None else (self.cross_ctx[0][:k], self.cross_ctx[1][:k])
        h, cond, positions = self.h[:k], self.cond[:k], self.frame_positions[:k]
        return _Stream(h, cond, positions, cut(self.mem_prompt), cut(self.mem_mask), cross, cut(self.frame_meta))


class MALTNetwork(nn.Module):
    """Latent video diffusion transformer that generates one segment at a time, with memory.

    Predicts the flow-matching velocity of a noisy segment (see
    :class:`memkit.models.malt.FlowMatching`). Positions are explicit token-frame indices
    ``(b f)`` (``f = frames_per_segment / tubelet``), rotated into queries and keys by
    :class:`memkit.MemoryAttention`, so they keep counting past the training length.

    Args:
        config: a :class:`MALTConfig`.
        memories: optional explicit memory per block (``None`` entries = no memory);
            overrides ``config.memory`` (which is then not what a saved config says).
        trust_remote_code: let ``config.memory`` name ``"module:Class"`` (which imports
            and runs that module); see :func:`memkit.memories.build_memory`.

    Shapes: ``x (b F c H W)``, ``t (b,)``, ``frame_positions (b f)``, ``prompt (b p e)``,
    ``prompt_mask (b p)``, ``actions (b F a)``; returns the velocity ``(b F c H W)``.

    Example:
        >>> import torch
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> net = MALTNetwork(MALTConfig.preset("tiny", memory={"name": "fifo", "kwargs": {"frames": 4}}))
        >>> states = net.init_states(1)
        >>> clean = torch.randn(1, 2, 3, 8, 8)
        >>> states = net.write(clean, states, net.segment_positions(0, 1))   # segment 0 into memory
        >>> v = net(torch.randn(1, 2, 3, 8, 8), torch.ones(1), states, net.segment_positions(1, 1))
        >>> v.shape
        torch.Size([1, 2, 3, 8, 8])
    """

    def __init__(
        self,
        config: MALTConfig,
        memories: Sequence[Memory[Any] | None] | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c, dim = config, config.dim
        if memories is None:
            memories = self._build_memories(config, trust_remote_code)
        if len(memories) != c.depth:
            raise ShapeError(f"memories: expected one entry per block ({c.depth}), got {len(memories)}")
        self.patch_in = nn.Linear(c.patch_dim, dim)
        # learned, but started at DiT's fixed 2-D sin-cos table: unit-scale, so a token's place is as
        # visible as its content from step 0 (a 0.02-scale random start took hundreds of steps to
        # grow before attention could match a token to the same place in a remembered frame)
        self.spatial = nn.Parameter(sincos_2d(c.height // c.patch_size, c.width // c.patch_size, dim))
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.action_mlp: nn.Module | None = None
        if c.action_dim:
            features = c.action_dim * c.tubelet * (1 + 2 * c.action_frequencies)
            self.action_mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.prompt_proj: nn.Module | None = None
        if c.prompt_dim:
            self.prompt_proj = nn.Linear(c.prompt_dim, dim)
            # the unconditional branch of classifier-free guidance (and dropped prompts in training)
            self.null_prompt = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(MALTBlock(c, m) for m in memories)
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, c.patch_dim)
        self._init_weights()
        # the clean pass can stop after the last block that writes a memory
        writers = [i for i, b in enumerate(self.block_list) if b.attn.has_memory]
        self.write_depth = max(writers) + 1 if writers else 0

    @staticmethod
    def _build_memories(config: MALTConfig, trust_remote_code: bool) -> list[Memory[Any] | None]:
        layers = set(config.memory_layers())
        spec, geometry = config.memory, config.layer_geometry
        return [
            build_from_spec(spec.name, spec.kwargs, geometry, trust_remote_code=trust_remote_code)
            if i in layers
            else None
            for i in range(config.depth)
        ]

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if ".attn.memory" in f".{name}":
                continue  # memories initialise their own parameters
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.block_list:
            ada = cast(nn.Linear, block.ada[-1])
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
            if block.cross is not None:
                nn.init.zeros_(block.cross.to_out.weight)
        for layer in (cast(nn.Linear, self.ada_out[-1]), self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def block_list(self) -> list[MALTBlock]:
        """The blocks, typed (``self.blocks`` is an ``nn.ModuleList``)."""
        return [cast(MALTBlock, b) for b in self.blocks]

    # ----------------------------------------------------------------- states and positions
    def init_states(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Any, ...]:
        """One empty memory state per block, by block name (:class:`memkit.state.LayerStates`, a tuple)."""
        return init_memory_states(self, batch_size, device=device, dtype=dtype)

    def segment_positions(self, index: int, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Token-frame positions ``(b f)`` of segment ``index``: ``index * f + [0, f)``."""
        f = self.config.token_frames
        if device is None:
            device = self.spatial.device
        return (index * f + torch.arange(f, device=device)).expand(batch_size, f).contiguous()

    def pose_positions(self, actions: Tensor) -> Tensor:
        """Rotary positions ``(b f)`` from the camera pose: ``round(pose_x * pose_position_scale)``.

        Used in place of the frame index when ``config.positions == "pose"``: the last action
        channel is the horizontal pose (``DataSpec.pose_actions``), so two frames taken at the
        same place get the same rotation however far apart in time, and attention measures
        distance in place instead of in time (nothing in it grows with the video's length).
        The first frame of each tubelet gives the token-frame's position.
        """
        c = self.config
        x = actions[:, :: c.tubelet, -1].float() * c.pose_position_scale
        return x.round().long()

    # ----------------------------------------------------------------- forward
    def _check_inputs(self, x: Tensor, frame_positions: Tensor, prompt: Tensor | None, actions: Tensor | None) -> None:
        c = self.config
        b = check_shape("x", x, "b F c H W", F=c.frames_per_segment, c=c.channels, H=c.height, W=c.width)["b"]
        check_shape("frame_positions", frame_positions, "b f", b=b, f=c.token_frames)
        if prompt is not None:
            if not c.prompt_dim:
                raise ShapeError("prompt was given but the model has no prompt conditioning (prompt_dim = 0)")
            check_shape("prompt", prompt, "b p e", b=b, e=c.prompt_dim)
        if c.action_dim:
            if actions is None:
                raise ShapeError(f"actions (b F a) are required: the model is conditioned on {c.action_dim}-d actions")
            check_shape("actions", actions, "b F a", b=b, F=c.frames_per_segment, a=c.action_dim)
        elif actions is not None:
            raise ShapeError("actions were given but the model has no action conditioning (action_dim = 0)")

    def _embed(
        self,
        x: Tensor,
        t: Tensor,
        states: tuple[Any, ...],
        frame_positions: Tensor,
        prompt: Tensor | None,
        prompt_mask: Tensor | None,
        actions: Tensor | None,
        drop_prompt: Tensor | None,
    ) -> "_Stream":
        """Tokens and conditioning of a segment: what the blocks take (inputs checked here, once)."""
        c = self.config
        if at_door():  # the network is the door: its blocks and layers trust what it hands them
            self._check_inputs(x, frame_positions, prompt, actions)
        frame_meta = None
        if c.positions == "pose" and actions is not None:
            frame_positions = self.pose_positions(actions)
            frame_meta = actions[:, :: c.tubelet, -1:].float()  # the pose, for memories that retrieve by it
        if len(states) != c.depth:
            raise ShapeError(f"states: expected one state per block ({c.depth}), got {len(states)}")
        b, f = x.shape[0], c.token_frames
        h = self.patch_in(patchify(x, c.patch_size, c.tubelet)) + self.spatial.repeat(f, 1)
        cond = self.time_mlp(timestep_embedding(t, c.dim).to(h.dtype))[:, None, :].expand(b, f, c.dim)
        if self.action_mlp is not None and actions is not None:
            a = rearrange(actions.to(h.dtype), "b (f pt) a -> b f (pt a)", pt=c.tubelet)
            if c.action_frequencies:
                freqs = math.pi * 2.0 ** torch.arange(c.action_frequencies, device=a.device, dtype=a.dtype)
                angles = (a[..., None] * freqs).flatten(-2)
                a = torch.cat([a, angles.sin(), angles.cos()], dim=-1)
            a = self.action_mlp(a)
            cond = cond + a
            h = h + a.repeat_interleave(c.tokens_per_frame, dim=1)

        mem_prompt = mem_mask = None
        cross_ctx = None
        if self.prompt_proj is not None:
            null = self.null_prompt.to(h.dtype).expand(b, 1, c.dim)
            if prompt is None:
                tokens, mask = null, torch.ones(b, 1, dtype=torch.bool, device=h.device)
                use = torch.zeros(b, dtype=torch.bool, device=h.device)
            else:
                tokens, mask = self._memory_prompt(prompt, prompt_mask, h.dtype)
                use = torch.ones(b, dtype=torch.bool, device=h.device) if drop_prompt is None else ~drop_prompt
                # memories see the prompt even when conditioning drops it: retrieval is not guidance
                mem_prompt, mem_mask = tokens, mask
            if c.prompt_mode == "adaln":
                w = mask.to(h.dtype)[..., None]
                pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
                pooled = torch.where(use[:, None], pooled, null[:, 0])
                cond = cond + pooled[:, None, :]
            else:
                keys = torch.cat([null, tokens], dim=1) if prompt is not None else null
                kmask = torch.ones(b, 1, dtype=torch.bool, device=h.device)
                if prompt is not None:
                    kmask = torch.cat([kmask, mask & use[:, None]], dim=1)
                cross_ctx = (keys, kmask)
        return _Stream(h, cond, frame_positions, mem_prompt, mem_mask, cross_ctx, frame_meta)

    def _memory_prompt(self, prompt: Tensor, prompt_mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The projected prompt tokens ``(b p D)`` and their mask ``(b p)``.

        In generation (no_grad) the same tensors for every call of a segment given the same
        ``prompt``: a memory that scores its frames by the prompt in its plan and again in its
        write (PromptBank) then finds its scores instead of computing them twice.
        """
        proj = cast(nn.Linear, self.prompt_proj)
        inputs = (prompt, prompt_mask, proj.weight, proj.bias)
        active = memo_active(grad_ok=False)
        if active:
            hit: tuple[Tensor, Tensor] | None = _PROMPT.get(self, inputs, dtype)
            if hit is not None:
                return hit
        tokens = proj(prompt.to(dtype))
        mask = (
            prompt_mask
            if prompt_mask is not None
            else torch.ones(prompt.shape[:2], dtype=torch.bool, device=prompt.device)
        )
        return _PROMPT.put(self, inputs, dtype, (tokens, mask)) if active else (tokens, mask)

    def _blocks(
        self, s: "_Stream", states: tuple[Any, ...], blocks: range, *, write: bool, last_output: bool = True
    ) -> tuple["_Stream", tuple[Any, ...]]:
        """Run ``blocks`` (indices) on the stream; with ``write``, their memories write the segment.

        ``last_output=False``: the last block only writes its memory (the clean pass discards its output).
        """
        h, new_states = s.h, list(states)
        for i in blocks:
            block = self.block_list[i]
            h, new_states[i] = block(
                h,
                s.cond,
                states[i],
                s.frame_positions,
                write=write and block.attn.has_memory,
                mem_prompt=s.mem_prompt,
                mem_prompt_mask=s.mem_mask,
                cross_ctx=s.cross_ctx,
                frame_meta=s.frame_meta,
                output=last_output or i != blocks[-1],
            )
        return dataclasses.replace(s, h=h), like_states(states, new_states)

    def _head(self, s: "_Stream", x: Tensor, t: Tensor) -> Tensor:
        """The velocity from the last block's tokens (the head's ``x0`` turned into a velocity)."""
        c = self.config
        shift, scale = self.ada_out(s.cond).repeat_interleave(c.tokens_per_frame, dim=1).chunk(2, dim=-1)
        out = self.out(_modulate(self.norm_out(s.h), shift, scale))
        pred = unpatchify(out, c.patch_size, c.tubelet, c.channels, c.height, c.width)
        if c.prediction == "x0":
            # the head predicts the clean segment; callers always get the velocity it implies
            tt = t.to(pred.dtype).clamp_min(_X0_MIN_T).reshape(-1, 1, 1, 1, 1)
            pred = (x - pred) / tt
        return pred

    @typechecked
    def plan_reads(
        self,
        states: tuple[Any, ...],
        frame_positions: Int[Tensor, "b f"],
        *,
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        actions: Float[Tensor, "b F a"] | None = None,
    ) -> tuple[Any, ...]:
        """One segment's memory reads, prepared once: pass the result in place of ``states``.

        Every block's :meth:`memkit.MemoryAttention.plan`: what no denoising step's queries
        change (a window, a sink, the prompt's choice of bank frames, the rotation of stored
        keys) is read once for the segment. ``forward`` with the plans equals ``forward`` with
        ``states``, bit for bit, for the same ``frame_positions``, ``prompt`` and ``actions``;
        :class:`EulerSampler` uses it. ``write`` through plans writes the states they hold.

        Example:
            >>> import torch
            >>> from memkit.models.malt import MALTConfig, MALTNetwork
            >>> net = MALTNetwork(MALTConfig.preset("tiny", memory={"name": "fifo", "kwargs": {"frames": 4}}))
            >>> states, pos = net.init_states(1), net.segment_positions(1, 1)
            >>> x, t = torch.randn(1, 2, 3, 8, 8), torch.ones(1)
            >>> plans = net.plan_reads(states, pos)                  # once per segment
            >>> torch.equal(net(x, t, plans, pos), net(x, t, states, pos))
            True
        """
        c = self.config
        if len(states) != c.depth:
            raise ShapeError(f"states: expected one state per block ({c.depth}), got {len(states)}")
        if at_door():
            check_shape("frame_positions", frame_positions, "b f", f=c.token_frames)
        frame_meta = None
        if c.positions == "pose" and actions is not None:  # as _inputs does
            frame_positions = self.pose_positions(actions)
            frame_meta = actions[:, :: c.tubelet, -1:].float()
        mem_prompt = mem_mask = None
        if self.prompt_proj is not None and prompt is not None:
            # what _embed hands the memories: the projected prompt
            mem_prompt, mem_mask = self._memory_prompt(prompt, prompt_mask, self.patch_in.weight.dtype)
        # plans keep the states' names, so what a write through them returns is named too
        return like_states(
            states,
            [
                block.attn.plan(state, frame_positions, c.tokens_per_frame, mem_prompt, mem_mask, frame_meta)
                for block, state in zip(self.block_list, states, strict=True)
            ],
        )

    def compile_reads(self, **options: Any) -> "MALTNetwork":
        """Compile every block's read + rotary + attention with ``torch.compile(fullgraph=True, **options)``.

        An opt-in (see :meth:`memkit.MemoryAttention.compile_read_attend`): each block's
        memory read (through a read plan or a state), the rotary embedding of the keys and the
        attention run as one compiled graph per block; the projections, MLPs and the write
        stay eager. Outputs equal the eager network's (``backend="eager"`` traces only, for a
        quick check; the default inductor backend generates code, which is where a speed-up
        can come from, after a first call that compiles). Returns the network.

        Example:
            >>> import torch
            >>> from memkit.models.malt import MALTConfig, MALTNetwork
            >>> net = MALTNetwork(MALTConfig.preset("tiny", memory={"name": "fifo", "kwargs": {"frames": 4}}))
            >>> eager = MALTNetwork(net.config)
            >>> _ = eager.load_state_dict(net.state_dict())
            >>> _ = net.compile_reads(backend="eager")
            >>> states, pos = net.init_states(1), net.segment_positions(1, 1)
            >>> x, t = torch.randn(1, 2, 3, 8, 8), torch.ones(1)
            >>> torch.equal(net(x, t, states, pos), eager(x, t, states, pos))
            True
        """
        for block in self.block_list:
            block.attn.compile_read_attend(**options)
        return self

    @typechecked
    def forward(
        self,
        x: Float[Tensor, "b F c H W"],
        t: Float[Tensor, " b"],
        states: tuple[Any, ...],
        frame_positions: Int[Tensor, "b f"],
        *,
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        actions: Float[Tensor, "b F a"] | None = None,
        drop_prompt: Bool[Tensor, " b"] | None = None,
    ) -> Float[Tensor, "b F c H W"]:
        """Velocity of the noisy segment ``x`` at noise level ``t`` (1 = pure noise); reads ``states``.

        ``prompt=None`` (or ``drop_prompt`` True for an item) gives the unconditional
        prediction used by classifier-free guidance.
        """
        stream = self._embed(x, t, states, frame_positions, prompt, prompt_mask, actions, drop_prompt)
        stream, _ = self._blocks(stream, states, range(self.config.depth), write=False)
        return self._head(stream, x, t)

    @typechecked
    def write(
        self,
        x: Float[Tensor, "b F c H W"],
        states: tuple[Any, ...],
        frame_positions: Int[Tensor, "b f"],
        *,
        t: Float[Tensor, " b"] | None = None,
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        actions: Float[Tensor, "b F a"] | None = None,
    ) -> tuple[Any, ...]:
        """The clean pass: run the finished segment ``x`` through the network at noise level
        ``t`` (default 0) and write every memory layer; returns the next states.

        Only blocks up to the last memory block run (later blocks write nothing). ``states``
        may be the segment's read plans (:meth:`plan_reads`, as the sampler made them for its
        denoising steps): the clean pass then reads through them too, and the states they hold
        are written (the result is the same, bit for bit).
        """
        if t is None:
            t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        stream = self._embed(x, t, states, frame_positions, prompt, prompt_mask, actions, None)
        # the last block's attention output and MLP would be discarded: it only writes
        _, new = self._blocks(stream, states, range(self.write_depth), write=True, last_output=False)
        # written through read plans (the sampler's, reused by the clean pass): blocks past the
        # last memory block kept their plan; hand back the state it holds
        return like_states(states, [s.state if isinstance(s, LayerPlan) else s for s in new])

    @typechecked
    def recache(
        self,
        latents: Float[Tensor, "b T c H W"],
        first_segment: int,
        *,
        prompt: Float[Tensor, "b p e"] | None = None,
        prompt_mask: Bool[Tensor, "b p"] | None = None,
        actions: Float[Tensor, "b T a"] | None = None,
    ) -> tuple[Any, ...]:
        """LongLive's re-cache at a prompt switch: memory rebuilt from recent frames under the new prompt.

        Empty states, then the clean pass (:meth:`write`, ``t = 0``) over each of the ``K``
        segments of ``latents`` (``T = K F`` frames, segments ``first_segment ..
        first_segment + K - 1``, written at their own positions) with ``prompt``: what the
        memories hold afterwards is what they would hold had those frames been written under
        the new prompt from the start. Everything older than the ``K`` segments is forgotten,
        as in LongLive, whose re-cache refills its KV window this way (``_recache_after_switch``:
        the window's frames, at most ``local_attn_size``, run through the model with the new
        prompt at ``context_noise = 0``). Costs ``K`` clean passes.

        Args:
            latents: ``(b K*F c H W)`` the clean latents of the segments to keep (generated or given).
            first_segment: index of the first of them.
            prompt, prompt_mask: the new prompt ``(b p e)``, ``(b p)``.
            actions: ``(b K*F a)`` their actions, when the model takes actions.

        Returns:
            the new memory states.

        Example:
            >>> import torch
            >>> from torch.utils._pytree import tree_leaves
            >>> from memkit.models.malt import MALTConfig, MALTNetwork
            >>> net = MALTNetwork(MALTConfig.preset("tiny", prompt_dim=6, memory="fifo")).eval()
            >>> window = torch.randn(1, 4, 3, 8, 8)  # the last two segments (3 and 4) of 2 frames
            >>> new_prompt = torch.randn(1, 5, 6)
            >>> states = net.recache(window, 3, prompt=new_prompt)
            >>> fresh = net.init_states(1)          # the same as writing them under the new prompt
            >>> for j, seg in ((3, window[:, :2]), (4, window[:, 2:])):
            ...     fresh = net.write(seg, fresh, net.segment_positions(j, 1), prompt=new_prompt)
            >>> all(torch.equal(a, b) for a, b in zip(tree_leaves(states), tree_leaves(fresh)))
            True
        """
        c = self.config
        f = c.frames_per_segment
        if latents.shape[1] % f:
            raise ShapeError(
                f"recache: dimension T (frames) of latents should be a multiple of F = {f} (whole segments), "
                f"got {latents.shape[1]}"
            )
        if actions is not None and actions.shape[1] != latents.shape[1]:
            raise ShapeError(
                f"recache: dimension T (frames) of actions should be {latents.shape[1]} (one per latent frame), "
                f"got {actions.shape[1]}"
            )
        b = latents.shape[0]
        states = self.init_states(b, device=latents.device, dtype=latents.dtype)
        for j in range(latents.shape[1] // f):
            pos = self.segment_positions(first_segment + j, b, latents.device)
            act = None if actions is None else actions[:, j * f : (j + 1) * f]
            states = self.write(
                latents[:, j * f : (j + 1) * f], states, pos, prompt=prompt, prompt_mask=prompt_mask, actions=act
            )
        return states

    def denoise_and_write(
        self,
        x: Tensor,
        t: Tensor,
        clean: Tensor,
        t_clean: Tensor,
        states: tuple[Any, ...],
        frame_positions: Tensor,
        *,
        prompt: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        actions: Tensor | None = None,
        drop_prompt: Tensor | None = None,
        detach_write: bool = False,
    ) -> tuple[Tensor, tuple[Any, ...]]:
        """``forward(x, t, states)`` and ``write(clean, states, t=t_clean)`` in one batched pass.

        Both read the same states, so training runs them as one batch of ``2b`` (half the
        layer calls): returns the velocity of ``x`` and the states after writing ``clean``.
        Equals the two separate calls (up to floating-point summation order).
        ``detach_write=True`` writes from ``states.detach()`` (truncated backprop cut before
        this write) while the denoising half still reads the states with their gradient.
        """
        b = x.shape[0]

        def both(a: Tensor | None, other: Tensor | None = None) -> Tensor | None:
            return None if a is None else torch.cat([a, a if other is None else other])

        doubled = map_tensors(lambda s: torch.cat([s, s.detach() if detach_write else s]), states)
        drop = None
        if drop_prompt is not None:
            drop = torch.cat([drop_prompt, torch.zeros_like(drop_prompt)])
        stream = self._embed(
            torch.cat([x, clean]),
            torch.cat([t, t_clean]),
            doubled,
            torch.cat([frame_positions, frame_positions]),
            both(prompt),
            both(prompt_mask),
            both(actions),
            drop,
        )
        # blocks up to the last memory block run on both halves and write; the rest on x's half only
        stream, new = self._blocks(stream, doubled, range(self.write_depth), write=True)
        stream, _ = self._blocks(stream.first(b), new, range(self.write_depth, self.config.depth), write=False)
        return self._head(stream, x, t), map_tensors(lambda s: s[b:], new)

    # ----------------------------------------------------------------- memory swap, save, load
    def with_memory(
        self, memory: "MemorySpec | dict[str, Any] | str", *, trust_remote_code: bool = False
    ) -> "MALTNetwork":
        """A copy of this network with another memory; shared weights are copied.

        Parameters that belong to the old memory are dropped; those of the new memory keep
        their fresh initialisation (so a memory with parameters should be trained with the
        model), and a ``UserWarning`` names them.

        Example:
            >>> from memkit.models.malt import MALTConfig, MALTNetwork
            >>> net = MALTNetwork(MALTConfig.preset("tiny"))
            >>> net.with_memory("fifo").config.memory.name
            'fifo'
        """
        from memkit.models.malt.pretrained import copy_with_memory

        return copy_with_memory(self, memory, trust_remote_code=trust_remote_code)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created).

        Each file is written atomically (:func:`memkit.io.atomic_path`): a crash leaves the
        old file or the new one, never half of one.
        """
        from memkit.models.malt.pretrained import save_pretrained

        return save_pretrained(self, directory, state_dict)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        memory: "MemorySpec | dict[str, Any] | str | None" = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
    ) -> "MALTNetwork":
        """Load a network saved by :meth:`save_pretrained` (optionally with another memory).

        Loading never runs code from the checkpoint: weights are safetensors, and the
        config may only name registered memories (see :func:`memkit.memories.build_memory`).

        Args:
            directory: the folder with ``config.json`` and ``model.safetensors``.
            memory: another memory to put in (see :meth:`with_memory`).
            device: where to put the network.
            trust_remote_code: allow a config (or ``memory``) that names ``"module:Class"``,
                which imports that module. Only for checkpoints whose origin you trust.

        Raises:
            CheckpointError: missing folder or files, unreadable weights, or weights that do
                not fit the config.
            UntrustedCodeError: the config names ``"module:Class"`` and ``trust_remote_code``
                is false (nothing was imported).
        """
        from memkit.models.malt.pretrained import load_pretrained

        return load_pretrained(cls, directory, memory=memory, device=device, trust_remote_code=trust_remote_code)

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        return (
            f"MALTNetwork(dim={c.dim}, depth={c.depth}, heads={c.heads}, frame={c.channels}x{c.height}x{c.width}, "
            f"frames_per_segment={c.frames_per_segment}, memory={c.memory.name!r} at {c.memory_layers()}, params={n})"
        )
