"""Two streams in one process (two states, two threads) never affect each other's output."""

import threading

import torch

import memkit
from memkit.models import TinySegmentModel


def stream(model, seed, segments=6):
    states = model.init_states(1)
    outs = []
    with torch.no_grad():
        for s in range(segments):
            x = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(seed * 1000 + s))
            y, states = model(x, states, torch.tensor([[2 * s, 2 * s + 1]]), write=True)
            outs.append(y)
    return outs


def test_two_threads_match_running_alone():
    torch.manual_seed(0)
    model = TinySegmentModel(
        4, 4, tokens_per_frame=2, dim=16, heads=2, memory=lambda i: memkit.SinkWindowMemory(2, 8, 2, window_frames=3)
    ).eval()
    alone = {seed: stream(model, seed) for seed in (1, 2)}
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            for _ in range(5):  # repeat so the threads really interleave
                results[seed] = stream(model, seed)
        except BaseException as err:  # surfaced below: a thread's exception would be lost
            errors.append(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in (1, 2):
        for a, b in zip(alone[seed], results[seed], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(alone[1][-1], alone[2][-1])
