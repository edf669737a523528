"""attend: the log-sum-exp merge equals attention over the concatenation, on every backend."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memkit
from memkit.attention import attend_partial, get_backend, merge_partials


def dense_reference(q, keys, values, mask):
    """Softmax attention over an explicit concatenation, in float64."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q.double(), keys.double()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), values.double())


def random_context(gen, b, h, m, d, valid_p, poison=None):
    """Random keys and values; unused slots hold ``poison`` when it is given."""
    k = torch.randn(b, h, m, d, generator=gen)
    v = torch.randn(b, h, m, d, generator=gen)
    mask = torch.rand(b, h, m, generator=gen) < valid_p
    pos = torch.randint(0, 100, (b, h, m), generator=gen)
    if poison is not None:
        k, v = k.masked_fill(~mask[..., None], poison), v.masked_fill(~mask[..., None], poison)
    return memkit.Context(k, v, mask, pos)


shapes = st.tuples(
    st.integers(1, 3),  # b
    st.integers(1, 4),  # h
    st.integers(1, 9),  # n
    st.sampled_from([4, 8, 16]),  # d
)
# at least one context (an empty one now and then): attention over the segment alone is the easy case
contexts_spec = st.lists(st.tuples(st.integers(0, 12), st.sampled_from([0.0, 0.3, 1.0])), min_size=1, max_size=3)
# logits x30 overflow exp() in float32 unless the maximum is subtracted first
scales = st.sampled_from([1.0, 30.0])
# what unused (mask False) slots hold: attention must ignore it, even NaN, Inf or 3e38
poisons = st.sampled_from([None, float("nan"), float("inf"), 3e38])


@pytest.mark.parametrize("backend", memkit.available_backends())
@given(shape=shapes, ctx_spec=contexts_spec, scale=scales, poison=poisons, seed=st.integers(0, 2**16))
def test_merge_equals_concatenation(backend, shape, ctx_spec, scale, poison, seed):
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    q = q * scale  # logits x scale
    contexts = [random_context(gen, b, h, m, d, p, poison=poison) for m, p in ctx_spec]
    out = memkit.attend(q, k, v, *contexts, backend=backend)
    assert torch.isfinite(out).all()

    def clean(x, mask):
        return torch.where(mask[..., None], x, 0)  # the reference never sees what unused slots hold

    keys = torch.cat([k, *(clean(c.k, c.mask) for c in contexts)], dim=2)
    values = torch.cat([v, *(clean(c.v, c.mask) for c in contexts)], dim=2)
    mask = torch.cat([torch.ones(b, h, n, dtype=torch.bool), *(c.mask for c in contexts)], dim=2)
    tol = 2e-5 * scale  # float32 logits near 100 carry rounding of ~1e-5
    torch.testing.assert_close(out.double(), dense_reference(q, keys, values, mask), atol=tol, rtol=tol)


@given(shape=shapes, m=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_all_invalid_context_contributes_nothing(shape, m, seed):
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    dead = random_context(gen, b, h, m, d, 0.0)
    for backend in memkit.available_backends():
        torch.testing.assert_close(
            memkit.attend(q, k, v, dead, backend=backend), memkit.attend(q, k, v, backend="math")
        )


@given(shape=shapes, split=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_partials_merge_in_any_grouping(shape, split, seed):
    """Splitting one source into two partials and merging gives the same output and lse."""
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k, v = torch.randn(b, h, split + 3, d, generator=gen), torch.randn(b, h, split + 3, d, generator=gen)
    whole, lse_whole = attend_partial(q, k, v)
    o1, l1 = attend_partial(q, k[:, :, :split], v[:, :, :split])
    o2, l2 = attend_partial(q, k[:, :, split:], v[:, :, split:])
    merged, lse = merge_partials([o1, o2], [l1, l2])
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_whole, atol=1e-5, rtol=1e-5)


def test_empty_context_is_skipped():
    q = k = v = torch.randn(1, 2, 3, 8)
    empty = memkit.Context(torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, 8), torch.zeros(1, 2, 0, dtype=torch.bool),
                           torch.zeros(1, 2, 0, dtype=torch.long))  # fmt: skip
    torch.testing.assert_close(memkit.attend(q, k, v, empty), memkit.attend(q, k, v))


def test_auto_is_sdpa_on_cpu():
    assert get_backend("auto", torch.zeros(1, 1, 1, 1)).name == "sdpa"


def test_unavailable_backend_raises_clearly():
    q = torch.randn(1, 1, 2, 4)
    if "xformers" not in memkit.available_backends(q):
        with pytest.raises(memkit.BackendUnavailableError, match="xformers"):
            memkit.attend(q, q, q, backend="xformers")
    with pytest.raises(memkit.BackendUnavailableError, match="unknown attention backend 'flash9'.*math"):
        memkit.attend(q, q, q, backend="flash9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers needs CUDA")
def test_xformers_matches_math_on_cuda():
    pytest.importorskip("xformers")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 64, device="cuda", generator=gen, dtype=torch.float16) for _ in range(3))
    ctx = memkit.Context(k, v, torch.rand(2, 4, 32, device="cuda", generator=gen) < 0.5,
                         torch.zeros(2, 4, 32, dtype=torch.long, device="cuda"))  # fmt: skip
    torch.testing.assert_close(
        memkit.attend(q, k, v, ctx, backend="xformers").float(),
        memkit.attend(q, k, v, ctx, backend="math").float(),
        atol=2e-3,
        rtol=2e-3,
    )


def test_bad_shapes_name_the_dimension():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(memkit.ShapeError, match=r"k: dimension h \(heads\) should be 2, got 3"):
        memkit.attend(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8), backend="math")
    with pytest.raises(memkit.ShapeError, match=r"contexts\[0\].k: dimension d \(head_dim\) should be 8, got 4"):
        memkit.attend(q, q, q, memkit.Context(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
                                              torch.ones(1, 2, 5, dtype=torch.bool),
                                              torch.zeros(1, 2, 5, dtype=torch.long)))  # fmt: skip
    with pytest.raises(memkit.ShapeError, match="expected 4 dimensions"):
        memkit.attend(torch.randn(2, 3, 8), q, q)


def test_errors_name_the_dimension_with_typechecking_switched_off():
    """jaxtyping can be switched off at run time; memkit's own checks still name the dimension."""
    from memkit.typing import set_typecheck, typecheck_enabled

    q = torch.randn(1, 2, 3, 8)
    old = set_typecheck(False)
    try:
        assert not typecheck_enabled()
        with pytest.raises(memkit.ShapeError, match=r"^k: dimension h \(heads\) should be 2, got 3"):
            memkit.attend(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    finally:
        set_typecheck(old)
    with pytest.raises(memkit.ShapeError, match="Type-check error"):  # the jaxtyping report is back
        memkit.attend(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))


@given(shape=shapes, parts=st.lists(st.integers(1, 12), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_all_valid_contexts_skip_the_mask_bit_for_bit(shape, parts, seed):
    """Every slot valid (a full memory): no zeroing, no mask, and the same bits as the masked call."""
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    ctxs = [random_context(gen, b, h, m, d, 1.0) for m in parts]
    keys = torch.cat([k, *(c.k for c in ctxs)], dim=2)
    values = torch.cat([v, *(c.v for c in ctxs)], dim=2)
    mask = torch.ones(b, h, 1, keys.shape[2], dtype=torch.bool)
    want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    assert torch.equal(memkit.attend(q, k, v, *ctxs), want)


def test_a_mask_changed_in_place_is_seen():
    """Validity is remembered per mask tensor and version: an in-place change is read again."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen) for _ in range(3))
    ctx = random_context(gen, 1, 2, 6, 8, 1.0)
    memkit.attend(q, k, v, ctx)  # all valid: remembered
    ctx.mask[0, 0, 2] = False
    ctx.k[0, 0, 2] = float("nan")  # an invalid slot may hold anything
    got = memkit.attend(q, k, v, ctx)
    assert torch.isfinite(got).all()
    want = dense_reference(
        q,
        torch.cat([k, ctx.k], 2),
        torch.cat([v, ctx.v], 2),
        torch.cat([torch.ones(1, 2, 4, dtype=torch.bool), ctx.mask], 2),
    )
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_a_deleted_backend_leaves_auto():
    from memkit.attention import Backend, backends, register_backend
    from memkit.attention.backends import attend_sdpa

    q = torch.zeros(1, 1, 1, 1)
    register_backend(Backend("first", attend_sdpa, lambda q: None, priority=99))
    assert get_backend("auto", q).name == "first"
    del backends._REGISTRY["first"]
    assert get_backend("auto", q).name == "sdpa"
