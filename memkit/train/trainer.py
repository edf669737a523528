"""The MALT training loop: unrolled segments, memory truncation, noise augmentation, EMA, DDP.

One step, per clip of ``S`` segments (all in one differentiable unroll)::

    states = empty
    for s in 0 .. S-1:
        loss_s = || net(x_t, t, states) - (eps - x_0) ||^2      # denoise segment s, reading memory
        if truncate_segments = K and s is a positive multiple of K: cut = states.detach()
        states = net.write(x_0 noised to t_w ~ U[0, write_noise], cut or states)   # the clean pass
    loss = mean_s loss_s

The same script runs single-process or under ``torchrun --nproc_per_node=N`` (gloo on CPU,
nccl on GPU): :class:`torch.nn.parallel.DistributedDataParallel` wraps the whole unroll, so
gradients are averaged once per step, and each rank draws its own clips.
"""

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from memkit.models.malt import FlowMatching, MALTNetwork
from memkit.state import map_tensors
from memkit.train.checkpoints import TRAIN_DIR, init_weights_from, load_training, recover_training, save_training
from memkit.train.config import TrainConfig
from memkit.train.data import build_world, make_batch

__all__ = [
    "UnrolledLoss",
    "TrainResult",
    "train",
    "setup_distributed",
    "save_training",
    "load_training",
    "recover_training",
]


class UnrolledLoss(nn.Module):
    """The flow-matching loss of a clip of ``S`` segments generated one after another with memory.

    Args:
        net: the :class:`MALTNetwork`.
        flow: the :class:`FlowMatching` path.
        write_noise: the clean pass runs at a noise level drawn from ``U[0, write_noise]``.
        prompt_dropout: probability of dropping each clip's prompt.
        truncate_segments: ``K``: the write of every ``K``-th segment starts from detached states,
            so a loss's gradient reaches back at most ``K`` writes and at least the last one
            (``K = 1``: stop-gradient across segments, each write still trained by the next
            segment's loss). ``None``: backprop through the whole unroll.
        fused: run each segment's denoising and clean passes as one batch
            (:meth:`MALTNetwork.denoise_and_write`; same loss, fewer layer calls).
        retrieval_weight: weight of the auxiliary retrieval loss of the
            :class:`memkit.PromptBankMemory` layers (:mod:`memkit.train.retrieval`), added to
            the flow-matching loss; ``0`` (default) computes none.
        retrieval_detach_keys: the retrieval loss sees the written keys detached, so it trains
            only the prompt projection(s); ``False`` also lets it shape the keys.

    Example:
        >>> import torch
        >>> from memkit.models.malt import MALTConfig, MALTNetwork, FlowMatching
        >>> net = MALTNetwork(MALTConfig.preset("tiny", memory="fifo"))
        >>> loss = UnrolledLoss(net, FlowMatching())(torch.randn(2, 3, 2, 3, 8, 8), seed=0)
        >>> loss.ndim, bool(loss.isfinite())
        (0, True)
    """

    def __init__(
        self,
        net: MALTNetwork,
        flow: FlowMatching,
        *,
        write_noise: float = 0.1,
        prompt_dropout: float = 0.0,
        truncate_segments: int | None = None,
        fused: bool = True,
        retrieval_weight: float = 0.0,
        retrieval_detach_keys: bool = False,
    ) -> None:
        super().__init__()
        self.net, self.flow, self.fused = net, flow, fused
        self.retrieval_weight, self.retrieval_detach_keys = retrieval_weight, retrieval_detach_keys
        #: the last forward's retrieval loss (a float), or None without one
        self.last_retrieval: float | None = None
        self.write_noise, self.prompt_dropout, self.truncate_segments = write_noise, prompt_dropout, truncate_segments

    def forward(
        self,
        video: Tensor,
        actions: Tensor | None = None,
        prompt: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        *,
        seed: int = 0,
    ) -> Tensor:
        """``video (B S F c h w)``, ``actions (B S F a)``, ``prompt (B S p e)``, ``prompt_mask (B S p)``."""
        net, flow = self.net, self.flow
        g = torch.Generator().manual_seed(seed)
        b, segments = video.shape[:2]
        device, dtype = video.device, video.dtype
        states = net.init_states(b, device=device, dtype=dtype)

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=g).to(device=device, dtype=dtype)

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

        drop = None
        if prompt is not None:
            drop = (torch.rand(b, generator=g) < self.prompt_dropout).to(device)
        losses = []
        retrieval = self.retrieval_weight > 0 and prompt is not None
        written: list[tuple[Any, ...]] = []
        for s in range(segments):
            x0 = video[:, s]
            pos = net.segment_positions(s, b, device)
            act = None if actions is None else actions[:, s]
            p = None if prompt is None else prompt[:, s]
            pm = None if prompt_mask is None else prompt_mask[:, s]
            t = flow.sample_time(b, generator=g, device=device).to(dtype)
            noise = randn(*x0.shape)
            xt = flow.interpolate(x0, noise, t)
            cond = dict(prompt=p, prompt_mask=pm, actions=act)
            if s + 1 < segments:
                tw = rand(b) * self.write_noise
                xw = flow.interpolate(x0, randn(*x0.shape), tw)
                # the cut goes before the write, not after it: cutting after would leave the next
                # loss reading a detached state, and with K = 1 no write would ever get a gradient
                cut = self.truncate_segments is not None and s > 0 and s % self.truncate_segments == 0
                if self.fused:
                    v, states = net.denoise_and_write(
                        xt, t, xw, tw, states, pos, drop_prompt=drop, detach_write=cut, **cond
                    )
                else:
                    v = net(xt, t, states, pos, drop_prompt=drop, **cond)
                    write_from = map_tensors(Tensor.detach, states) if cut else states
                    states = net.write(xw, write_from, pos, t=tw, **cond)
                if retrieval:
                    written.append(states)
            else:
                v = net(xt, t, states, pos, drop_prompt=drop, **cond)
            losses.append(flow.loss(v, x0, noise))
        loss = torch.stack(losses).mean()
        self.last_retrieval = None
        if retrieval and prompt is not None:
            aux = self._retrieval(written, prompt, prompt_mask)
            self.last_retrieval = float(aux.detach())
            loss = loss + self.retrieval_weight * aux
        return loss

    def _retrieval(self, written: list[tuple[Any, ...]], prompt: Tensor, prompt_mask: Tensor | None) -> Tensor:
        """The banks' retrieval loss over the clip's writes (:func:`memkit.train.retrieval.bank_retrieval_loss`)."""
        from memkit.train.retrieval import bank_retrieval_loss, collect_bank_keys, same_prompt

        banks = collect_bank_keys(self.net, written)
        if self.retrieval_detach_keys:
            banks = [(mem, keys.detach(), ok) for mem, keys, ok in banks]
        seen = prompt
        if self.net.prompt_proj is not None:  # what the memories are handed (MALTNetwork._embed)
            seen = self.net.prompt_proj(prompt.to(self.net.patch_in.weight.dtype))
        return bank_retrieval_loss(banks, seen, prompt_mask, same_prompt(prompt, prompt_mask))


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        net: the trained network (raw weights, on its device).
        ema: the EMA weights (a state dict), what ``model.safetensors`` holds.
        step: steps done in total.
        losses: the loss of every step run by this call (mean over ranks).
        out: the output folder.
    """

    net: MALTNetwork
    ema: dict[str, Tensor]
    step: int
    losses: list[float]
    out: Path


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; joins the process group when ``WORLD_SIZE > 1``.

    Uses nccl on CUDA and gloo on CPU; a group initialised by the caller is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    return rank, world, dev


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in net.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )


def _clip_seeds(config: TrainConfig, step: int, rank: int, world: int) -> list[int]:
    b = config.batch_size
    base = (step * world + rank) * b
    # SeedSequence mixes (data seed, index) so different data seeds share no clips
    return [int(np.random.SeedSequence([config.data.seed, base + i]).generate_state(1)[0]) for i in range(b)]


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    steps: int | None = None,
    device: str | None = None,
    progress: bool = True,
    resume: bool = True,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train a MALT model, single-process or under ``torchrun``; write checkpoints into ``out``.

    Args:
        config: the :class:`TrainConfig`.
        out: output folder: ``config.json`` + ``model.safetensors`` (EMA weights, loadable
            with :meth:`MALTNetwork.from_pretrained`), ``train_config.json``, ``log.jsonl``
            (one JSON line per step) and ``train/`` (raw weights, optimizer, step).
        steps: train up to this step count (default ``config.steps``).
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        progress: show a tqdm progress bar (rank 0).
        resume: continue from a checkpoint in ``out`` when there is one.
        trust_remote_code: let the config's memory be ``"module:Class"`` (imported and
            built; see :func:`memkit.memories.build_memory`).
    """
    out = Path(out)
    total = config.steps if steps is None else steps
    if steps is not None:
        config = config.replace(steps=steps)
    rank, world, dev = setup_distributed(device)
    torch.manual_seed(config.seed)
    net = MALTNetwork(config.model, trust_remote_code=trust_remote_code).to(dev).train()
    opt = _optimizer(net, config)
    step = 0
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if resume and rank == 0:
        recover_training(out)
    if resume and world > 1:
        dist.barrier()
    if resume and (out / TRAIN_DIR / "state.json").is_file():
        step, ema = load_training(out, net, opt, dev)
    elif config.init_from is not None:
        copied = init_weights_from(net, config.init_from, trust_remote_code=trust_remote_code)
        ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if rank == 0 and progress:
            print(f"init_from {config.init_from}: copied {copied} of {len(ema)} tensors")
    flow = FlowMatching(time_sampling=config.time_sampling)
    module: nn.Module = UnrolledLoss(
        net,
        flow,
        write_noise=config.write_noise,
        prompt_dropout=config.prompt_dropout,
        truncate_segments=config.truncate_segments,
        retrieval_weight=config.retrieval_weight,
        retrieval_detach_keys=config.retrieval_detach_keys,
    )
    unrolled = module
    if world > 1:
        # with one-segment unrolls the memory's write parameters take no part in the loss
        unused = min(config.segments_at(s) for s in range(step, max(total, step + 1))) < 2
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=unused
        )
    worlds: dict[int, Any] = {}
    losses: list[float] = []
    bar = None
    if progress and rank == 0 and step < total:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", desc="training", dynamic_ncols=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a") if rank == 0 else None  # closed in the finally below
    try:
        while step < total:
            started = time.perf_counter()
            segments = config.segments_at(step)
            if segments not in worlds:
                worlds[segments] = build_world(config.data, config.model, segments)
            batch = make_batch(worlds[segments], config.data, config.model, _clip_seeds(config, step, rank, world))
            batch = {k: v.to(dev) for k, v in batch.items()}
            lr = config.lr * _lr_factor(step, config)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = module(**batch, seed=config.seed * 1_000_003 + step * world + rank)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            opt.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    if v.is_floating_point():
                        ema[k].lerp_(v, 1 - decay)
                    else:
                        ema[k].copy_(v)
            value = loss.detach()
            if world > 1:
                dist.all_reduce(value)
                value = value / world
            loss_value = float(value)
            losses.append(loss_value)
            step += 1
            if log is not None:
                record = {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "segments": segments,
                    "grad_norm": float(grad_norm),
                    "seconds": time.perf_counter() - started,
                }
                if isinstance(unrolled, UnrolledLoss) and unrolled.last_retrieval is not None:
                    record["retrieval"] = unrolled.last_retrieval
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.update(1)
                if step % config.log_every == 0 or step == total:
                    bar.set_postfix(loss=f"{loss_value:.4f}", S=segments)
            if step % config.checkpoint_every == 0 or step == total:
                if rank == 0:
                    save_training(out, net, ema, opt, config, step)
                if world > 1:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return TrainResult(net=net, ema=ema, step=step, losses=losses, out=out)
