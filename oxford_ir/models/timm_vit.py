"""Vision Transformers from timm as backbones: token sequences -> the B x C x h x w maps the poolings expect.

A ViT is built with ``dynamic_img_size=True`` (its position embeddings are interpolated, bicubic, to each
input's patch grid; the weights keep the size they were trained at, ``img_size``) and ``dynamic_img_pad=True``
(an image whose sides are not multiples of the patch size is padded at the bottom and the right with zeros of
the model's normalisation, i.e. its mean colour). Its embedding is either the CLS token (``pool_tokens=cls``, a
1 x 1 map that ``pooling=avg`` passes through unchanged) or the patch tokens as an h x w map for the configured
pooling (``pool_tokens=patches``; GeM by default).

Attention mixes every token and the position embeddings follow each image's own size, so a ViT cannot embed
zero-padded images as if each were alone: bucket batching falls back to exact shape batches (:data:`PADDING_NOTE`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oxford_ir.errors import ConfigError

#: timm modules whose models are ViTs that accept ``dynamic_img_size`` and ``dynamic_img_pad``
VIT_MODULES = ("vision_transformer", "deit", "eva")
#: ``pool_tokens=`` values
POOL_TOKENS = ("cls", "patches")
#: why a ViT gets shape batches instead of buckets (the extraction report's note)
PADDING_NOTE = (
    "{name} is a Vision Transformer: attention mixes all tokens and the position embeddings follow each image's "
    "own size, so padded images cannot be embedded as if alone: exact shape batches (one input shape per image "
    "size) instead of buckets"
)


def vit_kwargs(img_size: int | None) -> dict:
    """Arguments of ``timm.create_model`` for a ViT that embeds any image size."""
    kwargs: dict = {"dynamic_img_size": True, "dynamic_img_pad": True}
    if img_size is not None:
        if int(img_size) < 1:
            raise ConfigError(f"backbone.img_size={img_size}: give the ViT's training size, e.g. 224, or null")
        kwargs["img_size"] = int(img_size)
    return kwargs


def check_pool_tokens(pool_tokens: str, model: nn.Module, name: str) -> str:
    if pool_tokens == "cls" and getattr(model, "cls_token", None) is None:
        raise ConfigError(f"backbone.pool_tokens=cls: {name} has no CLS token; use backbone.pool_tokens=patches")
    if pool_tokens not in POOL_TOKENS:
        raise ConfigError(
            f"backbone.pool_tokens={pool_tokens!r}: choose cls (the CLS token is the embedding; use pooling=avg) or "
            "patches (the patch tokens pooled by pooling=, e.g. GeM)"
        )
    return pool_tokens


def patch_size(model: nn.Module) -> tuple[int, int]:
    size = model.patch_embed.patch_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def vit_map(model: nn.Module, x: torch.Tensor, pool_tokens: str) -> torch.Tensor:
    """The ViT's output tokens of ``x`` (B x 3 x H x W, the model's normalisation) as a B x C x h x w map: the CLS
    token as 1 x 1, or the patch tokens on their ceil(H / patch) x ceil(W / patch) grid."""
    tokens = model.forward_features(x)
    if pool_tokens == "cls":
        return tokens[:, 0, :, None, None]
    rows, cols = (math.ceil(n / p) for n, p in zip(x.shape[-2:], patch_size(model), strict=True))
    patches = tokens[:, int(model.num_prefix_tokens) :]
    return patches.reshape(x.shape[0], rows, cols, patches.shape[-1]).permute(0, 3, 1, 2)


def check_pooling(pool_tokens: str, pooling: nn.Module, name: str) -> None:
    """Refuse GeM on the CLS token: its clamp at eps would zero every negative component of the embedding."""
    if pool_tokens == "cls" and hasattr(pooling, "p"):
        raise ConfigError(
            f"backbone={name} with backbone.pool_tokens=cls: the CLS token is the embedding, and GeM would clamp its "
            "negative values to eps; use pooling=avg (the identity on one token), or backbone.pool_tokens=patches to "
            "GeM-pool the patch tokens"
        )
