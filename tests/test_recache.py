"""LongLive's re-cache at a prompt switch (#14 item 5): ``MALTNetwork.recache`` and ``stream(recache=K)``."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

from memkit import ShapeError
from memkit.models.malt import MALTConfig, MALTNetwork, stream
from memkit.models.malt.sampler import EulerSampler

MEMORIES = [
    {"name": "prompt_bank", "kwargs": {"bank_frames": 2}},
    {"name": "sink_window", "kwargs": {"sink_frames": 2, "window_frames": 4}},
]


def _net(memory: dict) -> MALTNetwork:
    net = MALTNetwork(MALTConfig.preset("tiny", prompt_dim=6, memory=memory)).eval()
    # adaLN-Zero starts every modulation at 0, where the prompt cannot change a key: perturb the weights
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net


def _same(a: object, b: object) -> bool:
    return all(torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


@pytest.mark.parametrize("memory", MEMORIES, ids=lambda m: m["name"])
def test_recache_equals_writing_the_window_under_the_new_prompt_and_changes_the_memory(memory: dict) -> None:
    net = _net(memory)
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(1, 6, 3, 8, 8, generator=g)  # segments 0, 1, 2 of 2 frames
    old, new = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    with torch.no_grad():
        written = {name: net.init_states(1) for name in ("old", "new")}
        for j in range(3):
            pos = net.segment_positions(j, 1)
            for name, p in (("old", old), ("new", new)):
                written[name] = net.write(frames[:, 2 * j : 2 * j + 2], written[name], pos, prompt=p)
        window = net.recache(frames[:, 2:], 1, prompt=new)  # the last two segments
        everything = net.recache(frames, 0, prompt=new)
    # a re-cache of every written frame is the memory written under the new prompt from the start
    assert _same(everything, written["new"])
    # and it changes what the memory holds: the same frames' keys under the old prompt differ
    assert not _same(everything, written["old"])
    # a re-cache of the window equals a from-scratch write of those segments, at their own positions
    with torch.no_grad():
        fresh = net.init_states(1)
        for j in (1, 2):
            fresh = net.write(frames[:, 2 * j : 2 * j + 2], fresh, net.segment_positions(j, 1), prompt=new)
    assert _same(window, fresh)


def test_stream_recaches_at_a_switch_only() -> None:
    net = _net(MEMORIES[0])
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g)
    prompts = [a, a, b, b, a]
    sampler = EulerSampler(steps=2)
    plain = list(stream(net, 5, prompt=prompts, sampler=sampler, seed=3))
    got = list(stream(net, 5, prompt=prompts, sampler=sampler, seed=3, recache=2))
    assert [s.recached for s in got] == [False, False, True, False, True]
    assert not any(s.recached for s in plain)
    # before the first switch nothing differs
    for s0, s1 in zip(plain[:2], got[:2], strict=True):
        assert torch.equal(s0.latents, s1.latents) and _same(s0.states, s1.states)
    # at the switch: re-cache segments 0 and 1 under b, then the new segment is written on top
    with torch.no_grad():
        states = net.recache(torch.cat([got[0].latents, got[1].latents], dim=1), 0, prompt=b)
        states = net.write(got[2].latents, states, net.segment_positions(2, 1), prompt=b)
    assert _same(states, got[2].states)
    assert not _same(plain[2].states, got[2].states)


def test_recache_refuses_partial_segments_and_bad_options() -> None:
    net = _net(MEMORIES[1])
    with pytest.raises(ShapeError, match=r"dimension T \(frames\) of latents should be a multiple of F = 2"):
        net.recache(torch.randn(1, 3, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="recache must be a non-negative int"):
        next(stream(net, 1, recache=-1))
