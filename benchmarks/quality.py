"""Quality: what each memory lets a trained backbone remember, and PromptBank's retrieval.

* **PSNR of revisited frames** (revisit world): the first half of a clip (the outbound pan)
  is given as context, the backbone generates the second half (the way back), and the
  generated frames that show a place the context showed are compared with the truth.
  Clips are as long as the longest the checkpoint trained on (``psnr_segments`` sets another
  length); quality past the trained length is :mod:`benchmarks.length`'s section.
  Needs a trained checkpoint (``config.json`` + ``model.safetensors`` and, to know its
  world, ``train_config.json``): ``MEMKIT_BENCH_CHECKPOINT``, or any such folder under
  ``memkit/assets/``. A memory without parameters can replace the one the checkpoint was
  trained with; a memory with trained parameters (RecurrentMemory) needs its own checkpoint.
* **PSNR after returning to a scene** (scenes world): the same with a checkpoint trained on
  the scenes world (one with prompts).
* **PromptBank retrieval precision**, at memory level on the scenes world: each frame's keys
  are built to be text-aligned (a model trained with text would make them so): token ``j``
  of a frame of scene ``X`` is ``a * u_X[j mod p] + b * P(pixels_j)``, with ``u_X`` the scene's
  prompt tokens and ``P`` a fixed random projection of the token's pixels. A read for a
  segment of a scene seen before should return that scene's frames. Precision@r: of the
  ``r = min(B, frames of the scene in the pool)`` best-ranked returned frames, the share from
  the prompted scene (every returned frame when the pool holds ``B`` or more).
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

import memkit
from benchmarks.common import ROOT, Section, checkpoint_folders
from benchmarks.markdown import fmt, notes, skipped, table
from benchmarks.roster import roster


@dataclasses.dataclass
class QualitySettings:
    # PromptBank retrieval (memory level)
    clips: int = 16
    segments: int = 32
    heads: int = 4
    head_dim: int = 16
    frame_size: int = 16
    patch: int = 4
    frames_per_segment: int = 3
    bank_frames: int = 3
    text_weight: float = 1.0  # a
    pixel_weight: float = 1.0  # b
    # PSNR with a checkpoint
    psnr_clips: int = 8
    psnr_segments: int | None = None  # default: the longest clip the checkpoint trained on (made even)
    sampler_steps: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- retrieval precision


def _patch_tokens(frames: Tensor, patch: int) -> Tensor:
    """``(F c H W) -> (F t c*patch*patch)``, tokens row-major."""
    f, c, h, w = frames.shape
    x = frames.reshape(f, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(f, (h // patch) * (w // patch), c * patch * patch)


@torch.no_grad()
def bank_reads(st: QualitySettings, mem: Any, clips: Iterable[int]) -> Iterator[tuple[int, list[int], list[int]]]:
    """Every read of a scene shown before, by a PromptBank on text-aligned keys (section 4b's set-up).

    Yields ``(prompted scene, scenes of the pool's valid frames, scenes of the returned valid
    frames in slot order)``; ``clips`` are the clip indices (``st.seed + i`` seeds the clip).
    """
    from memkit.data import scene_clip

    h, d, f, p = st.heads, st.head_dim, st.frames_per_segment, st.patch
    e, t = h * d, (st.frame_size // p) ** 2
    g = torch.Generator().manual_seed(st.seed)
    proj = torch.randn(3 * p * p, e, generator=g) / math.sqrt(3 * p * p)
    for clip_i in clips:
        clip = scene_clip(st.seed + clip_i, f, st.segments, st.frame_size, num_scenes=3, prompt_dim=e)
        ids = clip.scene_ids.tolist()
        state = mem.init_state(1)
        for s in range(st.segments):
            prompt, pmask = clip.prompts[s][None], clip.prompt_mask[s][None]
            pos = (s * f + torch.arange(f))[None]
            if s > 0 and ids[s] in ids[:s]:
                pool = [ids[int(x) // f] for x, ok in zip(state.pool.pos[0], state.pool.valid[0], strict=True) if ok]
                q = torch.randn((1, h, f * t, d), generator=g)
                ctx = mem.read(state, memkit.Query(q, pos, t, prompt, pmask))
                slots = zip(ctx.positions[0, 0, ::t].tolist(), ctx.mask[0, 0, ::t].tolist(), strict=True)
                yield ids[s], pool, [ids[int(x) // f] for x, ok in slots if ok]
            # the segment's frames, keyed as a text-aligned model would key them
            frames = clip.video[s * f : (s + 1) * f]
            real = clip.prompts[s][clip.prompt_mask[s]]  # (p_real e)
            text = real[torch.arange(t) % real.shape[0]]  # (t e)
            keys = st.text_weight * text[None] + st.pixel_weight * (_patch_tokens(frames, p) @ proj)  # (f t e)
            k = keys.reshape(f * t, h, d).permute(1, 0, 2)[None].contiguous()
            state = mem.write(state, memkit.Chunk(k, k, torch.zeros(1, f * t, e), pos, t, prompt, pmask))


def prompt_bank_precision(st: QualitySettings) -> Section:
    """Section 4b: PromptBank's retrieval precision on the scenes world, at memory level."""
    sec = Section("retrieval", "PromptBank retrieval precision (scenes world, memory level)")
    if not hasattr(memkit, "PromptBankMemory"):
        sec.skip("skipped: not available yet: memkit.PromptBankMemory")
        return sec

    h, d, f, p = st.heads, st.head_dim, st.frames_per_segment, st.patch
    e = h * d
    t = (st.frame_size // p) ** 2
    sec.config = {
        "settings": st.to_dict(),
        "memory": f"PromptBankMemory(heads={h}, head_dim={d}, tokens_per_frame={t}, bank_frames={st.bank_frames})",
        "world": f"scene_clip(seed, frames_per_segment={f}, segments={st.segments}, frame_size={st.frame_size}, "
        f"num_scenes=3, prompt_dim={e})",
        "keys": "token j of a frame of scene X: a * u_X[j mod p_real] + b * P(pixels_j), P fixed random "
        f"(a = {st.text_weight}, b = {st.pixel_weight})",
        "evaluated": "the read of every segment whose scene was shown before",
        "precision_at_r": "share of the prompted scene among the r best-ranked returned frames, "
        "r = min(bank_frames, frames of that scene in the pool)",
        "precision_all": "share of the prompted scene among all valid returned frames",
        "available": "share of evaluated reads whose pool held at least one frame of the prompted scene",
    }
    mem = memkit.PromptBankMemory(h, d, t, bank_frames=st.bank_frames)
    hits_r, total_r, hits_all, total_all, evaluated, available = 0, 0, 0, 0, 0, 0
    clips = tqdm(range(st.clips), desc="retrieval precision", unit="clip")
    for want, pool_scenes, got in bank_reads(st, mem, clips):
        evaluated += 1
        in_pool = sum(1 for x in pool_scenes if x == want)
        hits_all += sum(1 for x in got if x == want)
        total_all += len(got)
        if in_pool:
            available += 1
            r = min(st.bank_frames, in_pool)
            hits_r += sum(1 for x in got[:r] if x == want)
            total_r += r
    if total_r == 0:
        sec.skip("skipped: no evaluated read found a frame of its scene in the pool")
        return sec
    params = {"memory": "PromptBankMemory", "clips": st.clips, "segments": st.segments}
    sec.add("precision_at_r", hits_r / total_r, "fraction", params=params, n=total_r)
    sec.add("precision_all", hits_all / max(total_all, 1), "fraction", params=params, n=total_all)
    sec.add("available", available / max(evaluated, 1), "fraction", params=params, n=evaluated)
    return sec


# --------------------------------------------------------------------------- PSNR with a checkpoint


def find_checkpoints() -> list[Path]:
    """Folders holding a trained MALT checkpoint: ``$MEMKIT_BENCH_CHECKPOINT`` first, then ``memkit/assets``."""
    env = os.environ.get("MEMKIT_BENCH_CHECKPOINT")
    roots = [Path(x) for x in env.split(os.pathsep)] if env else []
    roots.append(ROOT / "memkit" / "assets")
    return checkpoint_folders(roots)


def _psnr(a: Tensor, b: Tensor) -> float:
    """Mean over frames of each frame's PSNR in dB, frames ``(T c h w)`` in ``[-1, 1]`` (peak-to-peak 2).

    Unclamped and per frame, as ``memkit.train.evaluate.psnr`` (so the numbers match ``memkit demo``).
    """
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10.0 * torch.log10(4.0 / mse)).mean())


def _swap(net: Any, memories: list[Any]) -> Any:
    """The same network with other memories; every non-memory weight copied."""
    from memkit.models.malt import MALTNetwork

    other = MALTNetwork(net.config, memories).eval()
    own = {k: v for k, v in net.state_dict().items() if ".attn.memory." not in k}
    _, unexpected = other.load_state_dict(own, strict=False)
    assert not unexpected, unexpected
    return other


SWAP_HOSTS = ("sparse_kv", "fifo", "sink_window", "prompt_bank")


def checkpoint_psnr(st: QualitySettings, quick: bool) -> Section:
    """Section 4a: PSNR of revisited frames / returning scenes, per memory, with trained backbones.

    Every checkpoint is measured with the memory it was trained with. The parameter-free
    memories (and the full-history baseline) are also swapped into one checkpoint trained
    with a frame memory (the first of ``SWAP_HOSTS`` found), keeping its weights.
    """
    sec = Section("quality", "Quality with the trained backbone")
    try:
        from memkit.models.malt import MALTNetwork
        from memkit.train import DataSpec, build_world, prepare_sample
    except ImportError as err:
        sec.skip(f"skipped: not available yet: the backbone or the training package ({err})")
        return sec
    checkpoints = find_checkpoints()
    if not checkpoints:
        sec.skip(
            "skipped: not available yet: no trained checkpoint (set MEMKIT_BENCH_CHECKPOINT or add one under "
            "memkit/assets/), so no PSNR per memory"
        )
        return sec
    loaded = []
    for path in checkpoints:
        net = MALTNetwork.from_pretrained(path).eval()
        tc_path = path / "train_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        spec = DataSpec.from_dict(tc.get("data", {"world": "revisit", "pose_actions": net.config.action_dim == 4}))
        if spec.world == "revisit" and spec.kwargs.get("path", "out_and_back") != "out_and_back":
            # half a sweep clip is not an out-and-back clip: these are scored by the length section
            sec.notes.append(
                f"skipped {path.name}: trained on the sweep path family {spec.kwargs['path']!r}; "
                "its quality along length and lag is in the length section"
            )
            continue
        stages = [int(s) for _, s in tc.get("curriculum", [])]
        trained_segments = max([int(tc.get("segments", 8)), *stages])
        loaded.append((path, net, spec, trained_segments))
    names = [n.config.memory.name for _, n, _, _ in loaded]
    host = next((name for name in SWAP_HOSTS if name in names), None)
    sec.config = {
        "checkpoints": [_rel(p) for p, *_ in loaded],
        "settings": st.to_dict(),
        "protocol": "the first half of each clip is given as context (written through the clean pass), the "
        "second half is generated; PSNR (peak-to-peak 2) against the ground truth, mean over clips",
        "clips": f"seeds 100000 + i (as memkit demo), {1 if quick else st.psnr_clips} per memory",
        "segments": "psnr_segments, else the longest clip the checkpoint trained on (at most 4 in a quick run), "
        "made even",
        "swapped_into": host,
    }
    if host is None:
        sec.notes.append("skipped the swapped memories: no checkpoint trained with a parameter-free frame memory")
    worlds_done: set[str] = set()
    for path, net, spec, trained_segments in loaded:
        segments = st.psnr_segments or trained_segments
        if quick:
            segments = min(segments, 4)
        segments += segments % 2
        label = f"{path.name} ({spec.world}, trained with {net.config.memory.name})"
        swap = net.config.memory.name == host and spec.world not in worlds_done
        _eval_checkpoint(sec, net, spec, label, segments, st, quick, swap, build_world, prepare_sample)
        worlds_done.add(spec.world)
    for world in ("revisit", "scenes"):
        if world not in worlds_done:
            sec.notes.append(f"skipped the {world} world: no checkpoint trained on it")
    return sec


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


@torch.no_grad()
def _eval_checkpoint(
    sec: Section,
    net: Any,
    spec: Any,
    label: str,
    segments: int,
    st: QualitySettings,
    quick: bool,
    swap: bool,
    build_world: Any,
    prepare_sample: Any,
) -> None:
    from memkit.models.malt import EulerSampler, stream

    cfg = net.config
    layers = set(cfg.memory_layers())
    trained_class = type(net.blocks[min(layers)].attn.memory).__name__ if layers else "NoMemory"
    world = build_world(spec, cfg, segments)
    half = segments // 2
    f_ = cfg.frames_per_segment
    clips = 1 if quick else st.psnr_clips
    variants: list[tuple[str, Any]] = [(f"{trained_class} (as trained)", net)]
    if swap:
        for e in roster(_geometry(cfg)):
            if e.make is None:
                sec.notes.append(f"{label}: skipped {e.name}: {e.why}")
                continue
            if e.name == trained_class:
                continue
            probe = e.make()
            if isinstance(probe, torch.nn.Module) and any(True for _ in probe.parameters()):
                sec.notes.append(f"{label}: skipped {e.name}: it has trained parameters and needs its own checkpoint")
                continue
            variants.append((e.name, _swap(net, [e.make() if i in layers else None for i in range(cfg.depth)])))
    sampler = EulerSampler(steps=st.sampler_steps)
    for name, model in tqdm(variants, desc=f"quality {label[:30]}", unit="memory"):
        returning, everything = [], []
        for c in range(clips):
            seed = 100_000 + c  # the demo's clips; training draws hashed seeds
            sample = prepare_sample(world.sample(seed), spec, cfg)
            video = sample["video"]  # (S F c h w)
            context = video[:half].reshape(1, half * f_, *video.shape[2:])
            kwargs: dict[str, Any] = {}
            if "actions" in sample:
                kwargs["actions"] = sample["actions"].reshape(1, segments * f_, -1)
            if "prompt" in sample:
                kwargs["prompt"] = [sample["prompt"][s][None] for s in range(segments)]
                kwargs["prompt_mask"] = [sample["prompt_mask"][s][None] for s in range(segments)]
            made = [
                seg.latents
                for seg in stream(model, segments - half, context=context, sampler=sampler, seed=0, **kwargs)
                if seg.generated
            ]
            generated = torch.cat(made, dim=1)[0]  # (T' c h w)
            truth = video[half:].reshape(-1, *video.shape[2:])
            everything.append(_psnr(generated, truth))
            targets = _return_frames(world, seed, spec, half * f_, segments * f_)
            if targets:
                idx = torch.tensor(targets) - half * f_
                returning.append(_psnr(generated[idx], truth[idx]))
        p = {"memory": name, "checkpoint": label, "clips": clips, "segments": segments, "context_segments": half}
        if returning:
            metric = "psnr_revisited" if spec.world == "revisit" else "psnr_returning_scene"
            sec.add(metric, sum(returning) / len(returning), "dB", params=p)
        sec.add("psnr_all_generated", sum(everything) / len(everything), "dB", params=p)


def _return_frames(world: Any, seed: int, spec: Any, start: int, end: int) -> list[int]:
    """Generated frames (``start <= i < end``) that show something the context showed."""
    clip = world.clip(seed)
    if spec.world == "revisit":
        pairs = clip.revisit_pairs.tolist()
        return sorted({a for a, b in pairs if start <= a < end and b < start})
    f = clip.frames_per_segment
    ids = clip.scene_ids.tolist()
    seen = set(ids[: start // f])
    return [i for i in range(start, end) if ids[i // f] in seen]


def _geometry(cfg: Any) -> Any:
    from benchmarks.cost import backbone_geometry

    capacity = int(cfg.memory.kwargs.get("capacity", 16)) if cfg.memory.name == "sparse_kv" else 16
    return backbone_geometry(cfg, capacity)


# --------------------------------------------------------------------------- report


def render_quality(add: Callable[[str], None], sec: dict[str, Any] | None, ret: dict[str, Any] | None) -> None:
    title = "4. Quality with the trained backbone"
    if not skipped(add, sec, title):
        assert sec is not None
        add(f"## {title}\n")
        figs = sec["figures"]
        rows = []
        for f in figs:
            if f["name"] in ("psnr_revisited", "psnr_returning_scene"):
                allg = next((x for x in figs if x["name"] == "psnr_all_generated" and x["params"] == f["params"]), None)
                rows.append(
                    [
                        f["params"]["checkpoint"],
                        f["params"]["memory"],
                        f["name"].replace("psnr_", ""),
                        fmt(f["value"]),
                        fmt(allg["value"]) if allg else "-",
                    ]
                )
        add(table(["checkpoint", "memory", "frames", "PSNR dB", "PSNR dB, all generated"], rows) + "\n")
        notes(add, sec)
    title = "4b. PromptBank retrieval precision"
    if not skipped(add, ret, title):
        assert ret is not None
        add(f"## {title}\n")
        cfg = ret["config"]
        add(
            f"Memory level, scenes world: {cfg['world']}; {cfg['memory']}. Keys: {cfg['keys']}. Evaluated: "
            f"{cfg['evaluated']}.\n"
        )
        rows = []
        for name in ("precision_at_r", "precision_all", "available"):
            f = next((x for x in ret["figures"] if x["name"] == name), None)
            if f:
                rows.append([name, fmt(f["value"], "fraction"), str(f.get("n", "-")), cfg[name]])
        add(table(["figure", "value", "reads or frames", "meaning"], rows) + "\n")
        notes(add, ret)
