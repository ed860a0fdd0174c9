"""The embedding network: backbone -> global pooling -> optional learned projection -> L2 normalisation.

One module with one set of weights embeds every image; the Siamese / triplet setup is this same network
applied to anchors, positives and negatives, so there is nothing to tie or copy between branches.

``forward(images, sizes)`` embeds a batch of test-time images padded to one input shape: each image's own
``(height, width)`` in ``sizes``, and the pooling covers only its feature cells
(:mod:`oxford_ir.extraction.buckets`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.errors import ConfigError


class Embedder(nn.Module):
    """Images (B x 3 x H x W, ImageNet-normalised) -> L2-normalised embeddings (B x ``embedding_dim``).

    ``projection_dim`` (or ``whitening=True``, which keeps the pooled dimension) adds a learned affine map
    between two L2 normalisations, the end-to-end learned whitening of cnnimageretrieval-pytorch
    (``norm(whiten(norm(pool(x))))``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooling: nn.Module,
        projection_dim: int | None = None,
        whitening: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        check_pooling = getattr(backbone, "check_pooling", None)
        if check_pooling is not None:  # e.g. a ViT's CLS token refuses GeM (timm_vit)
            check_pooling(pooling)
        channels = getattr(backbone, "out_channels", None)
        if channels is None:
            raise ConfigError(f"backbone {type(backbone).__name__} has no out_channels attribute")
        spatial_size = getattr(backbone, "out_size", None)
        output_dim = getattr(pooling, "output_dim", None)
        self.pooled_dim = int(output_dim(channels, spatial_size)) if output_dim is not None else int(channels)
        if projection_dim is not None and int(projection_dim) < 1:
            raise ConfigError(f"projection_dim={projection_dim}: must be a positive number of dimensions or null")
        if projection_dim is not None or whitening:
            out = self.pooled_dim if projection_dim is None else int(projection_dim)
            self.projection: nn.Linear | None = nn.Linear(self.pooled_dim, out, bias=True)
            if out == self.pooled_dim:
                # a square whitening starts as the identity: training starts from the backbone's own
                # descriptor (e.g. pretrained GeM) instead of a random rotation of it
                nn.init.eye_(self.projection.weight)
                nn.init.zeros_(self.projection.bias)
        else:
            self.projection = None
        self.embedding_dim = self.projection.out_features if self.projection is not None else self.pooled_dim

    @property
    def supports_padding(self) -> bool:
        """Whether ``forward`` can take padded images with their ``sizes`` (the extraction path asks)."""
        return bool(getattr(self.backbone, "supports_padding", False))

    @property
    def padding_note(self) -> str | None:
        """The backbone's reason for exact shape batches instead of buckets, for the extraction report."""
        return getattr(self.backbone, "padding_note", None)

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of ``images``; ``sizes`` (B x 2): each image's own height and width when padded."""
        if sizes is None:
            x = self.pooling(self.backbone(images))
        else:
            features, mask = self.backbone.valid_features(images, sizes)
            x = self.pooling(features) if mask is None else self.pooling(features, mask)
        if self.projection is not None:
            x = self.projection(F.normalize(x, dim=1))
        return F.normalize(x, dim=1)

    @property
    def power(self) -> float:
        """Exponent of the generalised mean that combines scales in multi-scale extraction.

        The pooling's power (GeM: p) as in cnnimageretrieval-pytorch; 1 with a projection, whose outputs
        can be negative (a fractional power of those is undefined), as the published code does too.
        """
        if self.projection is not None:
            return 1.0
        return float(getattr(self.pooling, "power", 1.0))
