"""Flow matching (rectified flow) for :class:`MALTNetwork`.

Convention: ``t = 0`` is data, ``t = 1`` is pure noise, and the straight path between them
is ``x_t = (1 - t) x_0 + t * eps``. The network predicts the velocity
``v = dx_t/dt = eps - x_0``; the loss is the mean squared error to it. Sampling integrates
``dx/dt = v`` from ``t = 1`` down to ``t = 0`` (see :class:`memkit.models.malt.EulerSampler`).
The same ``t`` conditions the clean pass: ``t = 0`` at inference, a small random level in
training (noise augmentation, so memories written from imperfect generated segments look
like training).
"""

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from memkit.errors import ConfigError

__all__ = ["FlowMatching"]


@dataclasses.dataclass
class FlowMatching:
    """The flow-matching path, target and training-time noise level distribution.

    Attributes:
        time_sampling: ``"logit_normal"`` (SD3's choice: more weight on mid noise levels)
            or ``"uniform"``.
        logit_mean, logit_std: parameters of the logit-normal distribution.

    Example:
        >>> import torch
        >>> fm = FlowMatching()
        >>> x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
        >>> fm.interpolate(x0, eps, torch.tensor([0.25, 1.0]))[:, 0].tolist()
        [0.25, 1.0]
        >>> fm.target(x0, eps)[0, 0].item()
        1.0
    """

    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.time_sampling not in ("logit_normal", "uniform"):
            raise ConfigError(f"time_sampling must be 'logit_normal' or 'uniform', got {self.time_sampling!r}")

    def sample_time(self, batch_size: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        """Training noise levels ``(b,)`` in (0, 1)."""
        if self.time_sampling == "uniform":
            t = torch.rand(batch_size, generator=generator)
        else:
            t = torch.sigmoid(torch.randn(batch_size, generator=generator) * self.logit_std + self.logit_mean)
        return t.to(device)

    @staticmethod
    def _expand(t: Tensor, x: Tensor) -> Tensor:
        return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) x_0 + t * noise``, with ``t (b,)``."""
        tt = self._expand(t, x0)
        return (1 - tt) * x0 + tt * noise

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity the network learns: ``noise - x_0``."""
        return noise - x0

    def predict_x0(self, x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
        """The clean sample implied by a velocity: ``x_t - t * v``."""
        return x_t - self._expand(t, x_t) * velocity

    def loss(self, prediction: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        """Mean squared error of a velocity prediction."""
        return F.mse_loss(prediction.float(), self.target(x0, noise).float())
