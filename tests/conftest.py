"""Test set-up: shape checking on, hypothesis profiles, and the mutation run's hook.

Hypothesis profiles (``HYPOTHESIS_PROFILE`` picks one; otherwise ``ci`` when the ``CI``
environment variable is set, else ``dev``):

- ``ci``: derandomised, 40 examples: the same cases on every run, so a red build is reproducible.
- ``dev``: random, 60 examples, failures kept in ``.hypothesis/`` and replayed first: local runs
  keep exploring new cases.
- ``nightly``: random, 500 examples (``make nightly``).

Tests that set ``max_examples`` themselves keep their count; the profile still decides randomness.

``MEMKIT_MUTANT=<name>`` applies a known bug from ``tests/mutants.py`` before any test runs
(``make mutants`` runs the suite's relevant files once per mutant and expects each to fail).
"""

import os

# must happen before memkit is imported: the switch is read at import time
os.environ.setdefault("MEMKIT_TYPECHECK", "1")

import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=60, derandomize=False, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=500, derandomize=False, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
torch.set_num_threads(1)

if os.environ.get("MEMKIT_MUTANT"):
    import mutants  # tests/mutants.py: this folder is on sys.path for its conftest

    mutants.apply(os.environ["MEMKIT_MUTANT"])
