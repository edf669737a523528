"""``rank_frames`` with a packed key (one sort) against its three-sort reference: the same order, always."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memkit.memories.frames import _rank_three_sorts, rank_frames, rank_key_base, top_k_frames

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0]


@settings(max_examples=80, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    length=st.integers(1, 40),
    bound=st.sampled_from([1, 2, 7, 64, 1 << 29]),
    special=st.floats(0.0, 0.6),
    tied=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_packed_key_gives_the_three_sort_order(lead, length, bound, special, tied, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, length)
    scores = torch.randn(shape, generator=g)
    if tied:  # few distinct values: ties everywhere, broken by priority, then by index
        scores = scores.round()
    pick = torch.rand(shape, generator=g) < special
    values = torch.tensor(SPECIAL)[torch.randint(len(SPECIAL), shape, generator=g)]
    scores = torch.where(pick, values, scores)
    valid = torch.rand(shape, generator=g) < 0.7
    priority = torch.randint(min(bound, 5) if tied else bound, shape, generator=g)
    want = _rank_three_sorts(scores, valid, priority)
    assert torch.equal(rank_frames(scores, valid, priority, priority_bound=bound), want)
    k = max(1, length // 2)
    assert torch.equal(top_k_frames(scores, valid, priority, k, priority_bound=bound)[0], want[..., :k])


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 6),
    length=st.integers(1, 40),
    special=st.floats(0.0, 0.6),
    tied=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_top_k_with_distinct_priorities_is_the_sorted_prefix(rows, length, special, tied, seed):
    """SparseKV's path: priorities a permutation of each row (its recency), one topk on the packed key."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn((rows, length), generator=g)
    if tied:
        scores = scores.round()
    pick = torch.rand((rows, length), generator=g) < special
    values = torch.tensor(SPECIAL)[torch.randint(len(SPECIAL), (rows, length), generator=g)]
    scores = torch.where(pick, values, scores)
    valid = torch.rand((rows, length), generator=g) < 0.7
    priority = torch.stack([torch.randperm(length, generator=g) for _ in range(rows)])
    want = _rank_three_sorts(scores, valid, priority)
    for k in sorted({1, max(1, length // 3), length}):
        index, ok = top_k_frames(scores, valid, priority, k, priority_bound=length, distinct_priority=True)
        assert torch.equal(index, want[..., :k])
        assert torch.equal(ok, valid.gather(-1, want[..., :k]))
        base = rank_key_base(valid, priority, length)  # worked out once, as a read plan does
        got = top_k_frames(scores, valid, priority, k, priority_bound=length, distinct_priority=True, key_base=base)
        assert torch.equal(got[0], index) and torch.equal(got[1], ok)


def test_bound_out_of_range_is_refused():
    with pytest.raises(ValueError, match="priority_bound"):
        rank_frames(torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), 0)
