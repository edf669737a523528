"""The mutation run's bugs still apply: every patch target exists, applies, and is undone.

The run itself (every mutant against its tests) is ``make mutants``; see tests/mutants.py.
"""

import re
from pathlib import Path

import pytest
import torch
from mutants import BY_NAME, MUTANTS, applied, resolve

import memkit

ROOT = Path(__file__).resolve().parents[1]


def test_names_are_unique_and_tests_exist() -> None:
    assert len(BY_NAME) == len(MUTANTS)
    for m in MUTANTS:
        assert re.fullmatch(r"[a-z0-9-]+", m.name), m.name
        assert m.tests, m.name
        for test in m.tests:
            path = ROOT / test.split("::")[0]
            assert path.is_file(), f"{m.name}: {path} does not exist"
            if "::" in test:
                function = test.split("::")[1].split("[")[0]
                assert f"def {function}(" in path.read_text(encoding="utf-8"), f"{m.name}: no {test}"


@pytest.mark.parametrize("name", list(BY_NAME))
def test_each_patch_applies_and_is_undone(name: str) -> None:
    originals = [resolve(target)[2] for target, _ in BY_NAME[name].patches]
    with applied(name):
        for (target, _), original in zip(BY_NAME[name].patches, originals, strict=True):
            assert resolve(target)[2] is not original, f"{target} was not replaced"
    for (target, _), original in zip(BY_NAME[name].patches, originals, strict=True):
        assert resolve(target)[2] is original, f"{target} was not restored"


def test_a_mutant_changes_behaviour_while_applied() -> None:
    k = torch.full((1, 1, 2, 2), float("nan"))
    args = (k, k, torch.zeros(1, 2, 2), torch.tensor([[0]]), 2)
    with applied("chunk-accepts-non-finite"):
        memkit.Chunk(*args)  # the bug: accepted
    with pytest.raises(memkit.NonFiniteError):
        memkit.Chunk(*args)
    q = torch.randn(1, 1, 3, 8) * 1000
    with applied("lse-without-max"):
        assert not torch.isfinite(memkit.attend(q, q, q, backend="math")).all()
    assert torch.isfinite(memkit.attend(q, q, q, backend="math")).all()
