"""A ``torch.utils.data.Dataset`` over the synthetic worlds, deterministic by index."""

from typing import Protocol, runtime_checkable

from torch import Tensor
from torch.utils.data import Dataset

from memkit.data._common import check_int, check_seed, child_seed
from memkit.errors import DataError

__all__ = ["World", "WorldDataset"]


@runtime_checkable
class World(Protocol):
    """Anything that turns a seed into a training sample.

    ``sample(seed)`` returns a dict with ``video (S F c h w)`` float32 in ``[-1, 1]``,
    ``actions (S F 2)`` float32, ``prompt (S p e)`` float32 and ``prompt_mask (S p)`` bool,
    and must return the same sample for the same seed. :class:`memkit.data.RevisitWorld`
    and :class:`memkit.data.SceneWorld` are worlds.
    """

    def sample(self, seed: int) -> dict[str, Tensor]: ...


class WorldDataset(Dataset[dict[str, Tensor]]):
    """``length`` samples of a world; item ``i`` is always the same sample.

    Item ``i`` is ``world.sample(s)`` with ``s`` mixed from ``(seed, i)``, so two datasets
    with different seeds (say, training and validation) share no clips, and shuffling,
    worker count or resuming never change what index ``i`` holds. The default collate
    stacks items into ``video (B S F c h w)``, ``actions (B S F 2)``,
    ``prompt (B S p e)`` and ``prompt_mask (B S p)``.

    Args:
        world: a :class:`World` (e.g. :class:`memkit.data.RevisitWorld`).
        length: number of items.
        seed: non-negative int choosing the set of clips.

    Example:
        >>> import torch
        >>> from memkit.data import SceneWorld, WorldDataset
        >>> data = WorldDataset(SceneWorld(frames_per_segment=2, segments=3, frame_size=8), length=4, seed=1)
        >>> batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
        >>> {key: tuple(value.shape) for key, value in batch.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'video': (2, 3, 2, 3, 8, 8), 'actions': (2, 3, 2, 2), 'prompt': (2, 3, 8, 16),
         'prompt_mask': (2, 3, 8)}
        >>> first, again = data[3], data[3]
        >>> all(torch.equal(first.get(key), again.get(key)) for key in first)
        True
    """

    def __init__(self, world: World, length: int, seed: int = 0) -> None:
        if not isinstance(world, World):
            raise DataError(f"WorldDataset: world must have a sample(seed) method, got {type(world).__name__}")
        self.world = world
        self.length = check_int("WorldDataset", "length", length)
        self.seed = check_seed("WorldDataset", seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"WorldDataset: index {index} out of range for {self.length} items")
        return self.world.sample(child_seed(self.seed, index % self.length))

    def __repr__(self) -> str:
        return f"WorldDataset({self.world!r}, length={self.length}, seed={self.seed})"
