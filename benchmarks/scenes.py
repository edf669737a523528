"""Prompt switches (issue 14 item 5): the scenes world, PromptBank and its rivals, re-cache and the cut-off.

A checkpoint trained on the scenes world (``demo-scenes``: a PromptBank of 3 frames, 4 scenes a
clip, the scene switching at every one-frame segment) generates clips that follow one fixed
schedule of scenes: the first ``context_segments`` (every scene once) are given, the rest are
generated, each under its scene's prompt. Every generated segment is a prompt switch and a
return to a scene seen before; the last one returns to the scene prompted only at segment 0
(a scene not prompted for a while). Each clip draws new pictures and new prompts, so only
memory can tell the model what a scene looks like.

Memories (swapped into the same weights, all parameter-free): the PromptBank as trained, with a
relevance cut-off, beside a SparseKV ring (PromptBank+SparseKV), a sink + window at the same
budget of frames, and none; each frame memory also with LongLive's re-cache (the last
``recache_segments`` segments re-written under the new prompt at every switch).

Figures: PSNR and SSIM of the generated frames against the truth (recent returns: the
segments before the last; the long return: the last), and for the banks the precision of a
read (the share of the frames it returns that show the prompted scene), the share of reads
that return at least one frame of it, and the frames a read returns; averaged over the memory
layers, read with the network's own projected prompt, as the backbone reads. A reference row
scores a flat grey frame on the same frames.
"""

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from benchmarks.common import Section
from benchmarks.markdown import skipped, table

SECTION = "scenes"


@dataclasses.dataclass
class ScenesSettings:
    """What the section measures."""

    clips: int = 16
    steps: int = 8
    # the scene of every segment: each scene once (context), then returns; the last returns to scene 0
    schedule: tuple[int, ...] = (0, 1, 2, 3, 1, 2, 3, 1, 2, 0)
    context_segments: int = 4
    recache_segments: int = 4  # LongLive re-caches its window: the sink + window budget (1 + 3 frames)
    cutoff: float = 0.25  # 1 / (B + 1): more than an equal share of the prompt's attention
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scenes_checkpoints() -> list[Path]:
    """Checkpoints trained on the scenes world (``$MEMKIT_BENCH_CHECKPOINT``, else the bundled ones)."""
    import json

    from benchmarks.length import candidate_checkpoints

    out = []
    for path in candidate_checkpoints():
        tc = path / "train_config.json"
        if tc.is_file() and json.loads(tc.read_text()).get("data", {}).get("world") == "scenes":
            out.append(path)
    return out


def variants(h: int, d: int, t: int, st: ScenesSettings) -> list[tuple[str, Callable[[], Any], bool]]:
    """``(label, memory factory, re-cache)`` for every memory measured."""
    import memkit

    def bank(cutoff: float | None = None) -> Any:
        return memkit.PromptBankMemory(h, d, t, bank_frames=3, min_relevance=cutoff)

    def composed(cutoff: float | None = None) -> Any:
        # the roster's PromptBank+SparseKV at one-frame segments: bank 3 + a ring with 1 sink frame + top 1
        return memkit.compose(bank(cutoff), memkit.SparseKVMemory(h, d, t, capacity=16, top_k=1, always_frames=1))

    def sink() -> Any:
        return memkit.SinkWindowMemory(h, d, t, sink_frames=1, window_frames=3)

    c = st.cutoff
    out: list[tuple[str, Callable[[], Any], bool]] = [
        ("PromptBank B3 (as trained)", bank, False),
        (f"PromptBank B3, cut-off {c:g}", lambda: bank(c), False),
        ("PromptBank+SparseKV", composed, False),
        (f"PromptBank+SparseKV, cut-off {c:g}", lambda: composed(c), False),
        ("SinkWindow 1+3", sink, False),
        ("none", memkit.NoMemory, False),
    ]
    if not st.quick:
        out += [
            ("PromptBank B3 + re-cache", bank, True),
            (f"PromptBank B3, cut-off {c:g} + re-cache", lambda: bank(c), True),
            ("PromptBank+SparseKV + re-cache", composed, True),
            ("SinkWindow 1+3 + re-cache", sink, True),
        ]
    return out


def _bank_of(memory: Any, state: Any) -> tuple[Any, Any] | None:
    """The PromptBankMemory in ``memory`` (itself or a composition's member) and its state."""
    import memkit

    if isinstance(memory, memkit.PromptBankMemory):
        return memory, state
    if isinstance(memory, memkit.ComposeMemory):
        for m, s in zip(memory.memories, state.states, strict=True):
            if isinstance(m, memkit.PromptBankMemory):
                return m, s
    return None


def _ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM over frames ``(T c h w)`` in ``[-1, 1]`` (skimage, 7x7 windows, data range 2)."""
    from skimage.metrics import structural_similarity

    return float(
        sum(
            structural_similarity(x.numpy(), y.numpy(), channel_axis=0, data_range=2.0)
            for x, y in zip(a.float(), b.float(), strict=True)
        )
        / a.shape[0]
    )


def _psnr(a: Tensor, b: Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10.0 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def scenes_section(st: ScenesSettings) -> Section:
    """Every memory in ``variants`` on the fixed schedule, one batch of ``clips`` clips each."""
    sec = Section(SECTION, "Prompt switches (scenes world)")
    try:
        from benchmarks.quality import _swap
        from memkit.data import scene_clip
        from memkit.models.malt import EulerSampler, MALTNetwork, stream
        from memkit.train import TrainConfig, prepare_sample
    except ImportError as err:  # pragma: no cover - the backbone ships with memkit
        sec.skip(f"skipped: not available yet: the backbone ({err})")
        return sec
    found = scenes_checkpoints()
    if not found:
        sec.skip(
            "skipped: no checkpoint trained on the scenes world (set MEMKIT_BENCH_CHECKPOINT, or train one: "
            "memkit train --config demo-scenes --out DIR)"
        )
        return sec
    path = found[0]
    tc = TrainConfig.load(path / "train_config.json")
    net = MALTNetwork.from_pretrained(path).eval()
    cfg = net.config
    if cfg.frames_per_segment != 1 or not cfg.prompt_dim:
        sec.skip(f"skipped {path.name}: the section scores one-frame segments of a model with a prompt")
        return sec
    schedule = list(st.schedule)
    segments, k0 = len(schedule), st.context_segments
    num_scenes = max(schedule) + 1
    clips = 2 if st.quick else st.clips
    samples = []
    for c in range(clips):
        clip = scene_clip(
            200_000 + c,
            1,
            segments,
            cfg.height,
            num_scenes=max(num_scenes, int(tc.data.kwargs.get("num_scenes", num_scenes))),
            scene_ids=schedule,
            prompt_dim=cfg.prompt_dim,
        )
        raw = {
            "video": clip.video[:, None],
            "actions": clip.actions[:, None],
            "prompt": clip.prompts,
            "prompt_mask": clip.prompt_mask,
        }
        samples.append(prepare_sample(raw, tc.data, cfg))
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}  # (B S 1 ...)
    video = batch["video"][:, :, 0]  # (B S c h w)
    context = video[:, :k0]
    actions = batch["actions"].flatten(1, 2) if "actions" in batch else None
    prompts = [batch["prompt"][:, s] for s in range(segments)]
    masks = [batch["prompt_mask"][:, s] for s in range(segments)]
    h, d, t = cfg.heads, cfg.dim // cfg.heads, cfg.tokens_per_frame
    layers = set(cfg.memory_layers())
    sampler = EulerSampler(steps=2 if st.quick else st.steps)
    long_return = segments - 1
    lag = long_return - max(i for i in range(long_return) if schedule[i] == schedule[long_return])
    t0 = time.time()
    for label, make, recache in tqdm(variants(h, d, t, st), desc="scenes", unit="memory"):
        model = _swap(net, [make() if i in layers else None for i in range(cfg.depth)])
        captured: dict[int, Any] = {}
        if recache:
            plain_recache = model.recache

            def spy(
                latents: Tensor, first: int, *a: Any, _r: Any = plain_recache, _c: Any = captured, **kw: Any
            ) -> Any:
                out = _r(latents, first, *a, **kw)
                _c[first + latents.shape[1]] = out  # the states the next segment reads
                return out

            model.recache = spy
        before = model.init_states(clips)
        made: list[Tensor] = []
        hits = returned = reads_hit = reads = 0
        long_hits = long_returned = 0
        for seg in stream(
            model,
            segments - k0,
            context=context.reshape(clips, k0, *video.shape[2:]),
            actions=actions,
            prompt=prompts,
            prompt_mask=masks,
            sampler=sampler,
            seed=0,
            recache=st.recache_segments if recache else 0,
        ):
            if seg.generated:
                read_states = captured.get(seg.index, before) if seg.recached else before
                scene = schedule[seg.index]
                for i in sorted(layers):
                    memory = model.blocks[i].attn.memory
                    found_bank = _bank_of(memory, read_states[i])
                    if found_bank is None:
                        continue
                    bank, state = found_bank
                    assert model.prompt_proj is not None
                    chosen = bank.select(state, model.prompt_proj(prompts[seg.index]), masks[seg.index])
                    pos, ok = chosen.pos, chosen.valid
                    right = torch.tensor([[schedule[int(p)] == scene for p in row] for row in pos]) & ok
                    hits += int(right.sum())
                    returned += int(ok.sum())
                    reads_hit += int(right.any(dim=1).sum())
                    reads += clips
                    if seg.index == long_return:
                        long_hits += int(right.sum())
                        long_returned += int(ok.sum())
                made.append(seg.latents[:, 0])
            before = seg.states
        generated = torch.stack(made, dim=1)  # (B S' c h w)
        truth = video[:, k0:]
        p = {"memory": label, "recache": recache}
        recent = slice(0, long_return - k0)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        sec.add("psnr_recent", _psnr(flat(generated[:, recent]), flat(truth[:, recent])), "dB", params=p)
        sec.add("psnr_long_return", _psnr(generated[:, -1], truth[:, -1]), "dB", params=p)
        sec.add("ssim_recent", _ssim(flat(generated[:, recent]), flat(truth[:, recent])), "", params=p)
        sec.add("ssim_long_return", _ssim(generated[:, -1], truth[:, -1]), "", params=p)
        if reads:
            sec.add("precision", hits / max(returned, 1), "fraction", params=p, n=returned)
            sec.add("reads_with_scene", reads_hit / reads, "fraction", params=p, n=reads)
            sec.add("frames_per_read", returned / reads, "frames", params=p, n=reads)
            sec.add("precision_long_return", long_hits / max(long_returned, 1), "fraction", params=p, n=long_returned)
    # a reference on the same frames: a flat grey frame, what a model that knows nothing should beat (a scene's
    # frames repeat exactly when it returns, so perfect recall would reproduce them)
    truth = video[:, k0:]
    references = {"reference: grey frame": torch.zeros_like(truth)}
    for label, guess in references.items():
        p = {"memory": label, "recache": False}
        recent = slice(0, long_return - k0)
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        sec.add("psnr_recent", _psnr(flat(guess[:, recent]), flat(truth[:, recent])), "dB", params=p)
        sec.add("psnr_long_return", _psnr(guess[:, -1], truth[:, -1]), "dB", params=p)
        sec.add("ssim_recent", _ssim(flat(guess[:, recent]), flat(truth[:, recent])), "", params=p)
        sec.add("ssim_long_return", _ssim(guess[:, -1], truth[:, -1]), "", params=p)
    for row in cutoff_precision(clips=2 if st.quick else 16):
        p = {"memory": "PromptBankMemory (memory level)", "cutoff": row["cutoff"]}
        for name in ("precision", "frames_per_read", "recall"):
            unit = "frames" if name == "frames_per_read" else "fraction"
            sec.add(f"memory_level_{name}", row[name], unit, params=p, n=row["reads"])
    sec.config = {
        "checkpoint": path.name,
        "sha256": hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:12],
        "trained_with": cfg.memory.name,
        "settings": st.to_dict(),
        "clips": f"scene_clip(200000 + i, 1 frame a segment, scene_ids=schedule), {clips} clips as one batch",
        "long_return_lag": lag,
        "seconds": round(time.time() - t0, 1),
    }
    return sec


CUTOFFS: tuple[float | None, ...] = (None, 0.15, 0.25, 0.35, 0.5)


@torch.no_grad()
def cutoff_precision(cutoffs: tuple[float | None, ...] = CUTOFFS, clips: int = 16) -> list[dict[str, Any]]:
    """The memory-level retrieval of section 4b (text-aligned keys, 3 scenes, B = 3), per relevance cut-off.

    Per cut-off: precision (share of the returned frames showing the prompted scene), frames a
    read returns, and recall (share of the reads whose pool held a frame of the scene that
    return at least one).
    """
    import memkit
    from benchmarks.quality import QualitySettings, bank_reads

    st = QualitySettings(clips=clips)
    t = (st.frame_size // st.patch) ** 2
    rows = []
    for cutoff in cutoffs:
        mem = memkit.PromptBankMemory(st.heads, st.head_dim, t, bank_frames=st.bank_frames, min_relevance=cutoff)
        hits = returned = reads = held = recalled = 0
        for want, pool, got in bank_reads(st, mem, range(st.clips)):
            right = sum(1 for x in got if x == want)
            hits, returned, reads = hits + right, returned + len(got), reads + 1
            if want in pool:
                held += 1
                recalled += int(right > 0)
        rows.append(
            {
                "cutoff": cutoff,
                "precision": hits / max(returned, 1),
                "frames_per_read": returned / max(reads, 1),
                "recall": recalled / max(held, 1),
                "reads": reads,
            }
        )
    return rows


def _val(sec: dict[str, Any], name: str, label: str) -> float | None:
    return next(
        (f["value"] for f in sec.get("figures", []) if f["name"] == name and f["params"]["memory"] == label), None
    )


def render_scenes(add: Callable[[str], None], sec: dict[str, Any] | None, plots: list[str], image_dir: str) -> None:
    """The prompt-switch table (and its plot when drawn)."""
    if skipped(add, sec, "Prompt switches (scenes world)") or sec is None:
        return
    add("## Prompt switches (scenes world)")
    add("")
    cfg = sec["config"]
    st = cfg["settings"]
    k0, schedule = st["context_segments"], st["schedule"]
    add(
        f"The `{cfg['checkpoint']}` weights (trained with {cfg['trained_with']}; model.safetensors sha256 "
        f"{cfg['sha256']}…) generate the scenes world on a fixed schedule of scenes {schedule}: the first {k0} "
        f"segments (every scene once) are given, the other {len(schedule) - k0} generated under their scene's "
        f"prompt, so every generated segment is a prompt switch and a return; the last returns to a scene last "
        f"prompted {cfg['long_return_lag']} segments earlier. {cfg['clips']}; {st['steps']} Euler steps a "
        f"frame. Re-cache: LongLive's, the last {st['recache_segments']} segments re-written under the new "
        f"prompt at every switch (`stream(recache=)`). Cut-off: `PromptBankMemory(min_relevance={st['cutoff']:g})`. "
        "Precision: of the frames a bank's read returns (with the network's projected prompt, every memory "
        "layer), the share showing the prompted scene; 'with scene': reads returning at least one such frame."
    )
    add("")
    labels = []
    for f in sec["figures"]:
        if f["params"]["memory"] not in labels and not f["name"].startswith("memory_level_"):
            labels.append(f["params"]["memory"])

    def show(x: float | None, unit: str = "") -> str:
        if x is None:
            return "-"
        return f"{x:.0%}" if unit == "%" else f"{x:.2f}" if unit == "s" else f"{x:.1f}"

    rows = []
    for label in labels:
        rows.append(
            [
                label,
                show(_val(sec, "psnr_recent", label)),
                show(_val(sec, "psnr_long_return", label)),
                show(_val(sec, "ssim_recent", label), "s"),
                show(_val(sec, "ssim_long_return", label), "s"),
                show(_val(sec, "precision", label), "%"),
                show(_val(sec, "precision_long_return", label), "%"),
                show(_val(sec, "reads_with_scene", label), "%"),
                show(_val(sec, "frames_per_read", label), "s"),
            ]
        )
    add(
        table(
            [
                "memory",
                "PSNR dB, returns",
                "PSNR dB, long return",
                "SSIM, returns",
                "SSIM, long return",
                "precision",
                "precision, long return",
                "reads with scene",
                "frames a read",
            ],
            rows,
        )
        + "\n"
    )
    level = [f for f in sec["figures"] if f["name"] == "memory_level_precision"]
    if level:
        add(
            "The cut-off at memory level, on the retrieval set-up of section 4b (text-aligned keys, 3 scenes, "
            "B = 3, clips of 32 segments, 16 in a full run; every read of a scene shown before): precision, "
            "frames a read returns, and recall (reads returning a frame of the prompted scene, of those whose "
            "pool held one)."
        )
        add("")
        rows = []
        for f in level:
            c = f["params"]["cutoff"]
            other = {
                g["name"]: g["value"]
                for g in sec["figures"]
                if g["name"].startswith("memory_level_") and g["params"]["cutoff"] == c
            }
            rows.append(
                [
                    "None (all B)" if c is None else f"{c:g}",
                    f"{other['memory_level_precision']:.0%}",
                    f"{other['memory_level_frames_per_read']:.2f}",
                    f"{other['memory_level_recall']:.0%}",
                ]
            )
        add(table(["min_relevance", "precision", "frames a read", "recall"], rows) + "\n")
    if "scenes.png" in plots:
        add(f"![PSNR at prompt switches]({image_dir}/scenes.png)\n")
    add(f"Measured in {cfg['seconds']:.0f} s.\n")


def scenes_plot(results: dict[str, Any], save: Callable[[Any, str], None], plt: Any) -> None:
    """PSNR at the recent returns and at the long return, per memory (bars)."""
    sec = results["sections"].get(SECTION)
    if not sec or sec.get("status") == "skipped" or not sec.get("figures"):
        return
    labels = []
    for f in sec["figures"]:
        if f["params"]["memory"] not in labels and f["name"] == "psnr_recent":
            labels.append(f["params"]["memory"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    y = range(len(labels))
    recent = [_val(sec, "psnr_recent", lab) or 0.0 for lab in labels]
    far = [_val(sec, "psnr_long_return", lab) or 0.0 for lab in labels]
    ax.barh([i + 0.2 for i in y], recent, height=0.4, label="returns (lag 3)")
    ax.barh([i - 0.2 for i in y], far, height=0.4, label=f"long return (lag {sec['config']['long_return_lag']})")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("PSNR (dB) of generated frames")
    ax.set_title("Prompt switches on the scenes world")
    ax.legend(loc="lower right")
    save(fig, "scenes.png")
