"""Writing videos for people to look at: animated GIFs (imageio, the ``video`` extra)."""

from pathlib import Path
from typing import Any

from memkit.errors import MemkitError

__all__ = ["save_gif", "gif_durations"]


def save_gif(path: str | Path, frames: Any, fps: float, scale: int = 4) -> Path:
    """Write ``frames (T C H W)`` in ``[-1, 1]`` as a looping GIF that plays at ``fps``.

    Every pixel becomes a ``scale x scale`` block (nearest neighbour), so 16-pixel frames
    are big enough to see. imageio's ``duration`` is in milliseconds per frame.

    Example:
        >>> import tempfile, torch
        >>> from memkit.media import save_gif, gif_durations
        >>> path = save_gif(tempfile.mkdtemp() + "/clip.gif", torch.rand(3, 3, 8, 8) * 2 - 1, fps=4)
        >>> gif_durations(path)
        [250, 250, 250]
    """
    try:
        import imageio.v2 as imageio
    except ImportError as err:
        raise MemkitError("writing GIFs needs imageio: pip install 'memkit-video[video]'") from err
    import numpy as np
    import torch

    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    x = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (T C H W)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).permute(0, 2, 3, 1).numpy()
    path = Path(path)
    imageio.mimsave(str(path), list(np.ascontiguousarray(x)), duration=1000.0 / fps, loop=0)
    return path


def gif_durations(path: str | Path) -> list[int]:
    """Milliseconds each frame of a GIF is shown, as a viewer reads them (Pillow)."""
    from PIL import Image

    with Image.open(path) as im:
        out = []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            out.append(int(im.info.get("duration", 0)))
        return out
