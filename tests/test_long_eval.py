"""The long-video pieces: path families, sweep clips, position clamping, the length/lag scores."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memkit
from memkit.data import EVAL_PATHS, PATH_FAMILIES, TRAIN_PATHS, revisit_lags, sweep_clip, sweep_path
from memkit.errors import DataError
from memkit.layers import clamp_context_positions
from memkit.train.long_eval import LongResult, score_frames

families = st.sampled_from(PATH_FAMILIES)


def test_evaluation_families_are_never_trained_on():
    assert set(TRAIN_PATHS).isdisjoint(EVAL_PATHS)
    from memkit.train import TRAIN_PRESETS

    for name, preset in TRAIN_PRESETS.items():
        path = preset["data"]["kwargs"].get("path", "out_and_back")
        assert path not in EVAL_PATHS, f"preset {name} trains on evaluation-only family {path}"


@given(family=families, places=st.integers(2, 12), extra=st.integers(0, 80), seed=st.integers(0, 2**31))
def test_sweep_path_sweeps_then_stays_on_the_canvas(family, places, extra, seed):
    path = sweep_path(family, places, places + extra, seed)
    assert path.shape == (places + extra,)
    assert path[:places].tolist() == list(range(places))
    assert path.min() >= 0 and path.max() < places
    assert (sweep_path(family, places, places + extra, seed) == path).all()
    # after the sweep every frame is a revisit, so its lag is known
    lags = revisit_lags(path)
    assert (lags[:places] == -1).all() and (lags[places:] >= 1).all()


@given(places=st.lists(st.integers(0, 5), max_size=40))
def test_revisit_lags_match_a_brute_force_search(places):
    lags = revisit_lags(np.array(places, dtype=np.int64))
    for i, p in enumerate(places):
        earlier = [j for j in range(i) if places[j] == p]
        assert lags[i] == (i - earlier[-1] if earlier else -1)


def test_long_families_reach_long_lags():
    # dwell keeps the camera on one half, so the other half comes back after a lag near the clip length
    lags = revisit_lags(sweep_path("dwell", 8, 8 + 64, seed=3))
    assert lags.max() >= 48
    # pauses: the camera stays at one place for several frames, which a time offset cannot explain
    path = sweep_path("pauses", 8, 8 + 64, seed=0)
    assert (np.diff(path[8:]) == 0).sum() >= 4


@given(family=families, seed=st.integers(0, 10_000))
def test_sweep_clip_frames_at_one_place_are_identical(family, seed):
    clip = sweep_clip(seed, family, frames=20, places=5, frame_size=8, smooth=1.0)
    ids = clip.place_ids
    assert ids is not None and clip.video.shape == (20, 3, 8, 8)
    for i in range(20):
        assert torch.equal(clip.video[i], clip.video[int(ids[i])])  # frame i of the sweep shows place i
    assert torch.equal(clip.positions[:, 1], ids.float() * 4)


def test_sweep_clip_refuses_bad_arguments():
    with pytest.raises(DataError, match="unknown path family 'zigzag'"):
        sweep_clip(0, "zigzag")
    with pytest.raises(DataError, match="frames must be an int >= places"):
        sweep_clip(0, "walk", frames=4, places=8)
    with pytest.raises(DataError, match="unknown path"):
        memkit.data.RevisitWorld(path="zigzag")


def _context(positions):
    positions = torch.as_tensor(positions)
    b, h, m = positions.shape
    return memkit.Context(
        torch.randn(b, h, m, 8), torch.randn(b, h, m, 8), torch.ones(b, h, m, dtype=torch.bool), positions
    )


@given(
    start=st.integers(0, 500),
    ages=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    d=st.integers(0, 20),
)
def test_clamp_keeps_recent_positions_and_floors_old_ones(start, ages, d):
    q0 = start + max(ages)
    ctx = _context([[[q0 - a for a in ages]]])
    out = clamp_context_positions(ctx, torch.tensor([[q0, q0 + 1]]), d).positions[0, 0].tolist()
    assert out == [q0 - min(a, d) for a in ages]


@given(shift=st.integers(1, 5000), seed=st.integers(0, 1000))
def test_attention_with_max_distance_cannot_tell_how_old_a_far_frame_is(shift, seed):
    # the length-generalisation property: with max_distance D, a frame more than D frames back
    # reads the same whether it is D + 1 or D + 5000 frames back
    torch.manual_seed(seed)
    mem = memkit.FIFOMemory(2, 8, 4, frames=3)
    attn = memkit.MemoryAttention(16, 2, memory=mem, max_distance=4).eval()
    state = attn.init_state(1)
    for p in range(3):
        _, state = attn.forward_and_write(torch.randn(1, 4, 16), state, torch.tensor([[p]]))
    x = torch.randn(1, 4, 16)
    near = attn(x, state, torch.tensor([[10]]))  # frames 0..2 are 8..10 back: all beyond D = 4
    far = attn(x, state, torch.tensor([[10 + shift]]))
    torch.testing.assert_close(near, far, rtol=1e-5, atol=1e-5)
    # without the clamp the distance shows
    attn.max_distance = None
    assert not torch.allclose(attn(x, state, torch.tensor([[10]])), attn(x, state, torch.tensor([[10 + shift]])))


def test_max_distance_is_checked():
    with pytest.raises(ValueError, match="max_distance"):
        memkit.MemoryAttention(16, 2, max_distance=-1)
    with pytest.raises(TypeError, match="max_distance"):
        memkit.MemoryAttention(16, 2, max_distance=2.5)  # type: ignore[arg-type]


def test_scores_of_a_perfect_and_of_a_grey_generation():
    clip = sweep_clip(5, "pingpong", frames=16, places=8, frame_size=16, smooth=1.0)
    context, truth = clip.video[None, :8], clip.video[None, 8:]
    ids = clip.place_ids[None, 8:]
    perfect = score_frames(truth, truth, context, ids)
    assert perfect["recall"].all() and (perfect["ssim"] > 0.999).all() and (perfect["psnr"] > 90).all()
    grey = context.mean(dim=(1, 3, 4), keepdim=True).expand_as(truth)
    flat = score_frames(grey, truth, context, ids)
    assert (flat["psnr"] < 20).all() and (flat["ssim"] < 0.5).all()
    # a generation that shows the wrong places is recalled wrongly
    shifted = score_frames(truth.roll(1, dims=1), truth, context, ids)
    assert shifted["recall"].mean() < 0.5


def test_length_buckets_hold_the_frames_they_name():
    L, n = 4, 32
    values = np.tile(np.arange(n, dtype=np.float64), (2, 1))  # frame index as the score
    r = LongResult("x", L, values, values, None, np.ones((2, n), dtype=np.int64), ["a", "b"], ["procedural"] * 2)
    assert r.at(1) == np.mean(range(0, 4))
    assert r.at(2) == np.mean(range(4, 8))
    assert r.at(4) == np.mean(range(8, 16))
    assert r.at(8) == np.mean(range(16, 32))
    assert np.isnan(r.at(1, "recall"))
    assert np.isnan(r.at(4, photos=True))


def test_pose_positions_make_the_backbone_blind_to_time():
    # positions="pose": the rotary measures where the camera is, so the frame index a caller
    # passes (how long the video has run) changes nothing, at any length
    from memkit.models.malt import MALTConfig, MALTNetwork

    cfg = MALTConfig.preset("tiny", memory="fifo", action_dim=4, positions="pose")
    net = MALTNetwork(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adaLN-zero starts at a zero output: give every weight a value
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    clean = torch.randn(1, 2, 3, 8, 8, generator=g)
    acts = torch.rand(1, 2, 4, generator=g)
    x = torch.randn(1, 2, 3, 8, 8, generator=g)
    t = torch.full((1,), 0.5)

    def run(offset: int) -> torch.Tensor:
        states = net.write(clean, net.init_states(1), net.segment_positions(offset, 1), actions=acts)
        return net(x, t, states, net.segment_positions(offset + 1, 1), actions=acts)

    assert run(0).abs().max() > 1e-3
    torch.testing.assert_close(run(0), run(4000), rtol=0, atol=0)
    timed = MALTNetwork(cfg.replace(positions="time")).eval()
    timed.load_state_dict(net.state_dict())
    a = timed(x, t, timed.write(clean, timed.init_states(1), timed.segment_positions(0, 1), actions=acts),
              timed.segment_positions(1, 1), actions=acts)  # fmt: skip
    assert not torch.allclose(a, run(0))


def test_pose_positions_need_pose_actions():
    from memkit.models.malt import ConfigError, MALTConfig

    with pytest.raises(ConfigError, match="positions='pose' reads the camera pose"):
        MALTConfig.preset("tiny", positions="pose")
    with pytest.raises(ConfigError, match="positions must be 'time' or 'pose'"):
        MALTConfig.preset("tiny", action_dim=4, positions="space")
