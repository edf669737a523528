"""torch.compile of read + attend (issue 15 item 4): the compiled layer gives what the eager one gives."""

import torch

import memkit


def test_a_compiled_read_attend_matches_the_eager_layer_through_a_plan_and_a_state() -> None:
    torch.manual_seed(0)
    mem = memkit.compose(
        memkit.PromptBankMemory(2, 8, 2, bank_frames=2), memkit.SparseKVMemory(2, 8, 2, capacity=4, top_k=2)
    )
    eager = memkit.MemoryAttention(16, 2, mem).eval()
    compiled = memkit.MemoryAttention(16, 2, mem).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_read_attend(backend="eager")  # dynamo's full graph without a C++ build: fast in a unit test
    state = eager.init_state(1)
    prompt = torch.randn(1, 3, 16)
    with torch.no_grad():
        for s in range(4):
            x, pos = torch.randn(1, 4, 16), torch.tensor([[2 * s, 2 * s + 1]])
            _, state = eager.forward_and_write(x, state, pos, prompt)
        pos = torch.tensor([[8, 9]])
        for plan_or_state in (state, eager.plan(state, pos, 2, prompt)):
            x = torch.randn(1, 4, 16)
            assert torch.allclose(compiled(x, plan_or_state, pos, prompt), eager(x, plan_or_state, pos, prompt))
