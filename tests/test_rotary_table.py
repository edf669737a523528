"""The CPU rotary table (rows looked up by position) against the angles computed from the positions."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memkit.layers import rotary
from memkit.layers.rotary import _compute_angles, rotary_angles


@settings(max_examples=40, deadline=None)
@given(
    dim=st.sampled_from([2, 6, 8, 32, 64, 128]),
    theta=st.sampled_from([10000.0, 500.0, 1e6]),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    high=st.sampled_from([1, 40, 5000, 100_000]),
    low=st.integers(-3, 0),
    dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_table_rows_equal_computed_angles(dim, theta, shape, high, low, dtype):
    positions = torch.randint(low, high, shape, dtype=dtype)  # negatives fall back to computing them
    got, want = rotary_angles(positions, dim, theta), _compute_angles(positions, dim, theta)
    assert got[0].shape == (*shape, dim)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_table_grows_and_falls_back_past_its_limit():
    dim, theta = 16, 12345.0
    small = rotary_angles(torch.tensor([3]), dim, theta)[0]
    grown = rotary_angles(torch.tensor([3, 9_000]), dim, theta)[0]
    assert rotary._TABLES[(dim, theta)][0].shape[0] > 9_000  # grown to cover the larger position
    assert torch.equal(small[0], grown[0])
    far = torch.tensor([rotary._TABLE_LIMIT + 5])
    assert torch.equal(rotary_angles(far, dim, theta)[0], _compute_angles(far, dim, theta)[0])
    assert rotary._TABLES[(dim, theta)][0].shape[0] <= rotary._TABLE_LIMIT
