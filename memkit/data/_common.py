"""Small helpers shared by the data worlds: argument checks, seeds, prompts."""

import zlib

import numpy as np
import torch
from torch import Tensor

from memkit.errors import DataError

FrameSize = int | tuple[int, int]


def check_int(owner: str, name: str, value: object, *, minimum: int = 1) -> int:
    """Refuse anything that is not an int of at least ``minimum`` (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_seed(owner: str, seed: object) -> int:
    return check_int(owner, "seed", seed, minimum=0)


def frame_hw(owner: str, frame_size: object) -> tuple[int, int]:
    """``frame_size`` as ``(height, width)``: an int means a square frame."""
    if isinstance(frame_size, tuple | list) and len(frame_size) == 2:
        return check_int(owner, "frame height", frame_size[0]), check_int(owner, "frame width", frame_size[1])
    if isinstance(frame_size, int | np.integer) and not isinstance(frame_size, bool):
        size = check_int(owner, "frame_size", frame_size)
        return size, size
    raise DataError(f"{owner}: frame_size must be an int or a (height, width) pair, got {frame_size!r}")


def child_seed(*parts: int) -> int:
    """A well-mixed seed from several non-negative ints (dataset seed, index, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def name_seed(name: str) -> int:
    """A seed from a name that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(name.encode("utf-8"))


def random_prompt(seed: int, tokens: int = 8, dim: int = 16) -> tuple[Tensor, Tensor]:
    """A deterministic stand-in prompt embedding with some padding, as a text encoder would give.

    The number of real tokens is drawn from ``[max(1, tokens // 2), tokens - 1]`` (so a prompt of
    more than one token always ends in at least one padding token); padding rows are zero.

    Args:
        seed: non-negative int; the same seed gives the same prompt.
        tokens: ``p``, prompt length including padding.
        dim: ``e``, embedding size.

    Returns:
        ``prompt (p e)`` float32 with unit-variance real rows, and ``mask (p)`` bool, True for
        real tokens.

    Example:
        >>> from memkit.data import random_prompt
        >>> prompt, mask = random_prompt(0, tokens=6, dim=4)
        >>> prompt.shape, mask.shape, bool(mask[0]), bool(mask[-1])
        (torch.Size([6, 4]), torch.Size([6]), True, False)
        >>> bool((prompt[~mask] == 0).all())
        True
    """
    seed = check_seed("random_prompt", seed)
    tokens = check_int("random_prompt", "tokens", tokens)
    dim = check_int("random_prompt", "dim", dim)
    rng = np.random.default_rng([seed, 0x9E3779B9])
    real = tokens if tokens == 1 else int(rng.integers(max(1, tokens // 2), tokens))
    mask = np.arange(tokens) < real
    prompt = rng.standard_normal((tokens, dim)) * mask[:, None]
    return torch.from_numpy(prompt.astype(np.float32)), torch.from_numpy(mask)
