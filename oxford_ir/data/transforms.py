"""Test-time image preprocessing, identical to the published retrieval code (cnnimageretrieval-pytorch).

Images are only ever downscaled so that their long side is at most ``image_size`` (``PIL.Image.thumbnail``
with Lanczos, the filter cnnimageretrieval calls ``Image.ANTIALIAS``), then converted to a float tensor and
normalised with the ImageNet mean and std every pretrained backbone expects.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: short aliases: the normalisation every backbone of the project assumes
MEAN = IMAGENET_MEAN
STD = IMAGENET_STD


def resize_long_side(image: Image.Image, size: float) -> Image.Image:
    """Copy of ``image`` downscaled to fit a ``size`` x ``size`` box, aspect kept; never upscaled.

    cnnimageretrieval-pytorch's ``imresize``: ``img.thumbnail((size, size), Image.ANTIALIAS)`` (ANTIALIAS is
    LANCZOS; ``size`` may be fractional, thumbnail floors it), with ``reducing_gap=None``: Pillow >= 7 would
    otherwise first shrink large factors by an integer box reduction, which the Pillow of the published
    numbers did not do. The short side is rounded as current Pillow does (closest aspect ratio); old
    Pillow floored it, so it can differ by one pixel.
    """
    if size < 1:
        raise ValueError(f"image size must be at least 1 pixel, got {size}")
    out = image.copy()
    out.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
    return out


def thumbnail_size(width: int, height: int, size: float) -> tuple[int, int]:
    """``(width, height)`` of ``PIL.Image.thumbnail((size, size))`` on a ``width`` x ``height`` image.

    Pillow's own arithmetic (``preserve_aspect_ratio``: the box is floored, the short side rounded to the
    closest aspect ratio, never below 1, never upscaled), for code that must know the size without resizing
    (planning extraction batches from headers, resizing tensors on a GPU).
    """
    x = y = math.floor(size)
    if x >= width and y >= height:
        return width, height
    aspect = width / height

    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def to_tensor_normalised(image: Image.Image) -> torch.Tensor:
    """3 x H x W float tensor of an RGB image, ImageNet-normalised."""
    from torchvision.transforms import functional as TF  # a second of imports: only where it is used

    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class EvalTransform:
    """PIL image -> normalised tensor with the long side at most ``image_size`` (picklable for workers)."""

    def __init__(self, image_size: int | None) -> None:
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.image_size is not None:
            image = resize_long_side(image, self.image_size)
        return to_tensor_normalised(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


def eval_transform(image_size: int | None) -> EvalTransform:
    """The test-time transform: downscale the long side to ``image_size`` (None keeps the size), normalise."""
    return EvalTransform(image_size)
