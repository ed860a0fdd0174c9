"""Images from a list of paths, preprocessed for extraction exactly as cnnimageretrieval-pytorch does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset

from oxford_ir.data.images import load_image
from oxford_ir.data.transforms import resize_long_side, to_tensor_normalised
from oxford_ir.errors import DataError

BBox = Sequence[float]


class ImageListDataset(Dataset):
    """``(normalised 3 x H x W tensor, index)`` for each path, the long side at most ``image_size``.

    A query with a bounding box ``(x1, y1, x2, y2)`` (original-image pixels) is cropped first and the crop
    is resized to ``image_size * max(crop.size) / max(full.size)``: the crop keeps the scale the whole image
    would have had, as in cnnimageretrieval's ``ImagesFromList``, so query and database objects are seen at
    the same resolution. ``image_size=None`` keeps the original resolution.

    ``scale != 1`` resizes the resulting tensor by bilinear interpolation, which is how the published
    multi-scale extraction (``extract_ms``) builds its other scales.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        image_size: int | None,
        bboxes: Sequence[BBox | None] | None = None,
        scale: float = 1.0,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if bboxes is not None and len(bboxes) != len(self.paths):
            raise ValueError(f"{len(bboxes)} bounding boxes for {len(self.paths)} images; give one per image or None")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels or None, got {image_size}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.image_size = image_size
        self.bboxes = None if bboxes is None else list(bboxes)
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        image = load_image(path)
        bbox = None if self.bboxes is None else self.bboxes[index]
        size: float | None = self.image_size
        if bbox is not None:
            full_size = max(image.size)
            image = crop(image, bbox, path)
            if size is not None:
                size = size * max(image.size) / full_size
        if size is not None:
            image = resize_long_side(image, max(size, 1.0))
        tensor = to_tensor_normalised(image)
        if self.scale != 1.0:
            tensor = rescale(tensor.unsqueeze(0), self.scale).squeeze(0)
        return tensor, index

    def __repr__(self) -> str:
        boxes = "none" if self.bboxes is None else f"{sum(b is not None for b in self.bboxes)} boxes"
        return f"{type(self).__name__}({len(self)} images, image_size={self.image_size}, {boxes}, scale={self.scale})"


def crop(image: Image.Image, bbox: BBox, path: Path) -> Image.Image:
    """``image.crop(bbox)`` (PIL rounds the coordinates); a box that is empty after rounding is a DataError."""
    if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
        raise DataError(f"{path}: bounding box {list(bbox)} must be four finite numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (round(float(v)) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        raise DataError(
            f"{path}: bounding box {list(bbox)} is empty (x2 <= x1 or y2 <= y1 after rounding); "
            "boxes are [x1, y1, x2, y2] in pixels of the original image"
        )
    return image.crop(tuple(float(v) for v in bbox))


def rescale(batch: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of a B x C x H x W batch by ``scale``, exactly as cnnimageretrieval's ``extract_ms``."""
    if scale == 1.0:
        return batch
    return F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
