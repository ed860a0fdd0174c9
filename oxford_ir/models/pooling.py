"""Global pooling: a B x C x H x W feature map -> one B x D vector per image.

Every pooling exposes ``power``: the exponent of the generalised mean it computes (GeM: ``p``, average: 1).
Multi-scale extraction combines the embeddings of several scales with the same power mean, as
cnnimageretrieval-pytorch's ``extract_ms`` does with ``msp``. ``output_dim`` tells the embedder the size of
the pooled vector without running an image through the network.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.errors import ConfigError


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.): ``(mean(clamp(x, eps) ** p)) ** (1 / p)`` per channel.

    ``p`` is learned with the network (initialised to 3); p = 1 is average pooling and p -> inf tends to
    max pooling. The clamp keeps fractional powers of (post-ReLU) activations defined and differentiable.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if not p > 0:
            raise ConfigError(f"pooling.p={p}: the GeM exponent must be positive (3 is the usual start)")
        self.p = nn.Parameter(torch.ones(1) * p, requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        return F.avg_pool2d(x.clamp(min=self.eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p).flatten(1)

    @property
    def power(self) -> float:
        return float(self.p.detach())

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        return channels

    def extra_repr(self) -> str:
        return f"p={self.power:.4f}, eps={self.eps}, learnable={self.p.requires_grad}"


class MAC(nn.Module):
    """Maximum activations of convolutions: the spatial max of each channel."""

    power = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x, dim=(-2, -1))

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        return channels


class AvgPooling(nn.Module):
    """Sum/average pooling (SPoC): the spatial mean of each channel."""

    power = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        return channels


class FlattenPooling(nn.Module):
    """No pooling: the whole C x h x w map as one vector (with RawPixels: the raw-pixel baseline).

    Only meaningful after a backbone whose output has a fixed spatial size; ``output_dim`` refuses others.
    """

    power = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        if spatial_size is None:
            raise ConfigError(
                "pooling=flatten needs a backbone with a fixed output size (backbone=raw_pixels); a fully "
                "convolutional backbone gives a different size per image: use pooling=gem, mac or avg"
            )
        return channels * spatial_size[0] * spatial_size[1]
