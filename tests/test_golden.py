"""Outputs of every memory and of the bundled checkpoints stay what they were recorded as.

The recording (``tests/golden/outputs.safetensors``, made by ``python tests/golden.py
--record``; see :mod:`golden` for the cases) holds each registered memory's and a few
compositions' reads (a Context's keys, values, positions and mask) and states after every
write, on fixed seeds, and the clip that each bundled checkpoint (``memkit/assets/demo-*``)
generates from the reference backbone. A refactor must leave all of it unchanged.

Bit-identical (``torch.equal``) is the check on the platform the recording was made on
(``tests/golden/platform.json``: torch build, machine, CPU capability). On another platform
(a CI machine with another CPU, another torch) float results may differ in rounding only,
so there every float tensor must agree within 1e-6 of its largest magnitude, and integer
and bool tensors (positions, masks) must still be equal.

A deliberate change of behaviour re-records (``python tests/golden.py --record``) and says
in its commit which entries changed and why (``python tests/golden.py --diff`` lists them).
"""

import golden  # tests/golden.py (this folder is on sys.path for its conftest)
import pytest
import torch

RECORDED, FINGERPRINT = golden.load()
EXACT = FINGERPRINT == golden.platform_fingerprint()


def _recorded(prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in RECORDED.items() if k.startswith(prefix + "/")}


@pytest.mark.parametrize("case", sorted(golden.cases()))
def test_outputs_unchanged(case: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = golden.cases()[case]()
    finally:
        torch.set_num_threads(threads)
    want = _recorded(case)
    assert want, f"{case} was never recorded: run python tests/golden.py --record"
    problems = [f"missing output: {k}" for k in want if k not in got]
    problems += [f"output not recorded: {k}" for k in got if k not in want]
    problems += [
        d for k in want if k in got and (d := golden.difference(k, want[k], got[k].detach().cpu(), EXACT)) is not None
    ]
    assert not problems, f"{len(problems)} outputs differ ({'exact' if EXACT else 'tolerance'} check):\n" + "\n".join(
        problems[:20]
    )


def test_every_recorded_case_still_runs() -> None:
    cases = set(golden.cases())
    stale = {k for k in RECORDED if not any(k.startswith(c + "/") for c in cases)}
    assert not stale, f"recorded outputs no case produces: {sorted(stale)[:5]}"


def test_check_can_fail() -> None:
    """A change in the last bit of one float fails the exact check; 1e-3 fails the tolerance too."""
    want = RECORDED["clip/sparse_kv/video"]
    bumped = want.clone()
    bumped.view(-1)[0] = torch.nextafter(bumped.view(-1)[0], torch.tensor(float("inf")))
    assert golden.difference("x", want, bumped, exact=True) is not None
    assert golden.difference("x", want, bumped, exact=False) is None
    assert golden.difference("x", want, want + 1e-3 * want.abs().max(), exact=False) is not None
