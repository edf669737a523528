"""Profile one denoising step of each memory on the reference backbone (issue 15 item 3).

``python -m benchmarks.profile_step [--plans] [--typecheck 0|1] [--checks 0|1] [--steps N] [--top K]``

For every bounded memory of the roster, at the ``bench`` backbone (the overhead section's
network: 4 blocks of width 256, 3 frames of 32 tokens a segment, memory at every block),
warmed with enough written segments that every buffer is full, this times one network call
(one denoising step: every block reads its memory) and lists where the time goes, from
``cProfile``: the functions with the largest own time, and a few groups (validation, rotary,
attention, the memory's read) by cumulative time. Not part of ``python -m benchmarks run``
and never run by the tests: it is a tool to find costs, its numbers are the profiler's
(inflated by the profiler itself), and ratios belong to the benchmark sections.

``--plans`` profiles the step as :class:`memkit.models.malt.EulerSampler` runs it: through the
segment's read plans (``net.plan_reads`` once, untimed; each profiled step reads through
them), so work a plan does once per segment is out of the step. It also reports the cost of
making the plans (per segment) and of the clean pass that writes (per segment).
"""

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import sys
import time
from typing import Any


def _groups() -> dict[str, tuple[str, ...]]:
    """Group name -> substrings of ``file:function`` whose cumulative time the group reports."""
    return {
        "jaxtyping/beartype": ("jaxtyping", "beartype"),
        "explicit checks": ("typing.py:check_", "state.py:check_", "frames.py:check_", "__post_init__", "_check"),
        "rotary": ("rotary.py:",),
        "memory read": (":read",),
        "attend": ("attend.py:attend", "backends.py:attend_sdpa"),
        "scaled_dot_product_attention": ("scaled_dot_product_attention",),
        "linear": ("'linear'", "linear>"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
    parser.add_argument("--typecheck", default="0", help="MEMKIT_TYPECHECK for this run (0 or 1)")
    parser.add_argument("--checks", default=None, help="MEMKIT_CHECKS for this run (0 or 1; default: unset)")
    parser.add_argument("--steps", type=int, default=40, help="profiled steps per memory")
    parser.add_argument("--top", type=int, default=12, help="functions listed per memory")
    parser.add_argument("--plans", action="store_true", help="profile the step through read plans (the sampler's path)")
    parser.add_argument("--memories", default=None, help="comma-separated roster names (default: every bounded one)")
    args = parser.parse_args(argv)
    os.environ["MEMKIT_BENCH_TYPECHECK"] = args.typecheck
    os.environ["MEMKIT_TYPECHECK"] = args.typecheck
    if args.checks is not None:
        os.environ["MEMKIT_CHECKS"] = args.checks

    import torch

    import benchmarks  # noqa: F401
    from benchmarks.cost import BackboneHost, backbone_config, backbone_geometry, make_inputs
    from benchmarks.overhead import _warm
    from benchmarks.roster import roster

    torch.set_num_threads(1)
    cfg = backbone_config("bench")
    entries = [e for e in roster(backbone_geometry(cfg, 64), full_history=False) if e.available and e.bounded]
    if args.memories:
        wanted = args.memories.split(",")
        entries = [e for e in entries if e.name in wanted]
    inputs = make_inputs((1, cfg.frames_per_segment, cfg.channels, cfg.height, cfg.width), 8, cfg.prompt_dim, 0)
    print(f"MEMKIT_TYPECHECK={args.typecheck} MEMKIT_CHECKS={os.environ.get('MEMKIT_CHECKS', '(unset)')}; "
          f"load average {os.getloadavg()[0]:.1f}; bench backbone, one denoising step (network call)"
          f"{' through read plans' if args.plans else ' reading the states'}")  # fmt: skip
    for e in entries:
        host = BackboneHost(e, cfg, 8, inputs, 0)
        states = _warm(host, 24)
        s = 24
        pos = host.net.segment_positions(s, 1)
        x = inputs.x[0]
        prompt, mask = inputs.prompt(s)
        t = torch.full((1,), 0.5)
        net = host.net
        if args.plans:
            with torch.no_grad():
                read_from = net.plan_reads(states, pos, prompt=prompt, prompt_mask=mask)
            per_segment = {
                "plan_reads": functools.partial(net.plan_reads, states, pos, prompt=prompt, prompt_mask=mask),
                "write (clean pass)": functools.partial(net.write, x, states, pos, prompt=prompt, prompt_mask=mask),
            }
        else:
            read_from, per_segment = states, {}

        def step(net: Any = net, states: Any = read_from, args: tuple[Any, ...] = (x, t, pos, prompt, mask)) -> Any:
            x, t, pos, prompt, mask = args
            with torch.no_grad():
                return net(x, t, states, pos, prompt=prompt, prompt_mask=mask)

        for _ in range(3):
            step()
        plain = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            plain.append(time.perf_counter() - t0)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        st = pstats.Stats(prof)
        total = st.total_tt / args.steps * 1000  # type: ignore[attr-defined]
        print(f"\n== {e.name}: {statistics.median(plain) * 1000:.2f} ms per step unprofiled "
              f"(median of {args.steps}); {total:.2f} ms profiled")  # fmt: skip
        rows = []
        for (file, _line, fn), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            rows.append((tt, ct, f"{os.path.basename(file)}:{fn}" if file != "~" else fn))
        groups = _groups()
        for name, keys in groups.items():
            # the largest cumulative time among matching functions (nested matches would double count)
            best = max((ct for _tt, ct, label in rows if any(k in label for k in keys)), default=0.0)
            print(f"   {name:<30} {best / args.steps * 1000:8.3f} ms cumulative")
        print("   top own time:")
        for tt, _ct, label in sorted(rows, reverse=True)[: args.top]:
            print(f"     {tt / args.steps * 1000:8.3f} ms  {label}")
        for name, fn in per_segment.items():
            with torch.no_grad():
                fn()
                times = []
                for _ in range(max(3, args.steps // 4)):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            print(f"   per segment: {name:<20} {statistics.median(times) * 1000:8.2f} ms (median, unprofiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
