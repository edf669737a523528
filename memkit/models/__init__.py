"""Models built from memkit's layers: a tiny host for tests and the reference backbone."""

from memkit.models.tiny import TinySegmentModel

__all__ = ["TinySegmentModel"]
