"""``place_slots`` (one copy + row copies) against its reference: a gather of every slot and a select."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memkit.memories.frames import gather_frames, place_slots, ring_sources, sink_sources


def reference(old: torch.Tensor, new: torch.Tensor, src: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    mask = take.view(take.shape[0], 1, take.shape[1], *([1] * (old.ndim - 3)))
    return torch.where(mask, gather_frames(new, src, 2), old)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    slots=st.integers(0, 9),
    frames=st.integers(1, 12),
    seen=st.lists(st.integers(0, 30), min_size=3, max_size=3),
    ring=st.booleans(),
    extra_dims=st.integers(0, 2),
    contiguous=st.booleans(),
)
def test_place_slots_equals_gather_and_select(batch, slots, frames, seen, ring, extra_dims, contiguous):
    g = torch.Generator().manual_seed(slots * 100 + frames)
    tail = (2, 3)[:extra_dims]
    old = torch.randn(batch, 2, slots, *tail, generator=g)
    new = torch.randn(batch, frames, 2, *tail, generator=g).transpose(1, 2)  # a frame axis that is not contiguous
    if contiguous:
        new = new.contiguous()
    counts = torch.tensor(seen[:batch])
    if ring:
        first = (3 - counts).clamp(0, frames)  # some batch items send their first frames elsewhere (a sink)
        src, take = ring_sources((counts - 3).clamp(min=0), first, frames, max(slots, 1))
        src, take = src[:, :slots], take[:, :slots]
    else:
        src, take = sink_sources(counts, slots, frames)
    # poison what is overwritten: NaN in slots that are replaced must not leak, NaN kept where slots are kept
    old = torch.where(torch.rand(old.shape, generator=g) < 0.1, torch.nan, old)
    got, want = place_slots(old, new, src, take), reference(old, new, src, take)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
