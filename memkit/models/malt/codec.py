"""The latent codec seam: anything with ``encode(video)`` and ``decode(latents)``."""

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["LatentCodec", "IdentityCodec"]


@runtime_checkable
class LatentCodec(Protocol):
    """Maps pixel video ``(b T C H W)`` to latent video ``(b T' c h w)`` and back.

    MALT runs in latent space; a causal 3D autoencoder (MAGVIT-v2 style) is what the paper
    uses. Any module with these two methods plugs in; :class:`IdentityCodec` is the default.
    """

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


class IdentityCodec(nn.Module):
    """Latents are pixels (the network patchifies pixels directly).

    Example:
        >>> import torch
        >>> x = torch.randn(1, 2, 3, 8, 8)
        >>> bool((IdentityCodec().decode(IdentityCodec().encode(x)) == x).all())
        True
    """

    def encode(self, video: Tensor) -> Tensor:
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents
