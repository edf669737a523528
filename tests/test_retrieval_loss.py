"""The auxiliary retrieval loss of PromptBank layers (memkit.train.retrieval, TrainConfig.retrieval_weight)."""

import pytest
import torch

import memkit
from memkit.errors import ConfigError
from memkit.models.malt import FlowMatching, MALTNetwork
from memkit.train import TrainConfig
from memkit.train.data import build_world, make_batch
from memkit.train.retrieval import bank_precision, bank_retrieval_loss, collect_bank_keys, newest_prototype, same_prompt
from memkit.train.trainer import UnrolledLoss, _clip_seeds


def _scenes_config(**changes: object) -> TrainConfig:
    """A tiny model with a PromptBank on the scenes world (one frame a segment, 3 scenes a clip)."""
    tiny = TrainConfig.preset("tiny").model.to_dict()
    model = {
        **tiny,
        "frames_per_segment": 1,
        "prompt_dim": 8,
        "positions": "time",
        "memory": {"name": "prompt_bank", "kwargs": {"bank_frames": 2}},
    }
    data = {"world": "scenes", "kwargs": {"num_scenes": 3}, "pose_actions": True}
    return TrainConfig.preset("tiny", model=model, data=data, segments=6, batch_size=8, **changes)


def _batches(cfg: TrainConfig):  # type: ignore[no-untyped-def]
    world = build_world(cfg.data, cfg.model, cfg.segments)
    return lambda step: make_batch(world, cfg.data, cfg.model, _clip_seeds(cfg, step, 0, 1))


def _precision(net: MALTNetwork, batch: dict[str, torch.Tensor], segments: int) -> float:
    """In-network precision: each segment's projected prompt ranks the frames the banks wrote before it."""
    n = batch["video"].shape[0]
    states, written = net.init_states(n), []
    with torch.no_grad():
        for s in range(segments - 1):
            states = net.write(
                batch["video"][:, s],
                states,
                net.segment_positions(s, n),
                prompt=batch["prompt"][:, s],
                prompt_mask=batch["prompt_mask"][:, s],
                actions=batch["actions"][:, s],
            )
            written.append(states)
        assert net.prompt_proj is not None
        seen = net.prompt_proj(batch["prompt"])
        same = same_prompt(batch["prompt"], batch["prompt_mask"])
        return bank_precision(collect_bank_keys(net, written), seen, batch["prompt_mask"], same)


def test_loss_is_finite_and_trains_the_prompt_projection() -> None:
    cfg = _scenes_config()
    torch.manual_seed(0)
    net = MALTNetwork(cfg.model)
    batch = _batches(cfg)(0)
    for detach in (False, True):
        net.zero_grad(set_to_none=True)
        module = UnrolledLoss(net, FlowMatching(), retrieval_weight=1.0, retrieval_detach_keys=detach)
        loss = module(**batch, seed=0)
        assert loss.isfinite()
        assert module.last_retrieval is not None and 0.0 < module.last_retrieval < float("inf")
        # the retrieval term alone (weight 0 gives the flow-matching loss of the same draw)
        plain = UnrolledLoss(net, FlowMatching())(**batch, seed=0)
        torch.testing.assert_close(loss - plain, torch.tensor(module.last_retrieval), rtol=1e-4, atol=1e-5)
        net.zero_grad(set_to_none=True)
        module(**batch, seed=0).backward()
        proj = net.prompt_proj
        assert proj is not None and proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # without the option the prompt projection reaches the loss only through adaLN, never through the bank
    assert UnrolledLoss(net, FlowMatching()).retrieval_weight == 0.0


def test_detached_keys_leave_the_write_path_alone() -> None:
    """With detached keys only the prompt projection (and what feeds it) gets the retrieval gradient."""
    cfg = _scenes_config()
    torch.manual_seed(0)
    net = MALTNetwork(cfg.model)
    batch = _batches(cfg)(0)
    grads = {}
    for detach in (True, False):
        net.zero_grad(set_to_none=True)
        module = UnrolledLoss(net, FlowMatching(), retrieval_weight=1.0, retrieval_detach_keys=detach)
        plain = UnrolledLoss(net, FlowMatching())
        (module(**batch, seed=0) - plain(**batch, seed=0)).backward()  # the retrieval term's gradient
        qkv = net.block_list[0].attn.to_qkv.weight.grad
        grads[detach] = 0.0 if qkv is None else float(qkv.abs().max())
    assert grads[True] < 1e-6 < grads[False]


def test_a_few_steps_raise_the_in_network_precision() -> None:
    """A learning test: 15 steps of Adam on the tiny scenes model lift the banks' precision.

    Measured (seed 0, held-out clips): 0.33 before, 0.55 after 10 steps, 0.57 after 20
    (3 scenes; chance is about a third). The threshold asks for half of that gain.
    """
    cfg = _scenes_config()
    torch.manual_seed(0)
    net = MALTNetwork(cfg.model)
    batches = _batches(cfg)
    held_out = batches(10_000)
    before = _precision(net, held_out, cfg.segments)
    module = UnrolledLoss(net, FlowMatching(), retrieval_weight=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(15):
        loss = module(**batches(step), seed=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = _precision(net, held_out, cfg.segments)
    print(f"precision {before:.3f} -> {after:.3f}")
    assert after >= before + 0.1, (before, after)


def test_newest_prototype_and_precision_on_hand_made_keys() -> None:
    mem = memkit.PromptBankMemory(heads=1, head_dim=2, tokens_per_frame=1, bank_frames=1)
    state = mem.init_state(1)
    frames = [torch.tensor([4.0, 0.0]), torch.tensor([0.0, 4.0])]
    keys, oks = [], []
    for i, f in enumerate(frames):
        k = f.reshape(1, 1, 1, 2)
        state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 1, 2), torch.tensor([[i]]), 1))
        key, ok = newest_prototype(state)
        assert torch.equal(key, k) and ok.tolist() == [True]
        keys.append(key)
        oks.append(ok)
    banks = [(mem, torch.stack(keys, dim=2), torch.stack(oks, dim=1))]
    prompt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).reshape(1, 4, 1, 2)  # A B A B
    same = same_prompt(prompt)
    assert bank_precision(banks, prompt, None, same) == 1.0
    swapped = [(mem, banks[0][1].flip(2), banks[0][2])]
    assert bank_precision(swapped, prompt, None, same) == 0.0
    assert bank_retrieval_loss(banks, prompt, None, same) < bank_retrieval_loss(swapped, prompt, None, same)
    # nothing qualifies (every prompt the same): a zero loss that still has a graph
    flat = prompt[:, :1].expand(1, 4, 1, 2).clone().requires_grad_(True)
    zero = bank_retrieval_loss(banks, flat, None, same_prompt(flat))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf"), True, "1"])
def test_bad_retrieval_weight(weight: object) -> None:
    with pytest.raises(ConfigError, match="retrieval_weight"):
        TrainConfig.preset("tiny", retrieval_weight=weight)
