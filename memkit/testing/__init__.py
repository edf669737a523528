"""Property checks for any memory: run memkit's protocol tests on your own memory.

:func:`check_memory` drives a memory through short random streams (read at every
segment, write once per segment) and asserts the protocol's invariants. It raises
``AssertionError`` naming the first property that failed (:data:`PROPERTIES`):

- ``is a Memory``: ``init_state``, ``read`` and ``write`` exist (:class:`memkit.Memory`).
- ``state is a pytree of tensors``: every leaf of the state is a tensor (``@memkit.memory_state``).
- ``state tensors have the batch first``: dim 0 of every state tensor is the batch.
- ``state bytes never change``: :func:`memkit.state_nbytes` is the same after every write.
- ``state shapes never change``: a write keeps the pytree structure and every shape, dtype, device.
- ``read never mutates the state``: the state given to ``read`` is bitwise unchanged.
- ``write never mutates the old state``: the state given to ``write`` is bitwise unchanged.
- ``reads are pure``: the same state and query give the same context twice.
- ``context is valid``: a :class:`memkit.Context` shaped ``(b h m d)`` for the query's batch,
  heads and head dim, with finite keys and values in valid slots.
- ``context shape never changes``: ``m`` (memory slots) is the same at every segment.
- ``attention over the context``: attention of the query over its own keys and the context
  (rotary at the slots' positions, :func:`memkit.attend`) is finite, and stays the same when
  the context's unused slots (mask False) are filled with NaN and their positions with garbage.
- ``causality``: later reads and writes change neither a context already returned nor what
  reading an earlier state returns.
- ``batch independence``: changing stream ``j``'s queries and one of its segments leaves every
  other stream's contexts unchanged.
- ``batch selection``: reading item ``i`` of the state alone equals item ``i`` of the batched read.
- ``streams advance independently``: streams at different positions that have written
  different numbers of segments, run alone and then stacked into one batch, read and write
  in the batch as they do alone (no counter or position is shared across the batch).
- ``save/load round trip``: :func:`memkit.save_states` then :func:`memkit.load_states` gives an
  equal state that reads and writes as the original.
- ``refuses another configuration's state``: ``read`` and ``write`` raise a
  :class:`memkit.MemkitError` for a state made by the same kind of memory with another
  configuration (``other_config``, or one derived by changing one integer argument).

"Unchanged" and "equal" allow float rounding only: ``1e-6`` relative and absolute in float32
and float64 (``1e-2`` in float16 and bfloat16), so a leak of ``1e-5`` between streams fails.

hypothesis is a development dependency (``pip install 'memkit-video[dev]'``); it is imported
only when :func:`check_memory` runs, so ``import memkit`` never needs it.

The package: this module drives the streams (:func:`check_memory`); ``inputs.py`` holds the
settings, the random streams and the failure raised; ``properties.py`` one check per property;
``compare.py`` the comparisons of states and contexts they make.
"""

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from memkit.protocol import Memory
from memkit.testing.inputs import PROPERTIES, _Config, _Fail, _Stream
from memkit.testing.properties import _check_other_config, _check_stream, _check_streams_apart

__all__ = ["check_memory", "PROPERTIES"]


def check_memory(
    memory_factory: Callable[[], Memory[Any]] | Memory[Any],
    *,
    heads: int,
    head_dim: int,
    tokens_per_frame: int,
    frames_per_segment: int,
    batch_size: int = 2,
    segments: int = 4,
    examples: int = 20,
    model_dim: int | None = None,
    prompt_dim: int | None = None,
    prompt_tokens: int = 3,
    meta_dim: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    shrink: bool = True,
    backend: str = "auto",
    other_config: Callable[[], Memory[Any]] | Memory[Any] | Literal[False] | None = None,
) -> None:
    """Check that a memory keeps the protocol's promises (see :mod:`memkit.testing`).

    hypothesis draws ``examples`` random streams of 1 to ``segments`` segments (random
    queries, keys, values, hidden states, a start position per stream, which stream to
    perturb, how far each stream has got before they are stacked into one batch; sometimes
    every key is the same, so scores computed from keys tie and tie-breaks decide); each
    segment is read, then written, and one more segment is read at the end. Runs under
    ``torch.no_grad()`` with an ``nn.Module`` memory in eval mode; derandomized, so a failure
    reproduces.

    Args:
        memory_factory: a function returning a fresh memory (called once per example), or
            a memory instance used as is.
        heads: ``h`` of queries, keys and values.
        head_dim: ``d``.
        tokens_per_frame: ``t``.
        frames_per_segment: frames in each segment, so ``n = frames_per_segment * t``.
        batch_size: streams per batch; 2 or more to check batch independence, selection and
            streams advancing independently.
        segments: the longest stream drawn.
        examples: how many streams hypothesis draws.
        model_dim: ``D`` of ``Chunk.hidden``, default ``heads * head_dim``.
        prompt_dim: when given, queries and chunks carry a prompt ``(b p e)`` with
            ``e = prompt_dim`` and a padding mask (for prompt-reading memories).
        prompt_tokens: ``p``.
        meta_dim: when given, queries and chunks carry per-frame metadata ``(b f c)`` with
            ``c = meta_dim`` (for memories that retrieve by it, e.g. a camera pose).
        device: where the state and inputs live (CPU by default).
        dtype: dtype of queries, keys, values, hidden states and prompts.
        state_dtype: passed to ``init_state`` (None: the memory's default).
        shrink: let hypothesis shrink a failing stream to a minimal one (slower to fail).
        backend: the attention backend the attention check runs besides ``"math"`` (the
            one your host uses; see :func:`memkit.attend`).
        other_config: a memory of the same kind with another configuration (or a function
            returning one): ``read`` and ``write`` must refuse its states. ``None`` derives
            one by rebuilding the memory with one integer constructor argument changed
            (read back from the attribute of the same name) so that its state's layout
            differs, and skips the check when no such argument exists; ``False`` skips it.

    Raises:
        AssertionError: ``"check_memory: <Memory> fails property '<property>': <what happened>"``,
            with the property one of :data:`PROPERTIES`.

    Example:
        >>> import memkit
        >>> from memkit.testing import check_memory
        >>> check_memory(
        ...     lambda: memkit.SinkWindowMemory(2, 8, 4, sink_frames=1, window_frames=2),
        ...     heads=2, head_dim=8, tokens_per_frame=4, frames_per_segment=2, examples=3,
        ... )
    """
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st
    except ImportError as err:  # pragma: no cover - hypothesis ships with the dev extra
        raise ImportError("memkit.testing.check_memory needs hypothesis: pip install 'memkit-video[dev]'") from err

    if min(heads, head_dim, tokens_per_frame, frames_per_segment, batch_size, segments, examples) < 1:
        raise ValueError("check_memory: every size, segments and examples must be positive")
    cfg = _Config(
        heads=heads,
        head_dim=head_dim,
        tokens_per_frame=tokens_per_frame,
        frames_per_segment=frames_per_segment,
        batch_size=batch_size,
        model_dim=model_dim if model_dim is not None else heads * head_dim,
        prompt_dim=prompt_dim,
        prompt_tokens=prompt_tokens,
        meta_dim=meta_dim,
        device=torch.device(device) if device is not None else torch.device("cpu"),
        dtype=dtype,
        state_dtype=state_dtype,
        backend=backend,
    )

    def make() -> Any:
        if isinstance(memory_factory, Memory) and not isinstance(memory_factory, type):
            memory = memory_factory
        else:
            memory = memory_factory()
        if not isinstance(memory, Memory):
            raise _Fail(memory)(
                "is a Memory",
                f"{type(memory).__name__} lacks one of init_state(batch_size, *, device, dtype), "
                "read(state, query), write(state, chunk)",
            )
        if isinstance(memory, nn.Module):
            memory.eval()
        return memory

    # a memory instance handed in is put in eval mode for the checks and given back as it came
    training = [(m, m.training) for m in (memory_factory, other_config) if isinstance(m, nn.Module)]
    make()  # a memory that is not one fails here, before hypothesis starts drawing

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        # explain reruns a failing stream hundreds of times to say which argument mattered: too slow here
        phases=[p for p in Phase if p is not Phase.explain and (shrink or p is not Phase.shrink)],
    )
    @given(
        seed=st.integers(0, 2**31 - 1),
        n_segments=st.integers(1, segments),
        starts=st.lists(st.integers(0, 10_000), min_size=batch_size, max_size=batch_size),
        perturbed=st.integers(0, batch_size - 1),
        perturb_at=st.integers(0, segments - 1),
        written=st.lists(st.integers(0, segments), min_size=batch_size, max_size=batch_size),
        tied=st.booleans(),
    )
    def run(
        seed: int, n_segments: int, starts: list[int], perturbed: int, perturb_at: int, written: list[int], tied: bool
    ) -> None:
        with torch.no_grad():
            memory = make()
            stream = _Stream(cfg, seed, starts, tied)
            _check_stream(memory, cfg, stream, n_segments, perturbed, min(perturb_at, n_segments - 1))
            if batch_size > 1:
                _check_streams_apart(memory, cfg, stream, written)

    try:
        run()
        if other_config is not False:
            with torch.no_grad():
                _check_other_config(make(), cfg, other_config)
    finally:
        for module, mode in training:
            module.train(mode)
