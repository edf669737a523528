"""GIFs play at the fps they say (issue 17, item 8): imageio's ``duration`` is in milliseconds."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("imageio")
Image = pytest.importorskip("PIL.Image")


def _durations(path: Path) -> list[int]:
    """Milliseconds per frame as a viewer reads them (Pillow, independent of memkit's writer)."""
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(int(im.info["duration"]))
        return out


@pytest.mark.parametrize("fps", [2, 4, 8, 10])
def test_the_generate_command_gif_plays_at_its_fps(tmp_path: Path, fps: int) -> None:
    from memkit.media import save_gif  # what the generate command writes its GIF with

    frames = torch.rand(5, 3, 8, 8) * 2 - 1
    save_gif(tmp_path / "video.gif", frames, fps=fps)
    # GIF stores centiseconds: 1000 / 8 = 125 ms is written as 120 or 130
    assert all(abs(d - 1000 / fps) <= 5 for d in _durations(tmp_path / "video.gif")), _durations(tmp_path / "video.gif")
    assert len(_durations(tmp_path / "video.gif")) == 5


def test_the_demo_gif_writer_plays_at_its_fps(tmp_path: Path) -> None:
    from memkit.media import save_gif

    path = save_gif(tmp_path / "demo.gif", torch.rand(3, 3, 8, 8) * 2 - 1, fps=4)
    assert _durations(path) == [250, 250, 250]


def test_no_writer_passes_seconds_as_imageio_duration() -> None:
    """Every ``duration=`` given to imageio in memkit is milliseconds (``1000 / fps``), never ``1 / fps``."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "memkit").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"duration\s*=\s*1(\.0*)?\s*/", line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, offenders
