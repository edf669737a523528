"""Masks and extra (joint) tokens in the attach path (issue 18, items 2 and 3).

The property: attention with the host's masks over [memory; extra; segment] through
``attend(q, k, v, mask=..., extra=...)`` equals masked softmax attention over the
concatenation, computed here in float64 from the same rotated keys.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import memkit
from memkit.integrations import ExtraTokens
from memkit.layers import apply_rotary
from memkit.memories.none import NoState


class FixedContext(memkit.NoMemory):
    """A memory whose read returns a given context (the property is about attention, not storage)."""

    def __init__(self, context: memkit.Context) -> None:
        self.context = context

    def read(self, state: NoState, query: memkit.Query) -> memkit.Context:
        return self.context


class Raw(nn.Module):
    """An 'attention module' whose adapter takes q, k, v as they come."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, extra: ExtraTokens | None) -> Tensor:
        raise AssertionError("only called through memkit")


def adapter(module, attend, q, k, v, mask, extra):  # type: ignore[no-untyped-def]
    hidden = v.transpose(1, 2).flatten(2)  # what a commit stores as the layer's input
    if extra is not None and extra.q is not None:
        return attend.joint(q, k, v, extra, mask=mask, hidden=hidden)
    return attend(q, k, v, mask=mask, extra=extra, hidden=hidden)


def reference(q, k, v, ctx, mask, extra, fp, t):  # type: ignore[no-untyped-def]
    """Masked softmax attention over [memory; extra; segment] in float64, rows that see nothing are 0."""
    b, h, n, d = q.shape
    pos = fp.repeat_interleave(t, dim=1)
    qr, kr = apply_rotary(q, pos), apply_rotary(k, pos)
    ck = apply_rotary(ctx.k, ctx.positions)
    queries = qr if extra is None or extra.q is None else torch.cat([qr, extra.q], dim=2)
    nq = queries.shape[2]
    own = torch.ones(b, 1, n, n, dtype=torch.bool) if mask is None else mask
    own = own[:, None, None, :] if own.ndim == 2 else own[:, None] if own.ndim == 3 else own
    own = own.expand(b, h, n, n)
    if nq > n:  # the extra queries see the segment's keys through its key padding
        own = torch.cat([own, own[:, :, :1].expand(b, h, nq - n, n)], dim=2)
    keys, values, masks = [ck, kr], [ctx.v, v], [ctx.mask[:, :, None, :].expand(b, h, nq, -1), own]
    if extra is not None:
        e = extra.k.shape[2]
        em = torch.ones(b, e, dtype=torch.bool) if extra.mask is None else extra.mask
        keys.insert(1, extra.k)
        values.insert(1, extra.v)
        masks.insert(1, em[:, None, None, :].expand(b, h, nq, e))
    key, value, m = torch.cat(keys, 2).double(), torch.cat(values, 2).double(), torch.cat(masks, 3)
    scores = (queries.double() @ key.transpose(-1, -2) / math.sqrt(d)).masked_fill(~m, float("-inf"))
    w = torch.nan_to_num(torch.softmax(scores, dim=-1))
    out = w @ value
    return out[:, :, :n], out[:, :, n:]


@st.composite
def cases(draw):  # type: ignore[no-untyped-def]
    b, h, f, t = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    m, e = draw(st.integers(0, 5)), draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["none", "padding", "per_query", "block_causal"]))
    joint = e > 0 and kind in ("none", "padding") and draw(st.booleans())
    return b, h, f, t, m, e, kind, joint, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@settings(max_examples=20, deadline=None)
@given(case=cases())
def test_masked_attention_over_memory_and_segment_equals_the_concatenation(backend: str, case) -> None:  # type: ignore[no-untyped-def]
    b, h, f, t, m, e, kind, joint, extra_padded, seed = case
    g = torch.Generator().manual_seed(seed)
    d, n = 8, f * t
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    ctx = memkit.Context(
        torch.randn(b, h, m, d, generator=g),
        torch.randn(b, h, m, d, generator=g),
        torch.rand(b, h, m, generator=g) < 0.7,
        torch.randint(-6, 0, (b, h, m), generator=g),
    )
    fp = torch.arange(f)[None].expand(b, f) + 3
    mask = None
    if kind == "padding":
        mask = torch.rand(b, n, generator=g) < 0.7
    elif kind == "per_query":
        mask = torch.rand(b, h, n, n, generator=g) < 0.6
    elif kind == "block_causal":
        block = torch.arange(f).div(2, rounding_mode="floor").repeat_interleave(t)  # two frames per block
        mask = block[None, :] <= block[:, None]  # (n n): query row, key column
        mask = mask[None].expand(b, n, n)
    extra = None
    if e:
        em = (torch.arange(e) < e - 1).expand(b, e).clone() if extra_padded else None
        eq = torch.randn(b, h, e, d, generator=g) if joint else None
        extra = ExtraTokens(torch.randn(b, h, e, d, generator=g), torch.randn(b, h, e, d, generator=g), em, eq)
    host = Raw()
    with memkit.attach(host, FixedContext(ctx), layers="", adapter=adapter, rotary=apply_rotary, backend=backend) as s:
        s.set_segment(fp, t)
        got = host(q, k, v, mask, extra)
    want, want_extra = reference(q, k, v, ctx, mask, extra, fp, t)
    if joint:
        got, got_extra = got
        torch.testing.assert_close(got_extra.double(), want_extra, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_an_all_true_mask_gives_the_unmasked_route() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    memory = memkit.FIFOMemory(2, 8, 3, frames=2)
    host = Raw()
    with memkit.attach(host, memory, layers="", adapter=adapter, rotary=apply_rotary) as s:
        s.set_segment([0, 1])
        s.commit(q, k, v, None, None)
        s.set_segment([2, 3])
        plain = host(q, k, v, None, None)
        masked = host(q, k, v, torch.ones(1, 6, dtype=torch.bool), None)
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=1e-5)


def test_extra_tokens_are_never_written_to_memory() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    text = ExtraTokens(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    host = Raw()
    with memkit.attach(host, memkit.FIFOMemory(2, 8, 3, frames=2), layers="", adapter=adapter) as a:
        a.set_segment([0, 1])
        a.commit(q, k, v, None, text)
        with_text = a.states[""]
    with memkit.attach(host, memkit.FIFOMemory(2, 8, 3, frames=2), layers="", adapter=adapter) as b:
        b.set_segment([0, 1])
        b.commit(q, k, v, None, None)
        without = b.states[""]
    for x, y in zip(torch.utils._pytree.tree_leaves(with_text), torch.utils._pytree.tree_leaves(without), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.zeros(1, 6), "expected a boolean mask"),
        (torch.ones(1, 5, dtype=torch.bool), "dimension n"),
        (torch.ones(1, 3, 6, 6, dtype=torch.bool), "dimension h \\(heads\\) should be 1 or 2, got 3"),
        (torch.ones(3, 6, dtype=torch.bool), "dimension b"),
    ],
)
def test_a_wrong_mask_is_refused_naming_the_dimension(mask: Tensor, message: str) -> None:
    q = torch.randn(1, 2, 6, 8)
    host = Raw()
    with memkit.attach(host, memkit.NoMemory(), layers="", adapter=adapter) as s:
        s.set_segment([0, 1])
        with pytest.raises(memkit.ShapeError, match=message):
            host(q, q, q, mask, None)


def test_joint_attention_refuses_a_per_query_segment_mask() -> None:
    q = torch.randn(1, 2, 6, 8)
    text = ExtraTokens(q[:, :, :2], q[:, :, :2], q=q[:, :, :2])
    host = Raw()
    with memkit.attach(host, memkit.NoMemory(), layers="", adapter=adapter) as s:
        s.set_segment([0, 1])
        with pytest.raises(memkit.AttachError, match="key padding mask"):
            host(q, q, q, torch.ones(1, 6, 6, dtype=torch.bool), text)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 5), m=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_memkit_attend_takes_the_mask_too(backend: str, b: int, n: int, m: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, 2, n, 8, generator=g) for _ in range(3))
    ctx = memkit.Context(
        torch.randn(b, 2, m, 8, generator=g), torch.randn(b, 2, m, 8, generator=g),
        torch.rand(b, 2, m, generator=g) < 0.6, torch.zeros(b, 2, m, dtype=torch.long),
    )  # fmt: skip
    mask = torch.rand(b, 1, n, n, generator=g) < 0.5
    got = memkit.attend(q, k, v, ctx, mask=mask, backend=backend)
    keys, values = torch.cat([ctx.k, k], 2).double(), torch.cat([ctx.v, v], 2).double()
    full = torch.cat([ctx.mask[:, :, None, :].expand(b, 2, n, m), mask.expand(b, 2, n, n)], dim=3)
    scores = (q.double() @ keys.transpose(-1, -2) / math.sqrt(8)).masked_fill(~full, float("-inf"))
    want = torch.nan_to_num(torch.softmax(scores, dim=-1)) @ values
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
