"""Camera path families for the revisit world: a sweep over the canvas, then an excursion.

Every family here starts the same way: the camera sweeps once over the whole canvas, from
place 0 to place ``P - 1`` (``P`` frames, one per place). That sweep is the context a model
is given. What follows differs by family, and is what the model must generate; every frame
of it shows a place the sweep already showed, at some *revisit lag* (frames since that
place was last on screen).

Places lie on a grid: place ``i`` is the frame whose left edge is at ``x = i * step`` pixels,
so a path is a sequence of integer places, and two frames at the same place are identical.

Families used in training (:data:`TRAIN_PATHS`):

* ``"walk"``: a random walk: each frame moves 0, 1 or 2 places (pauses and speed changes),
  reversing at random and at the ends of the canvas.

Families used only for evaluation, never in training (:data:`EVAL_PATHS`):

* ``"pingpong"``: back and forth over the whole canvas at one place a frame (the trained
  out-and-back path, repeated: loops and forward motion over places already seen).
* ``"pauses"``: ``pingpong`` with pauses of 2 to 6 frames at random places, so timing and
  place disagree (a model that learnt a time offset instead of a place fails here).
* ``"fast"``: a random walk at 2 or 3 places a frame (3 is faster than any training clip).
* ``"dwell"``: a random walk kept to the right half of the canvas for the first 3/4 of the
  excursion, then ``pingpong`` over the whole canvas: the left half comes back after a lag
  as long as the clip (the long-lag family).
"""

from collections.abc import Callable

import numpy as np

from memkit.errors import DataError

__all__ = ["TRAIN_PATHS", "EVAL_PATHS", "PATH_FAMILIES", "sweep_path", "revisit_lags"]

#: Path families the training presets draw from.
TRAIN_PATHS: tuple[str, ...] = ("walk",)
#: Path families used only to evaluate (never seen in training).
EVAL_PATHS: tuple[str, ...] = ("pingpong", "pauses", "fast", "dwell")


def _walk(rng: np.random.Generator, places: int, frames: int, start: int, speeds: tuple[int, ...]) -> list[int]:
    out, at, direction = [], start, -1
    for _ in range(frames):
        if rng.uniform() < 0.25:
            direction = -direction
        step = int(rng.choice(speeds))
        nxt = at + direction * step
        if nxt < 0 or nxt >= places:  # bounce off the canvas's ends
            direction = -direction
            nxt = min(places - 1, max(0, at + direction * step))
        at = nxt
        out.append(at)
    return out


def _pingpong(places: int, frames: int, start: int) -> list[int]:
    if places == 1:
        return [0] * frames
    period = 2 * (places - 1)
    # a triangle wave through 0 .. P-1 and back, continued from where the sweep ended
    return [(places - 1) - abs((start + k + 1) % period - (places - 1)) for k in range(frames)]


def _pauses(rng: np.random.Generator, places: int, frames: int, start: int) -> list[int]:
    base = _pingpong(places, frames, start)
    out: list[int] = []
    k = 0
    while len(out) < frames:
        out.append(base[k])
        if rng.uniform() < 0.2:
            out.extend([base[k]] * int(rng.integers(2, 7)))
        k += 1
    return out[:frames]


def _dwell(rng: np.random.Generator, places: int, frames: int, start: int) -> list[int]:
    half = places // 2
    stay = (3 * frames) // 4
    right = [half + p for p in _walk(rng, places - half, stay, start - half, (0, 1, 1, 2))]
    return right + _pingpong(places, frames - stay, right[-1] if right else start)


_FAMILIES: dict[str, Callable[[np.random.Generator, int, int, int], list[int]]] = {
    "walk": lambda rng, p, n, s: _walk(rng, p, n, s, (0, 1, 1, 1, 2)),
    "pingpong": lambda rng, p, n, s: _pingpong(p, n, s),
    "pauses": _pauses,
    "fast": lambda rng, p, n, s: _walk(rng, p, n, s, (2, 3)),
    "dwell": _dwell,
}
#: Every family name: :data:`TRAIN_PATHS` + :data:`EVAL_PATHS`.
PATH_FAMILIES: tuple[str, ...] = TRAIN_PATHS + EVAL_PATHS


def sweep_path(family: str, places: int, frames: int, seed: int) -> np.ndarray:
    """Places visited by a clip of ``frames`` frames: the sweep ``0 .. P-1``, then ``family``.

    Args:
        family: a name from :data:`PATH_FAMILIES`.
        places: ``P``, places on the canvas (the sweep's length), at least 2.
        frames: total frames, at least ``P``.
        seed: the same seed gives the same path.

    Returns:
        ``(frames,)`` int64 array of places in ``[0, P)``.

    Example:
        >>> from memkit.data.paths import sweep_path
        >>> sweep_path("pingpong", places=4, frames=10, seed=0).tolist()
        [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
        >>> bool((sweep_path("walk", 8, 40, seed=1)[:8] == range(8)).all())
        True
    """
    if family not in _FAMILIES:
        raise DataError(f"sweep_path: unknown path family {family!r}; expected one of {', '.join(PATH_FAMILIES)}")
    if isinstance(places, bool) or not isinstance(places, int) or places < 2:
        raise DataError(f"sweep_path: places must be an int >= 2, got {places!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < places:
        raise DataError(
            f"sweep_path: frames must be an int >= places ({places}): the sweep comes first, got {frames!r}"
        )
    rng = np.random.default_rng(seed)
    sweep = list(range(places))
    rest = _FAMILIES[family](rng, places, frames - places, places - 1)
    return np.asarray(sweep + rest, dtype=np.int64)


def revisit_lags(places: np.ndarray) -> np.ndarray:
    """Frames since each frame's place was last on screen (``-1`` for a first visit).

    Example:
        >>> from memkit.data.paths import revisit_lags
        >>> revisit_lags(np.array([0, 1, 2, 1, 1, 0])).tolist()
        [-1, -1, -1, 2, 1, 5]
    """
    last: dict[int, int] = {}
    lags = np.full(len(places), -1, dtype=np.int64)
    for i, p in enumerate(np.asarray(places).tolist()):
        if p in last:
            lags[i] = i - last[p]
        last[p] = i
    return lags
