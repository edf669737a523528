"""Golden outputs: what every memory and the bundled checkpoints produce on fixed seeds.

``python tests/golden.py --record`` re-records ``tests/golden/outputs.safetensors`` and
``tests/golden/platform.json`` from the current tree; ``tests/test_golden.py`` compares the
tree against them. Re-record only for a deliberate change of behaviour, and say in the
commit which entries changed and why (``python tests/golden.py --diff`` lists them).

The cases:

- ``memory/<case>/seed<s>/...``: each registered memory (built by name through the
  registry, with small options so that eviction and selection happen) and a few
  compositions, on batch 2, 2 heads of 8, 4 tokens a frame, 2 frames a segment. Four
  segments: before each write a read, recording the Context's keys, values, positions and
  mask; after each write a sketch of every tensor of the new state (:func:`sketch`), named
  by its path as a format-version-1 state file names it (:func:`state_paths`).
- ``clip/<memory>/...``: the bundled checkpoint ``memkit/assets/demo-<memory>`` writes three
  ground-truth segments of its revisit world (clip seed 10000) and generates two segments
  (3 Euler steps, noise seed 0); recorded: the generated video and a sketch of the final states.
"""

import argparse
import json
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent / "golden"
OUTPUTS = HERE / "outputs.safetensors"
PLATFORM = HERE / "platform.json"

#: Layer geometry of the memory cases.
B, H, D, TPF, F, DIM = 2, 2, 8, 4, 2, 16
SEGMENTS = 4
SEEDS = (0, 1)

#: name -> (registry name, options): small sizes so that eviction and top-k selection happen.
MEMORIES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "sink_window": ("sink_window", {"sink_frames": 1, "window_frames": 3}),
    "fifo": ("fifo", {"frames": 3}),
    "recurrent": ("recurrent", {"slots": 4}),
    "sparse_kv": ("sparse_kv", {"capacity": 3, "top_k": 2, "always_frames": 1}),
    "sparse_kv_default": ("sparse_kv", {}),
    "prompt_bank": ("prompt_bank", {"bank_frames": 2}),
    # added after the first recording (their memories landed later); the entries above are unchanged
    "compressed_window": ("compressed_window", {"sink_frames": 1, "window_frames": 2}),
    "packed_history": ("packed_history", {}),
    "quantized_sparse_kv": ("quantized", {"memory": {"name": "sparse_kv", "kwargs": {"capacity": 3, "top_k": 2}}}),
    "pose_retrieval": ("pose_retrieval", {"meta_dim": 2, "capacity": 3, "top_k": 2}),
}

#: cases added after the first recording: one seed each, to keep the fixture small
ADDED = ("compressed_window", "packed_history", "quantized_sparse_kv", "pose_retrieval", "memflow")

#: cases whose queries and chunks carry per-frame metadata (a pose), drawn from a generator of their own
META_DIM: dict[str, int] = {"pose_retrieval": 2}

#: compositions: name -> member cases
COMPOSED: dict[str, tuple[str, ...]] = {
    "compose_sink_sparse": ("sink_window", "sparse_kv"),
    "compose_fifo_recurrent_bank": ("fifo", "recurrent", "prompt_bank"),
}

CLIP_MEMORIES = ("sparse_kv", "recurrent")
CLIP_CONTEXT, CLIP_GENERATED = 3, 2


def platform_fingerprint() -> dict[str, str]:
    """What decides whether float results can be bit-identical: the CPU and the torch build."""
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "processor": platform.processor(),
    }


def sketch(x: Tensor, size: int = 16) -> Tensor:
    """``size`` fixed random projections of ``x`` in float64: any change to ``x`` changes them.

    States are recorded this way (reads in full) to keep the fixture small; the projection is
    deterministic, so on the recording platform it is still compared bit for bit.
    """
    flat = x.detach().double().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(size, dtype=torch.float64)
    g = torch.Generator().manual_seed(flat.numel())
    return torch.randn(flat.numel(), size, generator=g, dtype=torch.float64).T @ flat


def state_paths(tree: Any) -> list[tuple[str, Tensor]]:
    """Every tensor of ``tree`` with its path spelled as format version 1 of saved states spells it.

    Renaming state fields (issue 13: ``.sink_k`` became ``.sink.k``) then leaves the fixture's
    keys as they were: the explicit name map that loads old files (``memkit.io.V1_NAMES``) spells
    them, so a field rename cannot hide a change of values behind new keys.
    """
    from memkit.io import legacy_names
    from memkit.state import tensor_paths

    return [(old, x) for (_, old), (_, x) in zip(legacy_names(tree, 1), tensor_paths(tree), strict=True)]


def _build(case: str) -> Any:
    from memkit.models.malt import build_memory

    name, kwargs = MEMORIES[case]
    return build_memory(name, heads=H, head_dim=D, tokens_per_frame=TPF, dim=DIM, **kwargs)


def _memory(case: str, seed: int) -> Any:
    import memkit

    torch.manual_seed(seed)  # memories with parameters (recurrent, prompt_bank's projection)
    if case in COMPOSED:
        return memkit.compose(*(_build(m) for m in COMPOSED[case]))
    if case == "memflow":
        return memkit.memories.memflow.MemFlowMemory(H, D, TPF, sink_frames=1, window_frames=2, bank_frames=2)
    return _build(case)


def _segments(seed: int, meta_dim: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Query and chunk of every segment (prompts change at segment 2, with padding)."""
    import memkit

    g = torch.Generator().manual_seed(1000 + seed)
    g_meta = torch.Generator().manual_seed(2000 + seed)  # its own: the other cases' draws stay as recorded
    n = F * TPF
    prompts = [torch.randn(B, 3, H * D, generator=g) for _ in range(2)]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    for s in range(SEGMENTS):
        pos = torch.arange(s * F, (s + 1) * F).expand(B, F).contiguous()
        prompt = prompts[s // 2]
        meta = None if meta_dim is None else torch.randn(B, F, meta_dim, generator=g_meta)
        q = memkit.Query(
            torch.randn(B, H, n, D, generator=g), pos, TPF, prompt=prompt, prompt_mask=mask, frame_meta=meta
        )
        chunk = memkit.Chunk(
            torch.randn(B, H, n, D, generator=g),
            torch.randn(B, H, n, D, generator=g),
            torch.randn(B, n, DIM, generator=g),
            pos,
            TPF,
            prompt=prompt,
            prompt_mask=mask,
            frame_meta=meta,
        )
        yield q, chunk


def memory_outputs(case: str, seed: int) -> dict[str, Tensor]:
    """Reads and states of one memory case over :data:`SEGMENTS` segments."""

    memory = _memory(case, seed)
    out: dict[str, Tensor] = {}
    prefix = f"memory/{case}/seed{seed}"
    with torch.no_grad():
        state = memory.init_state(B)
        for s, (query, chunk) in enumerate(_segments(seed, META_DIM.get(case))):
            ctx = memory.read(state, query)
            for field in ("k", "v", "positions", "mask"):
                out[f"{prefix}/read{s}/{field}"] = getattr(ctx, field)
            state = memory.write(state, chunk)
            for path, x in state_paths(state):
                out[f"{prefix}/state{s}/{path}"] = sketch(x)
    return out


def clip_outputs(memory: str) -> dict[str, Tensor]:
    """The bundled checkpoint: three context segments written, two generated."""
    from memkit.demo import asset_dir
    from memkit.models.malt import EulerSampler, MALTNetwork, generate
    from memkit.train import TrainConfig, build_world, prepare_sample

    path = asset_dir(memory)
    net = MALTNetwork.from_pretrained(path).eval()
    spec = TrainConfig.load(path / "train_config.json").data
    # the sweep worlds need a clip at least as long as the sweep (8 places)
    sample = prepare_sample(build_world(spec, net.config, 10).sample(10_000), spec, net.config)
    video = sample["video"][:CLIP_CONTEXT].flatten(0, 1)[None]  # the context segments (1 K*F c h w)
    actions = sample["actions"].flatten(0, 1)[None]
    result = generate(net, CLIP_GENERATED, context=video, actions=actions, sampler=EulerSampler(steps=3), seed=0)
    out = {f"clip/{memory}/video": result.video}
    for p, x in state_paths(result.states):
        out[f"clip/{memory}/states{p}"] = sketch(x)
    return out


def cases() -> dict[str, Callable[[], dict[str, Tensor]]]:
    """Every case by name, each computing its outputs when called."""
    table: dict[str, Callable[[], dict[str, Tensor]]] = {}
    for case in (*MEMORIES, *COMPOSED, "memflow"):
        for seed in SEEDS[:1] if case in ADDED else SEEDS:
            table[f"memory/{case}/seed{seed}"] = lambda c=case, s=seed: memory_outputs(c, s)
    for memory in CLIP_MEMORIES:
        table[f"clip/{memory}"] = lambda m=memory: clip_outputs(m)
    return table


def compute() -> dict[str, Tensor]:
    """All golden outputs (single thread: the recorded run and the test run must agree)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Tensor] = {}
        for fn in cases().values():
            out.update({k: v.detach().cpu().contiguous() for k, v in fn().items()})
        return out
    finally:
        torch.set_num_threads(threads)


def load() -> tuple[dict[str, Tensor], dict[str, str]]:
    """The recorded outputs and the fingerprint of the platform they were recorded on."""
    from safetensors.torch import load_file

    return load_file(str(OUTPUTS)), json.loads(PLATFORM.read_text())


def difference(name: str, want: Tensor, got: Tensor, exact: bool, rtol: float = 1e-6) -> str | None:
    """Why ``got`` does not match the recorded ``want`` (``None`` when it does)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: shape/dtype {tuple(got.shape)} {got.dtype}, recorded {tuple(want.shape)} {want.dtype}"
    if exact or not want.is_floating_point():
        same = torch.equal(got, want)
    else:
        # another CPU or torch build: allow rounding differences only (relative to the tensor's scale)
        scale = want.abs().max().clamp_min(1e-30)
        same = bool(((got - want).abs() <= rtol * scale).all()) and bool(
            torch.equal(torch.isfinite(got), torch.isfinite(want))
        )
    if same:
        return None
    if want.is_floating_point():
        err = (got.double() - want.double()).abs().max().item()
        return f"{name}: max abs difference {err:.3g}"
    return f"{name}: differs"


def _record() -> None:
    from safetensors.torch import save_file

    HERE.mkdir(exist_ok=True)
    outputs = compute()
    save_file(outputs, str(OUTPUTS))
    PLATFORM.write_text(json.dumps(platform_fingerprint(), indent=2) + "\n")
    size = OUTPUTS.stat().st_size
    print(f"recorded {len(outputs)} tensors ({size / 1024:.0f} KiB) to {OUTPUTS}")


def _diff() -> int:
    want, fp = load()
    exact = fp == platform_fingerprint()
    got = compute()
    problems = [f"missing: {k}" for k in want if k not in got] + [f"new: {k}" for k in got if k not in want]
    problems += [d for k in want if k in got and (d := difference(k, want[k], got[k], exact)) is not None]
    print("\n".join(problems) if problems else f"all {len(want)} outputs match ({'exact' if exact else 'tolerance'})")
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", action="store_true", help="re-record the golden outputs from this tree")
    group.add_argument("--diff", action="store_true", help="list the outputs that differ from the recording")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.record:
        _record()
    else:
        sys.exit(_diff())
