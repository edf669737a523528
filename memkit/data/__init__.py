"""Data for training and testing memories: synthetic worlds and a loader for your own latents.

* the ``revisit`` world (:mod:`memkit.data.revisit`): a camera pans over a wide canvas and
  comes back; returning frames must match what was shown before (its canvases, camera and
  rendering in :mod:`memkit.data.canvas`, :mod:`memkit.data.camera`, :mod:`memkit.data.render`);
* the ``scenes`` world (:mod:`memkit.data.scenes`): prompts switch between scenes and a
  scene's content must come back with its prompt;
* :class:`WorldDataset`: either world as a ``torch.utils.data.Dataset``;
* :class:`LatentDataset`: ``(b t c h w)`` latents on disk, cut into segments.

Everything is deterministic by seed and nothing is downloaded. The package imports only
torch, numpy and memkit.errors (scikit-image, for photo canvases, lazily).
"""

from memkit.data._common import random_prompt
from memkit.data.dataset import World, WorldDataset
from memkit.data.latents import LATENT_SUFFIXES, LatentDataset
from memkit.data.paths import EVAL_PATHS, PATH_FAMILIES, TRAIN_PATHS, revisit_lags, sweep_path
from memkit.data.revisit import (
    PHOTOS,
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    RevisitClip,
    RevisitWorld,
    camera_actions,
    find_revisits,
    load_photo,
    make_canvas,
    pan_path,
    photo_canvas,
    render,
    revisit_clip,
    sweep_clip,
)
from memkit.data.scenes import SceneClip, SceneWorld, scene_clip, scene_sequence

__all__ = [
    "PHOTOS",
    "TRAIN_PHOTOS",
    "TEST_PHOTOS",
    "make_canvas",
    "load_photo",
    "photo_canvas",
    "pan_path",
    "render",
    "camera_actions",
    "find_revisits",
    "RevisitClip",
    "revisit_clip",
    "sweep_clip",
    "RevisitWorld",
    "PATH_FAMILIES",
    "TRAIN_PATHS",
    "EVAL_PATHS",
    "sweep_path",
    "revisit_lags",
    "scene_sequence",
    "SceneClip",
    "scene_clip",
    "SceneWorld",
    "random_prompt",
    "World",
    "WorldDataset",
    "LATENT_SUFFIXES",
    "LatentDataset",
]
