"""Test set-up: shape checking on, deterministic hypothesis profile."""

import os

# must happen before memkit is imported: the switch is read at import time
os.environ.setdefault("MEMKIT_TYPECHECK", "1")

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "memkit",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("memkit")
torch.set_num_threads(1)
