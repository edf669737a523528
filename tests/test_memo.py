"""``TensorMemo``: a result comes back only for the very same, unchanged tensors (and extras)."""

import gc

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memkit.memo import TensorMemo, memo_active


@settings(max_examples=40, deadline=None)
@given(
    edits=st.lists(st.sampled_from(["same", "inplace", "other", "extra", "none_mask"]), min_size=1, max_size=6),
    size=st.integers(1, 3),
)
def test_hit_only_for_identical_unchanged_inputs(edits, size):
    memo = TensorMemo(size=size)
    x, mask = torch.randn(4), torch.ones(4, dtype=torch.bool)
    stored = memo.put(None, (x, mask), "k", x.sum())
    for edit in edits:
        if edit == "same":
            assert memo.get(None, (x, mask), "k") is stored
        elif edit == "inplace":
            x.add_(1.0)
            assert memo.get(None, (x, mask), "k") is None
            stored = memo.put(None, (x, mask), "k", x.sum())
        elif edit == "other":
            assert memo.get(None, (x.clone(), mask), "k") is None
        elif edit == "extra":
            assert memo.get(None, (x, mask), "other") is None
        else:
            assert memo.get(None, (x, None), "k") is None


def test_owners_keep_their_own_entry_and_a_freed_tensor_never_matches():
    memo = TensorMemo()

    class Owner:
        pass

    a, b, x = Owner(), Owner(), torch.ones(2)
    memo.put(a, (x,), None, "a's")
    memo.put(b, (x,), None, "b's")
    assert memo.get(a, (x,)) == "a's" and memo.get(b, (x,)) == "b's"
    del b
    gc.collect()
    assert len(memo._owned) == 1  # a dropped owner takes its entry with it
    shared = TensorMemo(size=2)
    y = torch.ones(3)
    shared.put(None, (y,), None, "y")
    del y
    gc.collect()
    z = torch.ones(3)  # may reuse y's id: identity is checked through a weak reference, not the id
    assert shared.get(None, (z,)) is None


def test_oldest_shared_entry_goes_first_and_edited_results_are_not_handed_back():
    memo = TensorMemo(size=2)
    xs = [torch.full((2,), float(i)) for i in range(3)]
    for i, x in enumerate(xs):
        memo.put(None, (x,), None, i)
    assert memo.get(None, (xs[0],)) is None and memo.get(None, (xs[1],)) == 1 and memo.get(None, (xs[2],)) == 2
    result = memo.put(None, (xs[2],), "t", xs[2] * 2)
    result.zero_()
    assert memo.get(None, (xs[2],), "t") is None


def test_active_only_where_a_result_may_be_reused():
    assert memo_active()
    with torch.enable_grad():
        assert memo_active(grad_ok=True) and not memo_active(grad_ok=False)
    with torch.no_grad():
        assert memo_active(grad_ok=False)
    seen = []

    def f(x):
        seen.append(memo_active())
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(torch.ones(1))
    assert seen == [False]  # traced: a graph must not depend on what Python remembers


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.sampled_from(["put", "inplace", "free", "put_extra", "put_pair"]), min_size=1, max_size=8),
    size=st.integers(1, 3),
)
def test_get_one_answers_as_get_does(steps, size):
    """The hot-path lookup of one tensor agrees with the general one whatever was stored before."""
    memo = TensorMemo(size=size)
    masks = [torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    for i, step in enumerate(steps):
        m = masks[i % 2]
        if step == "put":
            memo.put(None, (m,), None, bool(m.all()))
        elif step == "inplace":
            m.logical_not_()
        elif step == "free":
            masks[i % 2] = torch.ones(3, dtype=torch.bool)  # a new tensor, maybe at the freed one's id
            gc.collect()
        elif step == "put_extra":
            memo.put(None, (m,), "other", False)
        else:
            memo.put(None, (m, masks[(i + 1) % 2]), None, True)
        for t in masks:
            assert memo.get_one(t) is memo.get(None, (t,))
