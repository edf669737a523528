"""Training MALT models: the unrolled loss, the loop (single process or torchrun), checkpoints."""

from memkit.train.config import TRAIN_PRESETS, DataSpec, TrainConfig
from memkit.train.data import build_world, make_batch, pose_actions, prepare_sample
from memkit.train.trainer import TrainResult, UnrolledLoss, load_training, save_training, setup_distributed, train

__all__ = [
    "TrainConfig",
    "DataSpec",
    "TRAIN_PRESETS",
    "UnrolledLoss",
    "TrainResult",
    "train",
    "setup_distributed",
    "save_training",
    "load_training",
    "build_world",
    "make_batch",
    "pose_actions",
    "prepare_sample",
]
