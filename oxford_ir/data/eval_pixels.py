"""The test-time pixels of one image, without PyTorch: decoded, cropped to its box, downscaled, normalised.

:func:`eval_image` is the one "image (+ box) -> pixels" function of every test-time path (evaluation, validation,
the index, search, the web page, the evaluation cache); :func:`~oxford_ir.data.datasets.pixels_to_tensor` turns its
pixels into the network's input tensor. :func:`normalised_pixels` is the same arithmetic in NumPy, for the search
of an exported ONNX model, which runs without PyTorch (:mod:`oxford_ir.retrieval.onnx_queries`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_long_side
from oxford_ir.errors import DataError
from oxford_ir.images import load_image, to_rgb

BBox = Sequence[float]
#: a test-time image: a file, or a decoded PIL image (an upload)
ImageSource = str | Path | Image.Image

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def eval_image(
    source: ImageSource, image_size: int | None, bbox: BBox | None = None, label: str | None = None
) -> Image.Image:
    """The test-time pixels of one image: decoded, cropped to ``bbox``, then downscaled (Lanczos).

    The one "image (+ box) -> pixels" function of every test-time path (evaluation, validation, the index,
    search, the web page, the evaluation cache). ``source`` is a file or a PIL image (an upload: converted
    to RGB with its EXIF orientation applied, as files are). The crop is resized to
    ``image_size * max(crop.size) / max(full.size)`` (see :class:`ImageListDataset`); ``image_size=None``
    keeps the original resolution. Files are decoded in full, except JPEGs above
    :data:`~oxford_ir.images.DRAFT_MIN_PIXELS` without a box, which libjpeg decodes at reduced size first
    (memory; no benchmark image is that large). ``label`` names an upload in error messages.
    """
    if isinstance(source, Image.Image):
        path = Path(label or "upload")
        image = to_rgb(ImageOps.exif_transpose(source))
    else:
        path = Path(source)
        draft = None if bbox is not None or image_size is None else math.ceil(image_size)
        image = load_image(path, draft_size=draft)
    size: float | None = image_size
    if bbox is not None:
        full_size = max(image.size)
        image = crop(image, bbox, path)
        if size is not None:
            size = size * max(image.size) / full_size
    if size is not None:
        image = resize_long_side(image, max(size, 1.0))
    return image


def normalised_pixels(pixels: np.ndarray | Image.Image) -> np.ndarray:
    """H x W x 3 uint8 pixels (or an RGB image) -> ImageNet-normalised 3 x H x W float32 array: divided by 255,
    minus the mean, divided by the std, as :func:`~oxford_ir.data.datasets.pixels_to_tensor` (equal to float32
    rounding: torch may divide by 255 as a product with its inverse)."""
    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 uint8 pixels, got shape {array.shape}")
    values = array.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((values - _MEAN) / _STD)


def rounded_box(bbox: BBox, path: str | Path) -> tuple[int, int, int, int]:
    """``bbox`` rounded as ``PIL.Image.crop`` rounds it; a malformed box, or one empty after rounding, is a
    DataError naming ``path``."""
    if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
        raise DataError(f"{path}: bounding box {list(bbox)} must be four finite numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (round(float(v)) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        raise DataError(
            f"{path}: bounding box {list(bbox)} is empty (x2 <= x1 or y2 <= y1 after rounding); "
            "boxes are [x1, y1, x2, y2] in pixels of the original image"
        )
    return x1, y1, x2, y2


def crop(image: Image.Image, bbox: BBox, path: Path) -> Image.Image:
    """``image.crop(bbox)`` (PIL rounds the coordinates); a box that is empty after rounding is a DataError."""
    rounded_box(bbox, path)
    return image.crop(tuple(float(v) for v in bbox))
