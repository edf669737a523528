"""The MALT backbone: learning, bounded memory over long rollouts, determinism, checkpoints."""

import pytest
import torch

import memkit
from memkit.models.malt import (
    EulerSampler,
    FlowMatching,
    MALTConfig,
    MALTNetwork,
    generate,
    memory_names,
    stream,
)
from memkit.train import TrainConfig, UnrolledLoss, make_batch
from memkit.train.data import build_world

BOUNDED = {
    "none": {},
    "fifo": {"frames": 4},
    "sink_window": {"sink_frames": 1, "window_frames": 3},
    "sparse_kv": {"capacity": 6, "top_k": 2},
    "recurrent": {"slots": 4},
    "prompt_bank": {},
}


def _tiny(memory: str = "fifo", **changes: object) -> MALTNetwork:
    torch.manual_seed(0)
    kwargs = BOUNDED.get(memory, {})
    return MALTNetwork(MALTConfig.preset("tiny", memory={"name": memory, "kwargs": kwargs}, **changes))


def _randomise(net: MALTNetwork) -> MALTNetwork:
    """Give the zero-initialised (adaLN-Zero) layers weights, so every path matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _segment_2_loss(net: MALTNetwork, batch: dict[str, torch.Tensor], shift: int = 0) -> float:
    """Mean flow-matching loss of segment 2 after writing clean segment 1, over 8 noise draws.

    ``shift`` hands each clip the memory of the clip ``shift`` places further on in the batch
    (content-blind: the same weights, a real memory, the wrong clip's).
    """
    flow = FlowMatching(time_sampling="uniform")
    video, actions = batch["video"], batch["actions"]
    b = video.shape[0]
    states = net.write(video[:, 0], net.init_states(b), net.segment_positions(0, b), actions=actions[:, 0])
    order = torch.roll(torch.arange(b), shift)
    states = memkit.map_tensors(lambda x: x[order], states)
    losses = []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        t, noise = torch.rand(b, generator=g), torch.randn(video[:, 1].shape, generator=g)
        v = net(flow.interpolate(video[:, 1], noise, t), t, states, net.segment_positions(1, b), actions=actions[:, 1])
        losses.append(flow.loss(v, video[:, 1], noise).item())
    return sum(losses) / len(losses)


def test_fits_four_short_clips_and_uses_its_memory() -> None:
    """A tiny model with memory fits four 2-segment clips, and segment 2 needs segment 1's memory.

    Measured (one batch of 4 different clips, uniform noise levels, Adam 3e-3, 100 steps): the
    mean loss of the first 10 steps is ~1.27 and of steps 90-100 ~0.81, not zero (at small ``t``
    the velocity target ``eps - x_0`` needs ``eps = (x_t - (1 - t) x_0) / t``, which a small
    network only approximates). Four clips, not one copied: the weights alone can fit a single
    clip, memory or not. After training, segment 2's loss is 0.807 with its own clip's memory
    and 0.877 with another clip's (0.858 and 0.928 on clips 1-4); a memory that returns nothing
    leaves no gap. Thresholds: the loss falls by a quarter; the gap is at least 0.03.
    """
    cfg = TrainConfig.preset("tiny")
    net = _tiny("fifo", action_dim=4)
    world = build_world(cfg.data, cfg.model, 2)
    batch = make_batch(world, cfg.data, cfg.model, [7, 8, 9, 10])
    loss_fn = UnrolledLoss(net, FlowMatching(time_sampling="uniform"), write_noise=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for step in range(100):
        loss = loss_fn(**batch, seed=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert first > 0.9, first
    assert last < 0.75 * first, f"loss {first:.3f} -> {last:.3f}"
    with torch.no_grad():
        own, other = _segment_2_loss(net.eval(), batch), _segment_2_loss(net, batch, shift=1)
    print(f"loss {first:.3f} -> {last:.3f}; segment 2 with its own memory {own:.3f}, with another clip's {other:.3f}")
    assert other - own >= 0.03, (own, other)


@pytest.mark.parametrize("memory", [m for m in BOUNDED if m in memory_names()])
def test_100_segments_finite_and_constant_state(memory: str) -> None:
    net = _randomise(_tiny(memory)).eval()
    sizes = []
    frames = []
    for seg in stream(net, 100, sampler=EulerSampler(steps=1), seed=0):
        sizes.append(memkit.state_nbytes(seg.states))
        frames.append(seg.latents)
    video = torch.cat(frames, dim=1)
    assert video.shape == (1, 200, 3, 8, 8)
    assert torch.isfinite(video).all()
    assert len(set(sizes)) == 1, f"state size changed: {sorted(set(sizes))}"


def test_same_seed_same_video_bit_for_bit() -> None:
    net = _randomise(_tiny("sparse_kv" if "sparse_kv" in memory_names() else "fifo")).eval()
    a = generate(net, 4, sampler=EulerSampler(steps=2), seed=3).video
    b = generate(net, 4, sampler=EulerSampler(steps=2), seed=3).video
    c = generate(net, 4, sampler=EulerSampler(steps=2), seed=4).video
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_checkpoint_round_trip_generates_the_same(tmp_path) -> None:
    net = _randomise(_tiny("fifo", action_dim=4, prompt_dim=6)).eval()
    actions = torch.randn(1, 10, 4)
    prompt, mask = torch.randn(1, 3, 6), torch.tensor([[True, True, False]])
    kwargs = dict(actions=actions, prompt=prompt, prompt_mask=mask, sampler=EulerSampler(steps=2, cfg_scale=2.0))
    context = torch.rand(1, 4, 3, 8, 8) * 2 - 1
    before = generate(net, 3, context=context, seed=1, **kwargs).video
    net.save_pretrained(tmp_path / "ckpt")
    loaded = MALTNetwork.from_pretrained(tmp_path / "ckpt")
    after = generate(loaded, 3, context=context, seed=1, **kwargs).video
    assert torch.equal(before, after)


def test_context_is_remembered_and_positions_continue() -> None:
    """With a memory, the generated segment depends on the context; without, it does not."""
    ctx_a, ctx_b = torch.rand(1, 4, 3, 8, 8), -torch.rand(1, 4, 3, 8, 8)
    with_mem = _randomise(_tiny("fifo")).eval()
    without = with_mem.with_memory("none")
    run = lambda n, c: generate(n, 1, context=c, sampler=EulerSampler(steps=2), seed=0).video  # noqa: E731
    assert not torch.equal(run(with_mem, ctx_a), run(with_mem, ctx_b))
    assert torch.equal(run(without, ctx_a), run(without, ctx_b))
    seg = list(stream(with_mem, 1, context=ctx_a, sampler=EulerSampler(steps=1), start_segment=5))
    assert [s.index for s in seg] == [5, 6, 7] and [s.generated for s in seg] == [False, False, True]


@pytest.mark.parametrize("memory", ["fifo", "recurrent", "none"])
def test_fused_training_pass_equals_separate_calls(memory: str) -> None:
    assert memory in memory_names()
    net = _randomise(_tiny(memory, action_dim=4, prompt_dim=6)).eval()
    video, actions = torch.randn(2, 3, 2, 3, 8, 8), torch.randn(2, 3, 2, 4)
    prompt, mask = torch.randn(2, 3, 4, 6), torch.ones(2, 3, 4, dtype=torch.bool)
    losses = [
        UnrolledLoss(net, FlowMatching(), prompt_dropout=0.5, fused=fused)(video, actions, prompt, mask, seed=0)
        for fused in (True, False)
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_cross_attention_prompt_and_guidance() -> None:
    net = _randomise(_tiny("fifo", prompt_dim=6, prompt_mode="cross")).eval()
    prompt = torch.randn(1, 3, 6)
    a = generate(net, 2, prompt=prompt, sampler=EulerSampler(steps=2, cfg_scale=1.0), seed=0).video
    b = generate(net, 2, prompt=prompt, sampler=EulerSampler(steps=2, cfg_scale=3.0), seed=0).video
    assert torch.isfinite(b).all() and not torch.equal(a, b)


def test_shape_errors_name_the_dimension() -> None:
    net = _tiny("fifo")
    states = net.init_states(1)
    with pytest.raises(memkit.ShapeError, match="dimension F should be 2, got 3"):
        net(torch.randn(1, 3, 3, 8, 8), torch.ones(1), states, net.segment_positions(0, 1))
    with pytest.raises(memkit.ShapeError, match="actions"):
        _tiny("fifo", action_dim=4)(torch.randn(1, 2, 3, 8, 8), torch.ones(1), states, net.segment_positions(0, 1))
    with pytest.raises(memkit.MemkitError, match="unknown memory 'nope'"):
        _tiny("nope")


def test_euler_sampler_lands_on_the_clean_sample_of_an_exact_velocity() -> None:
    """Sign and time convention of the sampler: for a single data point ``x0`` the exact flow is
    ``v(x, t) = (x - x0) / t``; any number of Euler steps from noise must end on ``x0``."""
    x0 = torch.rand(2, 2, 3, 8, 8) * 2 - 1

    class Exact:
        def __call__(self, x: torch.Tensor, t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return (x - x0) / t.reshape(-1, 1, 1, 1, 1)

    for steps in (1, 3, 8):
        out = EulerSampler(steps=steps).sample(Exact(), torch.randn_like(x0), (), torch.zeros(2, 2))  # type: ignore[arg-type]
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_x0_prediction_returns_the_velocity_of_its_clean_estimate() -> None:
    """``prediction="x0"``: the head's output is the clean segment and forward returns
    ``(x_t - x0_hat) / t``, so ``x_t - t v`` gives the head's output back (for t >= 0.05)
    and one Euler step from t = 1 returns it."""
    net_v = _randomise(_tiny("fifo"))
    net_x = MALTNetwork(net_v.config.replace(prediction="x0"))
    net_x.load_state_dict(net_v.state_dict())
    assert MALTConfig.from_dict(net_x.config.to_dict()).prediction == "x0"
    x, states, pos = torch.randn(2, 2, 3, 8, 8), net_v.init_states(2), net_v.segment_positions(1, 2)
    t = torch.tensor([1.0, 0.3])
    head = net_v(x, t, states, pos)  # the same weights read as a velocity: the raw head output
    v = net_x(x, t, states, pos)
    torch.testing.assert_close(FlowMatching().predict_x0(x, v, t), head, atol=1e-5, rtol=1e-5)
    one_step = EulerSampler(steps=1).sample(net_x, x, states, pos)
    torch.testing.assert_close(one_step, net_v(x, torch.ones(2), states, pos), atol=1e-5, rtol=1e-5)
    with pytest.raises(memkit.errors.MemkitError, match="prediction must be"):
        MALTConfig.preset("tiny", prediction="eps")


def test_generation_can_write_memory_at_a_small_noise_level() -> None:
    from memkit.models.malt import EulerSampler, MALTConfig, MALTNetwork, stream

    torch.manual_seed(0)
    net = MALTNetwork(MALTConfig.preset("tiny", memory="fifo")).eval()
    sampler = EulerSampler(steps=2, write_noise=0.2)
    seg = next(stream(net, 1, sampler=sampler, seed=3))
    # by hand: the sampling noise, then the write noise, from the same generator
    g = torch.Generator().manual_seed(3)
    c = net.config
    shape = (1, c.frames_per_segment, c.channels, c.height, c.width)
    states, pos = net.init_states(1), net.segment_positions(0, 1)
    with torch.no_grad():
        x = sampler.sample(net, torch.randn(shape, generator=g), states, pos)
        t_w = torch.full((1,), 0.2)
        expected = net.write(sampler.flow.interpolate(x, torch.randn(shape, generator=g), t_w), states, pos, t=t_w)
        clean = net.write(x, states, pos)
    assert torch.equal(seg.latents, x)
    leaves = torch.utils._pytree.tree_leaves
    assert all(torch.equal(a, b) for a, b in zip(leaves(seg.states), leaves(expected), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(leaves(seg.states), leaves(clean), strict=True))
    with pytest.raises(ValueError, match="write_noise must lie in"):
        EulerSampler(write_noise=1.0)


def test_layer_text_keys_reach_each_prompt_bank_as_that_layers_cross_attention_keys() -> None:
    from memkit.errors import ConfigError
    from memkit.models.malt import MALTConfig, MALTNetwork

    cfg = MALTConfig.preset("tiny", memory="prompt_bank", prompt_dim=6, prompt_mode="cross", memory_text_keys="layer")
    torch.manual_seed(0)
    net = MALTNetwork(cfg).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(net.blocks):
        mem = block.attn.memory
        original = mem.read

        def spy(state, query, i=i, original=original):  # type: ignore[no-untyped-def]
            seen[i] = query.prompt
            return original(state, query)

        mem.read = spy  # type: ignore[method-assign]
    prompt = torch.randn(1, 5, 6)
    x = torch.randn(1, cfg.frames_per_segment, cfg.channels, cfg.height, cfg.width)
    with torch.no_grad():
        net(x, torch.full((1,), 0.5), net.init_states(1), net.segment_positions(0, 1), prompt=prompt)
        tokens = net.prompt_proj(prompt)
        for i, block in enumerate(net.blocks):
            torch.testing.assert_close(seen[i], block.cross.to_kv(tokens)[..., : cfg.dim])
    assert not torch.allclose(seen[0], seen[1])  # each layer scores with its own keys
    with pytest.raises(ConfigError, match="needs prompt_mode='cross'"):
        MALTConfig.preset("tiny", prompt_dim=6, memory_text_keys="layer")


@pytest.mark.parametrize(
    "memory",
    [
        {"name": "sink_window", "kwargs": {"sink_frames": 1, "window_frames": 2}},
        {"name": "sparse_kv", "kwargs": {"capacity": 4, "top_k": 2, "always_frames": 1}},
    ],
)
def test_the_clean_pass_through_plans_writes_the_same_states(memory) -> None:
    """``write`` through the segment's read plans (as ``stream`` does) writes what ``write`` through the states
    writes, bit for bit, and hands back states (not plans); the last block only writes."""
    torch.manual_seed(0)
    net = MALTNetwork(MALTConfig.preset("tiny", memory=memory)).eval()
    states = net.init_states(1)
    with torch.no_grad():
        for s in range(3):
            states = net.write(torch.randn(1, 2, 3, 8, 8), states, net.segment_positions(s, 1))
        pos, x = net.segment_positions(3, 1), torch.randn(1, 2, 3, 8, 8)
        plans = net.plan_reads(states, pos)
        through_plans = net.write(x, plans, pos)
        through_states = net.write(x, states, pos)
    assert not any(isinstance(s, memkit.layers.LayerPlan) for s in through_plans)
    got, want = torch.utils._pytree.tree_leaves(through_plans), torch.utils._pytree.tree_leaves(through_states)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got, torch.utils._pytree.tree_leaves(states), strict=True))
