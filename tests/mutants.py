"""Known bugs, injected at run time: the test suite must catch every one of them.

Each :class:`Mutant` patches memkit (a function, a method, or a module's ``torch``) with a
bug that once slipped past the tests, and names the test files that must now fail with it
applied. ``make mutants`` (``python tests/mutants.py``) runs those files once per mutant,
with ``MEMKIT_MUTANT=<name>`` (tests/conftest.py applies the patch before any test runs)
and the derandomised hypothesis profile, and prints which test caught each mutant. It exits
non-zero when a mutant survives. ``tests/test_mutants.py`` (part of ``make test``) checks
that every patch still applies and can be undone.

    python tests/mutants.py                 # every mutant
    python tests/mutants.py ring-drops-first-frame gate-fully-open
    python tests/mutants.py --list
    python tests/mutants.py -j 2            # two at a time
"""

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
import time
import unittest.mock
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# a replacement is built from the original: make(original) -> replacement
Make = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One known bug: what it stands for, what it patches, and the tests that must catch it."""

    name: str
    bug: str
    patches: tuple[tuple[str, Make], ...]  # ("module:attr.path", make)
    tests: tuple[str, ...]  # files or node ids, relative to the repository root


class _TorchWith:
    """The ``torch`` module with some functions replaced (patched in as one module's ``torch``)."""

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)


def _torch_with(**replaced: Callable[..., Any]) -> Make:
    return lambda original: _TorchWith(**replaced)


# --- the bugs ------------------------------------------------------------------------------


def _logsumexp_without_max(x: Any, dim: int) -> Any:
    import torch

    return torch.log(torch.exp(x).sum(dim))  # overflows once a logit passes ~88


def _ring_drops_first_frame(original: Any) -> Any:
    def ring_sources(start: Any, first: Any, num_frames: int, capacity: int) -> Any:
        src, take = original(start, first, num_frames, capacity)
        return src, take & (src != first[:, None])

    return ring_sources


def _recency_from_stream_0(original: Any) -> Any:
    import torch

    def _recency(self: Any, state: Any) -> Any:
        ring_count = (state.frames_seen[:1] - self.always_frames).clamp(min=0).expand_as(state.frames_seen)
        slots = torch.arange(self.capacity, device=ring_count.device)
        return torch.remainder(slots - ring_count[:, None], self.capacity)

    return _recency


def _content_blind_routing(newest: bool) -> Make:
    def make(original: Any) -> Any:
        import torch

        def top_k_frames(scores: Any, valid: Any, priority: Any, k: int, *_: Any, **__: Any) -> Any:
            # the three-sort ranking (no priority bound): -priority is outside any bound
            return original(torch.zeros_like(scores), valid, priority if newest else -priority, k)

        return top_k_frames

    return make


def _bank_ignores_prompt(original: Any) -> Any:
    import torch

    def relevance(self: Any, k: Any, valid: Any, prompt: Any, prompt_mask: Any) -> Any:
        return torch.zeros(valid.shape, device=k.device)  # every score ties: recency keeps the newest

    return relevance


def _ignores_writes_after_the_first(original: Any) -> Any:
    import torch
    import torch.utils._pytree as pytree

    def write(self: Any, state: Any, chunk: Any) -> Any:
        new = original(self, state, chunk)
        first = state.writes == 0

        def pick(x: Any, old: Any) -> Any:
            return torch.where(first.reshape(-1, *[1] * (x.ndim - 1)), x, old)

        return pytree.tree_map(pick, new, state).replace(writes=new.writes)

    return write


def _chunk_accepts_non_finite(original: Any) -> Any:
    import torch

    def __post_init__(self: Any) -> None:
        # the refusal is skipped under torch.compile: pretend to be compiling
        with unittest.mock.patch.object(torch.compiler, "is_compiling", lambda: True):
            original(self)

    return __post_init__


def _to_casts_integers(original: Any) -> Any:
    from memkit.state import map_tensors

    return lambda self, *args, **kwargs: map_tensors(lambda x: x.to(*args, **kwargs), self)


def _pools_stream_0_into_the_others(original: Any) -> Any:
    import memkit

    def read(self: Any, state: Any, query: Any) -> Any:
        ctx = original(self, state, query)
        k = ctx.k.clone()
        k[1:] = k[1:] + ctx.k[:1]
        return memkit.Context(k, ctx.v, ctx.mask, ctx.positions)

    return read


def _reads_nothing(original: Any) -> Any:
    import memkit

    def read(self: Any, state: Any, query: Any) -> Any:
        ctx = original(self, state, query)
        return memkit.Context(ctx.k, ctx.v, ctx.mask & False, ctx.positions)

    return read


def _load_ignores_configuration(original: Any) -> Any:
    return lambda path, like, memories=None: original(path, like)


def _skips_finite_check(original: Any) -> Any:
    return lambda self, f, video, start, stop: f.read(video, start, stop)


def _no_op(original: Any) -> Any:
    return lambda *args, **kwargs: None


def _kit(check: str, prop: str, module: str = "memkit.testing.properties") -> "Mutant":
    # a check is patched where its caller looks it up: the per-stream checks inside properties.py,
    # the driver's own (streams apart, another config) in memkit.testing
    return Mutant(
        f"kit-without-{check.removeprefix('_check_').replace('_', '-')}",
        f"check_memory without its '{prop}' check",
        ((f"{module}:{check}", _no_op),),
        ("tests/test_testing_helper.py",),
    )


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "lse-without-max",
        "issue 19.5: the reference backend computes log(sum(exp)) without subtracting the max",
        (("memkit.attention.reference:torch", _torch_with(logsumexp=_logsumexp_without_max)),),
        ("tests/test_attend.py",),
    ),
    Mutant(
        "ring-drops-first-frame",
        "issue 19.6: the SparseKV ring drops the first frame of each chunk",
        (("memkit.memories.sparse_kv:ring_sources", _ring_drops_first_frame),),
        ("tests/test_sparse_kv.py",),
    ),
    Mutant(
        "recency-from-stream-0",
        "issue 19.6: SparseKV's recency tie-break uses stream 0's write count for every stream",
        (("memkit.memories.sparse_kv:SparseKVMemory._recency", _recency_from_stream_0),),
        ("tests/test_sparse_kv.py",),
    ),
    Mutant(
        "bank-ignores-prompt",
        "issue 19.1: PromptBank ignores the prompt and keeps the newest frames",
        (("memkit.memories.prompt_bank:PromptBankMemory.relevance", _bank_ignores_prompt),),
        ("tests/test_learning_sparse.py",),
    ),
    Mutant(
        "routing-returns-oldest",
        "issue 19.1: SparseKV routing ignores content and returns the oldest frames",
        (("memkit.memories.sparse_kv:top_k_frames", _content_blind_routing(newest=False)),),
        ("tests/test_learning_sparse.py",),
    ),
    Mutant(
        "routing-returns-newest",
        "issue 19.1/19.3: SparseKV routing ignores content and returns the newest frames",
        (("memkit.memories.sparse_kv:top_k_frames", _content_blind_routing(newest=True)),),
        ("tests/test_learning_sparse.py",),
    ),
    Mutant(
        "recurrent-ignores-later-writes",
        "issue 19.2: RecurrentMemory ignores every write after the first",
        (("memkit.memories.recurrent:RecurrentMemory.write", _ignores_writes_after_the_first),),
        ("tests/test_learning_recurrent.py",),
    ),
    Mutant(
        "chunk-accepts-non-finite",
        "issue 19.4: Chunk's NaN/Inf refusal removed",
        (("memkit.protocol:Chunk.__post_init__", _chunk_accepts_non_finite),),
        ("tests/test_state_protocol.py", "tests/test_docs.py::test_page_code_runs[docs/guides/errors.md]"),
    ),
    Mutant(
        "load-ignores-configuration",
        "issue 19.4: load_states stops checking the memories' configuration (docs try/except with no else)",
        (("memkit.io:load_states", _load_ignores_configuration),),
        ("tests/test_docs.py::test_page_code_runs[docs/guides/saving.md]",),
    ),
    Mutant(
        "dataset-accepts-nan",
        "issue 19.4: LatentDataset stops refusing NaN frames (docs try/except with no else)",
        (("memkit.data.latents:LatentDataset._check_finite", _skips_finite_check),),
        ("tests/test_docs.py::test_page_code_runs[docs/data.md]",),
    ),
    Mutant(
        "to-casts-integers",
        "issue 19.8: MemoryState.to(float64) casts integer and boolean tensors too",
        (("memkit.state:MemoryState.to", _to_casts_integers),),
        ("tests/test_state_protocol.py",),
    ),
    Mutant(
        "to-does-nothing",
        "issue 19.8: MemoryState.to does nothing",
        (("memkit.state:MemoryState.to", lambda original: lambda self, *args, **kwargs: self),),
        ("tests/test_state_protocol.py",),
    ),
    Mutant(
        "pools-stream-0-into-others",
        "issue 19.8: a read leaks stream 0 into the other streams (the old test looked at stream 0 only)",
        (("memkit.memories.sink_window:SinkWindowMemory.read", _pools_stream_0_into_the_others),),
        ("tests/test_state_protocol.py",),
    ),
    Mutant(
        "gate-fully-open",
        "issue 19.9: RecurrentMemory's update gate forced fully open",
        (("memkit.memories.recurrent:torch", _torch_with(sigmoid=lambda x: x * 0 + 1)),),
        ("tests/test_recurrent.py",),
    ),
    Mutant(
        "malt-memory-reads-nothing",
        "issue 19.9: the MALT overfit test passes with no memory (the FIFO read returns no valid slot)",
        (("memkit.memories.sink_window:SinkWindowMemory.read", _reads_nothing),),
        ("tests/test_malt.py::test_fits_four_short_clips_and_uses_its_memory",),
    ),
    _kit("_check_read_unchanged", "read never mutates the state"),
    _kit("_check_write_unchanged", "write never mutates the old state"),
    _kit("_check_bytes", "state bytes never change"),
    _kit("_check_shapes", "state shapes never change"),
    _kit("_check_pure", "reads are pure"),
    _kit("_check_context", "context is valid"),
    _kit("_check_attention", "attention over the context"),
    _kit("_check_causality", "causality"),
    _kit("_check_batch", "batch independence"),
    _kit("_check_selection", "batch selection"),
    _kit("_check_streams_apart", "streams advance independently", "memkit.testing"),
    _kit("_check_save_load", "save/load round trip"),
    _kit("_check_other_config", "refuses another configuration's state", "memkit.testing"),
)

BY_NAME = {m.name: m for m in MUTANTS}


# --- applying a mutant ---------------------------------------------------------------------


def resolve(target: str) -> tuple[Any, str, Any]:
    """``"pkg.module:Class.attr"`` -> (the object holding ``attr``, ``"attr"``, its current value)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    if attr not in vars(owner):
        raise AttributeError(f"{target}: {owner!r} has no attribute {attr!r} of its own")
    return owner, attr, vars(owner)[attr]


@contextmanager
def applied(name: str) -> Iterator[Mutant]:
    """Apply mutant ``name`` for the duration of the block, then put everything back."""
    undo = apply(name)
    try:
        yield BY_NAME[name]
    finally:
        undo()


def apply(name: str) -> Callable[[], None]:
    """Apply mutant ``name``; returns a function that undoes it.

    A function patched in the module that defines it is also replaced wherever it was
    re-exported (``memkit.load_states`` is ``memkit.io.load_states``), so a test that
    imported it sees the bug; one patched in a module that imported it changes only that module.
    """
    if name not in BY_NAME:
        raise SystemExit(f"unknown mutant {name!r}; known: {', '.join(BY_NAME)}")
    restore: list[tuple[Any, str, Any]] = []
    for target, make in BY_NAME[name].patches:
        owner, attr, original = resolve(target)
        replacement = make(original)
        holders = [(owner, attr)]
        defined_here = getattr(original, "__module__", None) == getattr(owner, "__name__", "")
        # a function patched where it is defined is patched everywhere; one patched where it was
        # imported (sparse_kv's top_k_frames) only there, so other users keep the real one
        if isinstance(owner, type(sys)) and callable(original) and defined_here:
            holders += [
                (module, key)
                for module in list(sys.modules.values())
                if module is not None and module is not owner and module.__name__.startswith("memkit")
                for key, value in list(vars(module).items())
                if value is original
            ]
        for holder, key in holders:
            restore.append((holder, key, getattr(holder, key)))
            setattr(holder, key, replacement)

    def undo() -> None:
        for holder, key, value in reversed(restore):
            setattr(holder, key, value)

    return undo


# --- running the suite against each mutant -------------------------------------------------


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    caught_by: str | None  # the first failing test, or None if the mutant survived
    seconds: float
    error: str | None = None  # pytest could not run (a broken patch or a collection error)


def run_one(mutant: Mutant, timeout: float = 1800.0) -> Outcome:
    env = {
        **os.environ,
        "MEMKIT_MUTANT": mutant.name,
        "HYPOTHESIS_PROFILE": "ci",  # derandomised: a mutant is caught (or not) the same way every time
        "MEMKIT_TYPECHECK": "1",
        "PYTHONHASHSEED": "0",
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--tb=no", "-rfE", "-p", "no:cacheprovider", *mutant.tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(mutant, None, time.perf_counter() - start, f"timed out after {timeout:.0f} s")
    took = time.perf_counter() - start
    failed = [
        line.split(" ", 1)[1].split(" - ")[0].strip()
        for line in proc.stdout.splitlines()
        if line.startswith(("FAILED ", "ERROR "))
    ]
    if proc.returncode == 0:
        return Outcome(mutant, None, took)
    if proc.returncode == 1 and failed:
        return Outcome(mutant, failed[0], took)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    return Outcome(mutant, failed[0] if failed else None, took, f"pytest exit {proc.returncode}: {' | '.join(tail)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at the same time")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one mutant's tests may take")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34} {m.bug}\n{'':34} -> {' '.join(m.tests)}")
        return 0
    chosen = [BY_NAME[n] if n in BY_NAME else parser.error(f"unknown mutant {n!r}") for n in args.names] or list(
        MUTANTS
    )
    width = max(len(m.name) for m in chosen)
    print(f"{'mutant':{width}}  {'result':8}  {'seconds':>7}  caught by", flush=True)
    outcomes = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda m: run_one(m, args.timeout), chosen):
            result = "ERROR" if outcome.error else "caught" if outcome.caught_by else "SURVIVED"
            detail = outcome.caught_by or "-"
            if outcome.error:
                detail += f"  [{outcome.error}]"
            print(f"{outcome.mutant.name:{width}}  {result:8}  {outcome.seconds:7.1f}  {detail}", flush=True)
            outcomes.append(outcome)
    bad = [o.mutant.name for o in outcomes if o.error or not o.caught_by]
    print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} mutants caught" + (f"; not caught: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the memkit of this checkout
    raise SystemExit(main())
