"""Global pooling: a B x C x H x W feature map -> one B x D vector per image.

Every pooling exposes ``power``: the exponent of the generalised mean it computes (GeM: ``p``, average: 1).
Multi-scale extraction combines the embeddings of several scales with the same power mean, as
cnnimageretrieval-pytorch's ``extract_ms`` does with ``msp``. ``output_dim`` tells the embedder the size of
the pooled vector without running an image through the network.

GeM, MAC and average pooling take an optional ``mask`` (B x 1 x h x w, True on the feature cells of the image):
test-time images padded to a shared input shape (:mod:`oxford_ir.extraction.buckets`) are pooled over their
own cells only, so the padding adds nothing to the sum, the max or the count.
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.p.to(x.dtype)
        powered = x.clamp(min=self.eps).pow(p)
        if mask is None:
            return F.avg_pool2d(powered, (x.size(-2), x.size(-1))).pow(1.0 / p).flatten(1)
        return masked_mean(powered, mask).pow(1.0 / p)

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x.masked_fill(~mask, -torch.inf)
        return torch.amax(x, dim=(-2, -1))

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        return channels


class AvgPooling(nn.Module):
    """Sum/average pooling (SPoC): the spatial mean of each channel."""

    power = 1.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x.mean(dim=(-2, -1)) if mask is None else masked_mean(x, mask)

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        return channels


class FlattenPooling(nn.Module):
    """No pooling: the whole C x h x w map as one vector (with RawPixels: the raw-pixel baseline).

    Only meaningful after a backbone whose output has a fixed spatial size; ``output_dim`` refuses others.
    """

    power = 1.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and not bool(mask.all()):
            raise ValueError("pooling=flatten cannot leave padded cells out: every cell is part of the vector")
        return x.flatten(1)

    def output_dim(self, channels: int, spatial_size: tuple[int, int] | None = None) -> int:
        if spatial_size is None:
            raise ConfigError(
                "pooling=flatten needs a backbone with a fixed output size (backbone=raw_pixels); a fully "
                "convolutional backbone gives a different size per image: use pooling=gem, mac or avg"
            )
        return channels * spatial_size[0] * spatial_size[1]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each channel of ``x`` (B x C x h x w) over the cells where ``mask`` (B x 1 x h x w) is True."""
    count = mask.sum(dim=(-2, -1)).clamp_(min=1).to(x.dtype)
    return (x * mask).sum(dim=(-2, -1)) / count


def valid_cell_mask(sizes: torch.Tensor, feature_shape: tuple[int, int], stride: int) -> torch.Tensor:
    """B x 1 x h x w mask of the feature cells that belong to each image of a padded batch.

    ``sizes`` (B x 2) holds each image's own ``(height, width)`` in input pixels, the image sitting at the
    top left of the padded input. A backbone of output stride ``s`` whose layers pad like ResNet's, MobileNet's
    or ceil-mode pooling maps ``n`` input pixels to ``ceil(n / s)`` cells, aligned at the top left; those cells
    are the image's.
    """
    cells = torch.div(sizes.to(torch.long) + (stride - 1), stride, rounding_mode="floor")
    rows = torch.arange(feature_shape[0], device=sizes.device).view(1, -1, 1)
    cols = torch.arange(feature_shape[1], device=sizes.device).view(1, 1, -1)
    mask = (rows < cells[:, 0].view(-1, 1, 1)) & (cols < cells[:, 1].view(-1, 1, 1))
    return mask.unsqueeze(1)
