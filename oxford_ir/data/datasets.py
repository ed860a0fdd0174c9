"""The datasets of the input pipeline: test-time images (:class:`ImageListDataset`) and training crops
(:class:`TrainImageDataset`), decoded from files or read from an opened image cache.

Test-time images are preprocessed exactly as cnnimageretrieval-pytorch does. The preprocessing is split in two so
that the image cache (:mod:`oxford_ir.data.cache`) can store its expensive half: :func:`eval_image` (decode, crop to
the box, Lanczos downscale: 8-bit pixels) and :func:`pixels_to_tensor` (float conversion and ImageNet
normalisation). :class:`ImageListDataset` runs both, or only the second on pixels read from an opened cache, so a
cached image gives a bit-identical tensor. Training images are decoded at the long side they are needed at
(:func:`train_image` is what the training cache stores) and cropped by a seeded augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset

from oxford_ir.benchmarks.path_array import PathArray
from oxford_ir.data.augmentation import SeededCrop
from oxford_ir.data.batch_augment import CropItem
from oxford_ir.data.cache_format import ImageCache
from oxford_ir.data.eval_pixels import BBox, ImageSource, eval_image
from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_long_side
from oxford_ir.images import load_image

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def train_image(path: str | Path, long_side: int) -> Image.Image:
    """A training image with its long side downscaled to ``long_side`` (never upscaled), JPEGs drafted.

    What the training image cache stores; the random augmentation runs on it afterwards, so draft mode
    (any JPEG at least twice ``long_side``) costs nothing that matters and saves most of the decoding.
    """
    return resize_long_side(load_image(path, draft_size=long_side, always_draft=True), long_side)


def pixels_to_tensor(pixels: np.ndarray | Image.Image) -> torch.Tensor:
    """H x W x 3 uint8 pixels (or an RGB image) -> ImageNet-normalised 3 x H x W float tensor.

    The same arithmetic as ``torchvision.transforms.functional.to_tensor`` + ``normalize``
    (:func:`~oxford_ir.data.transforms.to_tensor_normalised`): divide by 255, subtract the mean, divide by
    the std, so the result is bit-identical to it.
    """
    array = np.asarray(pixels, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 uint8 pixels, got shape {array.shape}")
    # a fresh, writable copy: the pixels may be a read-only memory map or PIL buffer (torch would warn)
    tensor = torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C")).to(torch.float32).div(255)
    return tensor.sub_(_MEAN).div_(_STD)


class ImageListDataset(Dataset):
    """``(normalised 3 x H x W tensor, index)`` for each image, the long side at most ``image_size``.

    ``paths`` are files or decoded PIL images (uploads, named by ``labels`` in error messages).

    A query with a bounding box ``(x1, y1, x2, y2)`` (original-image pixels) is cropped first and the crop
    is resized to ``image_size * max(crop.size) / max(full.size)``: the crop keeps the scale the whole image
    would have had, as in cnnimageretrieval's ``ImagesFromList``, so query and database objects are seen at
    the same resolution. ``image_size=None`` keeps the original resolution.

    ``scale != 1`` resizes the resulting tensor by bilinear interpolation, which is how the published
    multi-scale extraction (``extract_ms``) builds its other scales.

    ``cache``: an opened evaluation :class:`~oxford_ir.data.cache_format.ImageCache` built at ``image_size`` that holds
    every ``(path, bbox)``; images are then read from it instead of decoded (bit-identical tensors). A missing
    entry raises :class:`~oxford_ir.data.cache_format.ImageCacheError` here, not in a worker.
    """

    def __init__(
        self,
        paths: Sequence[ImageSource],
        image_size: int | None,
        bboxes: Sequence[BBox | None] | None = None,
        scale: float = 1.0,
        cache: ImageCache | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.paths = [p if isinstance(p, Image.Image) else Path(p) for p in paths]
        self.labels = None if labels is None else list(labels)
        if bboxes is not None and len(bboxes) != len(self.paths):
            raise ValueError(f"{len(bboxes)} bounding boxes for {len(self.paths)} images; give one per image or None")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels or None, got {image_size}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.image_size = image_size
        self.bboxes = None if bboxes is None else list(bboxes)
        self.scale = float(scale)
        self.cache = cache
        self.rows: np.ndarray | None = None
        if cache is not None:
            if any(isinstance(p, Image.Image) for p in self.paths):
                raise ValueError("the image cache holds files; decoded images (uploads) cannot be read from it")
            if cache.kind != "eval" or cache.long_side != image_size:
                raise ValueError(
                    f"the image cache {cache.folder} holds {cache.kind} images at long side {cache.long_side}; "
                    f"this dataset needs evaluation images at image_size={image_size}"
                )
            self.rows = cache.rows(self.paths, self.bboxes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None:
            pixels = self.cache.pixels(int(self.rows[index]))
        else:
            bbox = None if self.bboxes is None else self.bboxes[index]
            label = None if self.labels is None else self.labels[index]
            pixels = eval_image(self.paths[index], self.image_size, bbox, label)
        tensor = pixels_to_tensor(pixels)
        if self.scale != 1.0:
            tensor = rescale(tensor.unsqueeze(0), self.scale).squeeze(0)
        return tensor, index

    def __repr__(self) -> str:
        boxes = "none" if self.bboxes is None else f"{sum(b is not None for b in self.bboxes)} boxes"
        cached = "" if self.cache is None else f", cache={self.cache.folder}"
        return (
            f"{type(self).__name__}({len(self)} images, image_size={self.image_size}, {boxes}, "
            f"scale={self.scale}{cached})"
        )


class TrainImageDataset(Dataset):
    """:class:`~oxford_ir.data.batch_augment.CropItem` (uint8 crop, label, draw) for each training image.

    ``crop``: a :class:`~oxford_ir.data.augmentation.SeededCrop`, the per-image part of the augmentation (random
    resized crop and flip with PIL); its colour jitter and normalisation run on the whole batch
    (:class:`~oxford_ir.data.batch_augment.BatchAugmentation`). ``draft_size``: the long side the image is needed
    at (JPEGs at least twice that are decoded in draft mode, see :func:`~oxford_ir.images.decode_image`);
    None decodes in full. ``cache``: an opened training :class:`~oxford_ir.data.cache_format.ImageCache` holding every
    path; the augmentation then runs on its pixels.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        crop: SeededCrop,
        *,
        draft_size: int | None = None,
        cache: ImageCache | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = PathArray.of(paths)  # compact: no Path object per image (1.6M images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.crop = crop
        self.draft_size = draft_size
        self.cache = cache
        self.rows: np.ndarray | None = None
        if cache is not None:
            if cache.kind != "train":
                raise ValueError(f"the image cache {cache.folder} holds {cache.kind} images, not training images")
            self.rows = cache.rows(self.paths)

    def _image(self, index: int):
        if self.cache is not None:
            return self.cache.image(int(self.rows[index]))
        return load_image(self.paths[index], draft_size=self.draft_size, always_draft=self.draft_size is not None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> CropItem:
        """``item`` is an index, or ``(index, seed)`` from :class:`~oxford_ir.data.sampler.ClassBalancedSampler`
        (seeded augmentation); a plain index gets a seed from torch's global generator (random)."""
        index, seed = item if isinstance(item, tuple) else (item, int(torch.randint(0, 2**62, ()).item()))
        crop, draw = self.crop(self._image(index), int(seed))
        return CropItem(crop, int(self.labels[index]), draw)


def rescale(batch: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of a B x C x H x W batch by ``scale``, exactly as cnnimageretrieval's ``extract_ms``."""
    if scale == 1.0:
        return batch
    return F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
