"""Naive references written from the published descriptions, against memkit on random inputs.

Each reference is plain Python lists and loops, one batch item and one head at a time, with no
fixed shapes and no tensor tricks, following the text of the source it cites:

* MemFlow NAM + SMA: KlingTeam/MemFlow ``wan/modules/causal_model.py``
  (``CausalWanSelfAttention.forward``: sink + bank routed by ``dynamic_topk_routing_attention``,
  local window dense; ``compress_kv_bank`` / ``_apply_cache_updates_before``: the bank keeps its
  top ``B - 1`` frames for the chunk's text and appends the prototype; the prototype, a chunk's
  first frame, is recorded every ``record_interval`` chunks, ``pipeline/*causal_inference.py``).
* LongLive sink + window: NVlabs/LongLive ``wan/modules/causal_model.py`` (first commit):
  the first ``sink_size`` frames stay; the rest of the attention budget is the most recent frames.

memkit and the reference must attend to the same frames (same positions, keys and values) per
head; order inside a context does not matter to attention.
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memkit

H, D, T = 2, 4, 2


def _frames_per_head(ctx: memkit.Context, b: int, h: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """memkit's context for batch item b, head h, as a sorted list of valid frames (pos, k, v)."""
    k = ctx.k[b, h].reshape(-1, T, D)
    v = ctx.v[b, h].reshape(-1, T, D)
    ok = ctx.mask[b, h].reshape(-1, T)[:, 0]
    pos = ctx.positions[b, h].reshape(-1, T)[:, 0]
    return sorted(
        ((int(pos[i]), k[i], v[i]) for i in range(k.shape[0]) if ok[i]), key=lambda x: (x[0], float(x[1].sum()))
    )


def _same(mine: list, ref: list) -> None:
    ref = sorted(ref, key=lambda x: (x[0], float(x[1].sum())))
    assert [p for p, _, _ in mine] == [p for p, _, _ in ref]
    for (_, k1, v1), (_, k2, v2) in zip(mine, ref, strict=True):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)


class MemFlowReference:
    """One batch item of MemFlow's sink + NAM bank + SMA + local window, as the release does it."""

    def __init__(self, sink: int, window: int, bank: int, top_k: int | None, interval: int) -> None:
        self.sink, self.window, self.bank_size, self.top_k, self.interval = sink, window, bank, top_k, interval
        self.frames: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # every frame written, (pos, k, v)
        self.bank: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.recorded = 0
        self.chunks = 0

    def _importance(self, frame: tuple[int, torch.Tensor, torch.Tensor], text: torch.Tensor) -> float:
        # compress_kv_bank: raw logits text . key / sqrt(D), averaged over text tokens, heads, frame tokens
        _, k, _ = frame  # k: (H, T, D); text: (P, H, D)
        total, count = 0.0, 0
        for h in range(H):
            for i in range(text.shape[0]):
                for j in range(T):
                    total += float(torch.dot(text[i, h].double(), k[h, j].double())) / math.sqrt(D)
                    count += 1
        return total / count

    def bank_before_chunk(self, text: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """_apply_cache_updates_before: write the pending prototype, compressing once the bank is full."""
        if self.recorded == 0:
            return list(self.bank)
        assert self.pending is not None
        if self.recorded <= self.bank_size:
            new = list(self.bank)
            if len(new) >= self.recorded:
                new[self.recorded - 1] = self.pending
            else:
                new.append(self.pending)
            return new
        scored = [(self._importance(f, text), -i, f) for i, f in enumerate(self.bank)]
        scored.sort(key=lambda x: (x[0], x[1]), reverse=True)
        return [f for _, _, f in scored[: self.bank_size - 1]] + [self.pending]

    def read(self, q: torch.Tensor, text: torch.Tensor) -> list[list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Per head: the frames the chunk attends to besides itself. q: (H, n, D)."""
        bank = self.bank_before_chunk(text)
        sink = self.frames[: self.sink]
        rest = self.frames[self.sink :]
        window = rest[max(0, len(rest) - self.window) :] if self.window > 0 else []
        per_head = []
        for h in range(H):
            pool = sink + bank
            if self.top_k is not None:
                q_mean = q[h].double().mean(dim=0)
                scored = []
                for i, (p, k, v) in enumerate(pool):
                    scored.append((float(torch.dot(q_mean, k[h].double().mean(dim=0))), -i, (p, k, v)))
                scored.sort(key=lambda x: (x[0], x[1]), reverse=True)
                pool = [f for _, _, f in scored[: self.top_k]]
            per_head.append([(p, k[h], v[h]) for p, k, v in pool + window])
        return per_head

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: list[int], text: torch.Tensor) -> None:
        """The chunk's clean pass: the bank it read is kept; every `interval` chunks its first frame is recorded."""
        self.bank = self.bank_before_chunk(text)
        new = [(p, k[:, i], v[:, i]) for i, p in enumerate(positions)]  # k: (H, f, T, D)
        self.frames.extend(new)
        if self.chunks % self.interval == 0:
            self.pending = new[0]
            self.recorded += 1
        self.chunks += 1


@settings(max_examples=30, deadline=None)
@given(
    sink=st.integers(0, 3),
    window=st.integers(0, 6),
    bank=st.integers(1, 3),
    top_k=st.one_of(st.none(), st.integers(1, 5)),
    interval=st.integers(1, 3),
    frames_per_chunk=st.integers(1, 3),
    chunks=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_memflow_matches_naive_reference(
    sink: int, window: int, bank: int, top_k: int | None, interval: int, frames_per_chunk: int, chunks: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    b, f = 2, frames_per_chunk
    mem = memkit.MemFlowMemory(
        H, D, T, sink_frames=sink, window_frames=window, bank_frames=bank, top_k=top_k, record_interval=interval
    )
    refs = [MemFlowReference(sink, window, bank, top_k, interval) for _ in range(b)]
    prompts = [torch.randn(b, 5, H * D, generator=g) for _ in range(2)]  # two prompts: switches happen
    mask = torch.rand(b, 5, generator=g) > 0.3  # the release ignores padding: so must score="release"
    state = mem.init_state(b)
    for c in range(chunks):
        prompt = prompts[int(torch.randint(0, 2, (1,), generator=g))]
        text = prompt.reshape(b, 5, H, D)
        pos = torch.arange(c * f, (c + 1) * f)[None].expand(b, f)
        q = torch.randn(b, H, f * T, D, generator=g)
        ctx = mem.read(state, memkit.Query(q, pos, T, prompt=prompt, prompt_mask=mask))
        for i, ref in enumerate(refs):
            expected = ref.read(q[i], text[i])
            for h in range(H):
                _same(_frames_per_head(ctx, i, h), expected[h])
        k = torch.randn(b, H, f * T, D, generator=g)
        v = torch.randn(b, H, f * T, D, generator=g)
        chunk = memkit.Chunk(k, v, torch.randn(b, f * T, 8, generator=g), pos, T, prompt, mask)
        state = mem.write(state, chunk)
        for i, ref in enumerate(refs):
            ref.write(k[i].reshape(H, f, T, D), v[i].reshape(H, f, T, D), pos[i].tolist(), text[i])


class LongLiveReference:
    """One batch item of LongLive's attention budget: sink frames, then the most recent frames."""

    def __init__(self, sink: int, budget: int, frames_per_chunk: int) -> None:
        # local_attn_size (the whole budget, in frames) covers the sink, the chunk being generated
        # and the recent past: the past gets budget - sink - chunk frames
        self.sink, self.past = sink, budget - sink - frames_per_chunk
        self.frames: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def read(self, h: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        sink = self.frames[: self.sink]
        rest = self.frames[self.sink :]
        recent = rest[max(0, len(rest) - self.past) :] if self.past > 0 else []
        return [(p, k[h], v[h]) for p, k, v in sink + recent]

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: list[int]) -> None:
        self.frames.extend((p, k[:, i], v[:, i]) for i, p in enumerate(positions))


@settings(max_examples=30, deadline=None)
@given(
    sink=st.integers(0, 4),
    frames_per_chunk=st.integers(1, 3),
    extra=st.integers(0, 9),
    chunks=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_longlive_budget_matches_naive_reference(
    sink: int, frames_per_chunk: int, extra: int, chunks: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    b, f = 2, frames_per_chunk
    budget = sink + f + extra  # LongLive: local_attn_size 12 = sink 3 + chunk 3 + 6 past frames
    mem = memkit.SinkWindowMemory(H, D, T, sink_frames=sink, window_frames=budget - sink - f)
    refs = [LongLiveReference(sink, budget, f) for _ in range(b)]
    state = mem.init_state(b)
    for c in range(chunks):
        pos = torch.arange(c * f, (c + 1) * f)[None].expand(b, f)
        ctx = mem.read(state, memkit.Query(torch.randn(b, H, f * T, D, generator=g), pos, T))
        for i, ref in enumerate(refs):
            for h in range(H):
                _same(_frames_per_head(ctx, i, h), ref.read(h))
            assert len(ref.read(0)) + f <= budget  # the whole attention, own chunk included, fits the budget
        k = torch.randn(b, H, f * T, D, generator=g)
        v = torch.randn(b, H, f * T, D, generator=g)
        state = mem.write(state, memkit.Chunk(k, v, torch.randn(b, f * T, 8, generator=g), pos, T))
        for i, ref in enumerate(refs):
            ref.write(k[i].reshape(H, f, T, D), v[i].reshape(H, f, T, D), pos[i].tolist())
