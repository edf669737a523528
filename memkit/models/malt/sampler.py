"""Sampling long videos with :class:`MALTNetwork`: Euler steps, guidance, the memory life cycle.

For every segment: draw noise, integrate the flow from ``t = 1`` to ``t = 0`` in ``steps``
Euler steps (each step runs the network, which reads the memory states), then pass the
finished segment through the network once more at ``t = 0`` to write the memories.
Context segments (ground truth) are only written, at the positions they occupy.
"""

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from memkit.errors import ShapeError
from memkit.layers import LayerPlan
from memkit.models.malt.codec import IdentityCodec, LatentCodec
from memkit.models.malt.diffusion import FlowMatching
from memkit.models.malt.network import MALTNetwork
from memkit.state import state_nbytes

__all__ = ["EulerSampler", "Segment", "Generation", "stream", "generate"]


@dataclasses.dataclass
class EulerSampler:
    """Euler integration of the flow ``dx/dt = v`` from ``t = 1`` to ``t = 0``.

    Attributes:
        steps: denoising steps per segment (network calls, doubled with guidance).
        cfg_scale: classifier-free guidance on the prompt; ``v = v_u + s (v_c - v_u)``.
            Ignored (one call per step) when it is 1 or there is no prompt.
        flow: the :class:`FlowMatching` path.
        write_noise: noise level ``t_w`` of the clean pass that writes the memory after each
            segment: the segment is noised to ``(1 - t_w) x + t_w eps`` and run at time ``t_w``.
            ``0`` (default) writes the clean segment, as MALT describes; a small level matches
            training, whose clean passes run at ``t_w ~ U[0, write_noise]`` (MemFlow's and
            LongLive's configs call it ``context_noise``, 0 in their releases).

    Example:
        >>> import torch
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> net = MALTNetwork(MALTConfig.preset("tiny")).eval()
        >>> noise, states, pos = torch.randn(1, 2, 3, 8, 8), net.init_states(1), net.segment_positions(0, 1)
        >>> x = EulerSampler(steps=2).sample(net, noise, states, pos)
        >>> x.shape
        torch.Size([1, 2, 3, 8, 8])
    """

    steps: int = 8
    cfg_scale: float = 1.0
    flow: FlowMatching = dataclasses.field(default_factory=FlowMatching)
    write_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.write_noise < 1.0:
            raise ValueError(f"write_noise must lie in [0, 1), got {self.write_noise}")

    @torch.no_grad()
    def sample(
        self,
        net: MALTNetwork,
        noise: Tensor,
        states: tuple[Any, ...],
        frame_positions: Tensor,
        *,
        prompt: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        actions: Tensor | None = None,
    ) -> Tensor:
        """Denoise one segment starting from ``noise (b F c H W)``; returns the clean latents."""
        x = noise
        b = x.shape[0]
        times = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64).tolist()
        guided = prompt is not None and self.cfg_scale != 1.0
        # what no step's queries change is read once for the segment (outputs unchanged, bit for bit);
        # states that are already the segment's plans (net.plan_reads) are read through as they are
        plan_reads = getattr(net, "plan_reads", None)  # any velocity model will do; a MALTNetwork plans
        if plan_reads is not None and not any(isinstance(s, LayerPlan) for s in states):
            states = plan_reads(states, frame_positions, prompt=prompt, prompt_mask=prompt_mask, actions=actions)
        for t, t_next in itertools.pairwise(times):
            tt = torch.full((b,), t, device=x.device, dtype=x.dtype)
            v = net(x, tt, states, frame_positions, prompt=prompt, prompt_mask=prompt_mask, actions=actions)
            if guided:
                v_u = net(x, tt, states, frame_positions, prompt=prompt, prompt_mask=prompt_mask, actions=actions,
                          drop_prompt=torch.ones(b, dtype=torch.bool, device=x.device))  # fmt: skip
                v = v_u + self.cfg_scale * (v - v_u)
            x = x + (t_next - t) * v
        return x


@dataclasses.dataclass
class Segment:
    """One finished segment of a stream.

    Attributes:
        index: segment index (context segments count too).
        latents: ``(b F c H W)`` clean latents.
        states: the memory states after writing this segment.
        generated: False for a context (given) segment.
        seconds: wall time spent on it (denoising and the clean pass, and a re-cache before it).
        recached: whether the memory was re-cached under this segment's prompt before it
            (``stream(recache=K)`` at a prompt switch).
    """

    index: int
    latents: Tensor
    states: tuple[Any, ...]
    generated: bool
    seconds: float
    recached: bool = False


@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        video: decoded generated frames ``(b T C H W)`` (context frames excluded).
        states: memory states after the last segment.
        ms_per_segment: wall milliseconds per generated segment.
        state_bytes: bytes of the memory states after each generated segment.
    """

    video: Tensor
    states: tuple[Any, ...]
    ms_per_segment: list[float]
    state_bytes: list[int]


def _per_segment(x: Tensor | Sequence[Tensor] | Callable[[int], Tensor] | None, index: int) -> Tensor | None:
    if x is None or isinstance(x, Tensor):
        return x
    if callable(x):
        return x(index)
    return x[index]


def _switched(before: tuple[Tensor | None, Tensor | None], now: tuple[Tensor | None, Tensor | None]) -> bool:
    """Whether the prompt (and its mask) of a segment differs from the previous segment's."""
    for a, b in zip(before, now, strict=True):
        if (a is None) != (b is None):
            return True
        if a is not None and b is not None and (a.shape != b.shape or not torch.equal(a, b)):
            return True
    return False


def stream(
    net: MALTNetwork,
    num_segments: int,
    *,
    batch_size: int = 1,
    context: Tensor | None = None,
    actions: Tensor | None = None,
    prompt: Tensor | Sequence[Tensor] | Callable[[int], Tensor] | None = None,
    prompt_mask: Tensor | Sequence[Tensor] | Callable[[int], Tensor] | None = None,
    sampler: EulerSampler | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    states: tuple[Any, ...] | None = None,
    start_segment: int = 0,
    codec: LatentCodec | None = None,
    recache: int = 0,
) -> Iterator[Segment]:
    """Yield context segments (written only) then ``num_segments`` generated ones.

    Args:
        net: the network (put it in eval mode).
        num_segments: segments to generate after the context.
        batch_size: streams generated at once (taken from ``context`` when given).
        context: pixel video ``(b K*F C H W)`` whose ``K`` segments are written first.
        actions: ``(b T a)`` per-frame actions covering context and generated frames
            (``T >= (K + num_segments) * F``), when the model takes actions.
        prompt, prompt_mask: a prompt for every segment (``(b p e)``, ``(b p)``), or a
            sequence / function of the segment index for prompts that change.
        sampler: an :class:`EulerSampler` (default 8 steps, no guidance).
        seed: noise seed: the same seed gives the same video bit for bit (the noise is
            drawn on the CPU, so also on another device); ``None`` draws a fresh seed from
            the operating system (a different video every call). Ignored when
            ``generator`` is given.
        generator: a ``torch.Generator`` to draw the noise from, on its own device (a CUDA
            generator draws on the GPU).
        states: memory states to continue from (default: empty).
        start_segment: index of the first segment (positions continue from it).
        codec: encodes ``context`` to latents (default identity).
        recache: ``K``: LongLive's re-cache at a prompt switch. When a segment's prompt (or
            mask) differs from the previous segment's, the memory is rebuilt before it from
            the last ``K`` segments' clean latents (given or generated) written under the new
            prompt (:meth:`MALTNetwork.recache`); older memory is forgotten. ``0`` (default):
            never. LongLive re-caches its whole KV window (sink included: 12 frames in v1).
    """
    if isinstance(recache, bool) or not isinstance(recache, int) or recache < 0:
        raise ValueError(f"recache must be a non-negative int (segments re-encoded at a switch), got {recache!r}")
    cfg = net.config
    codec = codec if codec is not None else IdentityCodec()
    sampler = sampler or EulerSampler()
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()  # nondeterministic: the documented meaning of seed=None
        else:
            generator.manual_seed(seed)
    device = net.spatial.device
    dtype = net.spatial.dtype
    F_ = cfg.frames_per_segment
    ctx_latents = None
    if context is not None:
        ctx_latents = codec.encode(context.to(device=device, dtype=dtype))
        if ctx_latents.ndim != 5 or ctx_latents.shape[1] % F_:
            raise ShapeError(
                f"context: expected latents (b K*F c H W) with F = {F_} frames per segment, "
                f"got shape {tuple(ctx_latents.shape)}"
            )
        batch_size = ctx_latents.shape[0]
    n_ctx = 0 if ctx_latents is None else ctx_latents.shape[1] // F_
    if actions is not None:
        if actions.ndim != 3 or actions.shape[0] != batch_size:
            raise ShapeError(f"actions: expected (b T a) with b = {batch_size}, got shape {tuple(actions.shape)}")
        if actions.shape[1] < (n_ctx + num_segments) * F_:
            raise ShapeError(
                f"actions: dimension T (frames) should be at least {(n_ctx + num_segments) * F_} "
                f"({n_ctx} context + {num_segments} generated segments of {F_} frames), got {actions.shape[1]}"
            )
        actions = actions.to(device=device, dtype=dtype)
    if states is None:
        states = net.init_states(batch_size, device=device, dtype=dtype)
    shape = (batch_size, F_, cfg.channels, cfg.height, cfg.width)
    # (index, clean latents, actions) of the last `recache` segments, for a re-cache at a switch
    history: list[tuple[int, Tensor, Tensor | None]] = []
    before: tuple[Tensor | None, Tensor | None] = (None, None)

    for j in range(n_ctx + num_segments):
        index = start_segment + j
        started = time.perf_counter()
        pos = net.segment_positions(index, batch_size, device)
        act = None if actions is None else actions[:, j * F_ : (j + 1) * F_]
        p = _per_segment(prompt, index)
        pm = _per_segment(prompt_mask, index)
        switched = bool(recache) and bool(history) and _switched(before, (p, pm))
        before = (p, pm)
        with torch.no_grad():
            if switched:
                acts = None if actions is None else torch.cat([a for _, _, a in history if a is not None], dim=1)
                lat = torch.cat([x for _, x, _ in history], dim=1)
                states = net.recache(lat, history[0][0], prompt=p, prompt_mask=pm, actions=acts)
            if ctx_latents is not None and j < n_ctx:
                x = ctx_latents[:, j * F_ : (j + 1) * F_]
            else:
                noise = torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)
                # one plan for the denoising steps and the clean pass: the write reads through it too
                plan_reads = getattr(net, "plan_reads", None)
                if plan_reads is not None:
                    states = plan_reads(states, pos, prompt=p, prompt_mask=pm, actions=act)
                x = sampler.sample(net, noise, states, pos, prompt=p, prompt_mask=pm, actions=act)
            written, t_w = x, None
            if sampler.write_noise > 0:  # drawn only then: the default keeps every seed's video unchanged
                eps = torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)
                t_w = torch.full((x.shape[0],), sampler.write_noise, device=device, dtype=dtype)
                written = sampler.flow.interpolate(x, eps, t_w)
            states = net.write(written, states, pos, t=t_w, prompt=p, prompt_mask=pm, actions=act)
        if recache:
            history = [*history, (index, x, act)][-recache:]
        yield Segment(index, x, states, j >= n_ctx, time.perf_counter() - started, switched)


def generate(
    net: MALTNetwork,
    num_segments: int,
    *,
    codec: LatentCodec | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> Generation:
    """Generate ``num_segments`` segments (after optional context); see :func:`stream` for arguments.

    Example:
        >>> import torch
        >>> from memkit.models.malt import MALTConfig, MALTNetwork, EulerSampler
        >>> net = MALTNetwork(MALTConfig.preset("tiny", memory="fifo")).eval()
        >>> out = generate(net, 3, sampler=EulerSampler(steps=2), seed=0)
        >>> out.video.shape, len(set(out.state_bytes))
        (torch.Size([1, 6, 3, 8, 8]), 1)
    """
    codec = codec if codec is not None else IdentityCodec()
    frames: list[Tensor] = []
    ms: list[float] = []
    nbytes: list[int] = []
    states: tuple[Any, ...] = ()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_segments, unit="seg", desc="generating")
    for seg in stream(net, num_segments, codec=codec, **kwargs):
        states = seg.states
        if seg.generated:
            frames.append(seg.latents)
            ms.append(seg.seconds * 1000.0)
            nbytes.append(state_nbytes(seg.states))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    latents = torch.cat(frames, dim=1) if frames else torch.zeros(0)
    video = codec.decode(latents) if frames else latents
    return Generation(video=video, states=states, ms_per_segment=ms, state_bytes=nbytes)
