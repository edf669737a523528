"""Learning tests: SparseKVMemory and PromptBankMemory hosts recall a code from a random earlier segment.

The task: a stream of 6 one-frame segments. One of segments 1-5, drawn at random per stream,
shows a code (one of 4, one-hot on every token) with a "this is the code" marker channel.
The other four show distractors: a code drawn uniformly (so they say nothing about the
answer) plus noise. Segment 6 shows only a "recall now" channel and must output the code.
The answer is in one past frame only, and that frame moves: a memory must keep and return
it by its content.

The hosts are :class:`memkit.models.tiny.TinySegmentModel` with 2 blocks and a memory in the
first only: one memory layer, so nothing can be relayed from one layer's memory to another's
(with a memory in both, a second layer's memory holds what the first one read, and even a
content-blind memory scores 1.0). Trained end to end through the written states.

Each trained host is then evaluated again with its memory swapped for a content-blind one
of the same size (same weights, same state): routing or retrieval that ignores content and
returns the newest frames, or the oldest. The test asserts the margin over the best of them
and what the memory returned, not only the accuracy.

- SparseKVMemory: the ring holds all 5 past frames; each head reads only its top-1 by routing
  score. Routing gets no gradient through the discrete choice; it learns because the
  mean-pooled routing score is the mean of the attention logits (as in MoC).
- PromptBankMemory (bank of 3 out of 5 prototypes): every segment carries the same prompt,
  and relevance to it decides what the bank keeps at each write and returns at the recall.
  The top-B choice gives relevance no gradient, so, as the memory's docs advise, it is
  trained by another loss: the relevance of the code frame at the recall (cross-entropy).
"""

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import memkit
from memkit.models.tiny import TinySegmentModel

CODES, TOKENS, SEGMENTS = 4, 4, 6
IN_DIM = CODES + 2 + 4  # code one-hot, code marker, recall marker, noise
HEADS, DIM = 2, 32
HEAD_DIM = DIM // HEADS
PROMPT = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(123))


def make_batch(batch: int, g: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Segment inputs ``(b t IN_DIM)``, the codes ``(b,)`` and the segment each stream shows it in ``(b,)``."""
    code = torch.randint(0, CODES, (batch,), generator=g)
    where = torch.randint(0, SEGMENTS - 1, (batch,), generator=g)
    xs = []
    for s in range(SEGMENTS):
        x = torch.zeros(batch, TOKENS, IN_DIM)
        if s < SEGMENTS - 1:
            here = where == s
            shown = torch.where(here, code, torch.randint(0, CODES, (batch,), generator=g))
            x[:, :, :CODES] = F.one_hot(shown, CODES).float()[:, None]
            x[:, :, CODES] = here.float()[:, None]
            noise = torch.randn(batch, TOKENS, IN_DIM - CODES - 2, generator=g)
            x[:, :, CODES + 2 :] = noise * (~here).float()[:, None, None]
        else:
            x[:, :, CODES + 1] = 1.0
        xs.append(x)
    return xs, code, where


def stream(model: TinySegmentModel, xs: list[torch.Tensor], prompt: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """Write segments 1..5 (clean passes), then read at segment 6; returns logits and the states."""
    b = xs[0].shape[0]
    p = None if prompt is None else prompt.expand(b, -1, -1)
    states = model.init_states(b)
    for s, x in enumerate(xs[:-1]):
        _, states = model(x, states, torch.full((b, 1), s), write=True, prompt=p)
    y, _ = model(xs[-1], states, torch.full((b, 1), SEGMENTS - 1), prompt=p)
    return y.mean(dim=1), states


def train(
    make_memory: Callable[[], memkit.Memory[Any]], *, steps: int, seed: int, use_prompt: bool = False
) -> TinySegmentModel:
    torch.manual_seed(seed)
    model = TinySegmentModel(
        IN_DIM, CODES, tokens_per_frame=TOKENS, dim=DIM, depth=2, heads=HEADS,
        memory=lambda i: make_memory() if i == 0 else None,  # one memory layer: nothing relayed
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = PROMPT if use_prompt else None
    for _ in range(steps):
        xs, code, where = make_batch(32, g)
        logits, states = stream(model, xs, prompt)
        loss = F.cross_entropy(logits, code)
        memory = model.blocks[0].attn.memory
        if isinstance(memory, memkit.PromptBankMemory):
            loss = loss + retrieval_loss(memory, states[0], where)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def retrieval_loss(memory: memkit.PromptBankMemory, state: Any, where: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the prompt's relevance over the bank's candidates, the code frame the target."""
    b = where.shape[0]
    relevance = memory.relevance(state.pool.k, state.pool.valid, PROMPT.expand(b, -1, -1), None)  # (b P), sums to 1
    target = (state.pool.pos == where[:, None]) & state.pool.valid
    held = target.any(1)  # a stream whose bank already lost the code frame teaches nothing here
    if not bool(held.any()):
        return relevance.sum() * 0
    return -(relevance.clamp_min(1e-6).log() * target).sum(1)[held].mean()


def evaluate(model: TinySegmentModel, memory: Any = None, *, use_prompt: bool = False) -> dict[str, Any]:
    """Accuracy on 512 fresh streams, optionally with the first layer's memory swapped for ``memory``.

    Also: ``returned``, the fraction of streams whose recall read (any head) returned the code
    frame; ``held``, the fraction whose state still held it; ``where``; the states.
    """
    attn = model.blocks[0].attn
    original = attn.memory
    used = memory if memory is not None else original
    contexts: list[memkit.Context] = []
    used.read = lambda state, query: contexts.append(type(used).read(used, state, query)) or contexts[-1]
    attn.memory = used
    try:
        with torch.no_grad():
            xs, code, where = make_batch(512, torch.Generator().manual_seed(999))
            logits, states = stream(model, xs, PROMPT if use_prompt else None)
    finally:
        attn.memory = original
        del used.read  # the class's read again
    ctx = contexts[-1]  # the recall's
    frames = (ctx.positions == where[:, None, None]) & ctx.mask  # (b h m): slots holding the code frame
    state = states[0]
    frames_held = state.pool if isinstance(state, memkit.memories.PromptBankState) else state.ring  # sparse_kv's ring
    pos, valid = (frames_held.pos, frames_held.valid)
    return {
        "acc": float((logits.argmax(1) == code).float().mean()),
        "returned": float(frames.flatten(1).any(1).float().mean()),
        "held": float(((pos == where[:, None]) & valid).any(1).float().mean()),
    }


class NewestFrames(memkit.SparseKVMemory):
    """Content-blind routing: every score ties, so the recency tie-break returns the newest frames."""

    def read(self, state: Any, query: memkit.Query) -> memkit.Context:
        return super().read(state.replace(desc=torch.zeros_like(state.desc)), query)


class OldestFrames(NewestFrames):
    """Content-blind routing that returns the oldest frames."""

    def _recency(self, state: Any) -> torch.Tensor:
        return -super()._recency(state)


class NewestBank(memkit.PromptBankMemory):
    """Content-blind retrieval: relevance ignores the prompt, so the bank keeps and returns the newest frames."""

    def relevance(self, k: Any, valid: Any, prompt: Any, prompt_mask: Any) -> Any:
        return torch.zeros(valid.shape, device=k.device)


def sparse(cls: type = memkit.SparseKVMemory) -> Any:
    return cls(HEADS, HEAD_DIM, TOKENS, capacity=8, top_k=1)


def test_sparse_kv_routes_to_the_code_frame_wherever_it_is() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    for seed in (0, 1):
        model = train(sparse, steps=100, seed=seed)
        got = evaluate(model)
        newest, oldest = evaluate(model, sparse(NewestFrames))["acc"], evaluate(model, sparse(OldestFrames))["acc"]
        print(
            f"seed {seed}: SparseKVMemory(top_k=1 of 5) recall {got['acc']:.3f}, its read returned the code frame "
            f"in {got['returned']:.3f} of streams; content-blind routing on the same host: newest {newest:.3f}, "
            f"oldest {oldest:.3f} (chance 0.25; {time.perf_counter() - start:.1f}s)"
        )
        assert got["acc"] >= 0.95  # measured 1.000 (seeds 0, 1)
        # a head that misses the code frame still answers code 0 right, by elimination: measured 0.75 and 1.0
        assert got["returned"] >= 0.6
        assert got["acc"] - max(newest, oldest) >= 0.4  # blind routing finds the code 1 time in 5: ~0.4


def test_prompt_bank_keeps_and_returns_the_code_frame() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()

    def bank(cls: type = memkit.PromptBankMemory) -> Any:
        return cls(HEADS, HEAD_DIM, TOKENS, bank_frames=3)

    for seed in (0, 1):
        model = train(bank, steps=70, seed=seed, use_prompt=True)
        got = evaluate(model, use_prompt=True)
        blind = evaluate(model, bank(NewestBank), use_prompt=True)
        print(
            f"seed {seed}: PromptBankMemory(B=3 of 5) recall {got['acc']:.3f}; the bank held the code frame in "
            f"{got['held']:.3f} of streams and returned it in {got['returned']:.3f}; content-blind (newest) bank on "
            f"the same host: recall {blind['acc']:.3f}, held {blind['held']:.3f}, returned {blind['returned']:.3f} "
            f"({time.perf_counter() - start:.1f}s)"
        )
        assert got["acc"] >= 0.95  # measured 1.000 (seeds 0, 1)
        assert got["held"] >= 0.95 and got["returned"] >= 0.95  # measured 1.000
        # the newest 3 of 5 frames hold the code 3 times in 5: recall ~0.7, returned ~0.6 (its pool of 4 holds 0.8)
        assert got["acc"] - blind["acc"] >= 0.25
        assert got["returned"] - blind["returned"] >= 0.3
