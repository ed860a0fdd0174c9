"""Query images of a search, checked before anything is embedded: each file exists and has a readable header,
and each box lies inside its image as displayed (EXIF orientation applied).

Shared by :class:`~oxford_ir.retrieval.search.Searcher` and the search of an exported ONNX model
(:mod:`oxford_ir.retrieval.onnx_queries`), so both refuse the same queries with the same messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from oxford_ir.benchmarks.boxes import BBox, check_bbox_inside, parse_bbox
from oxford_ir.errors import DataError
from oxford_ir.images import upright_size

#: a query: an image file, or a decoded PIL image (an upload)
QueryImage = str | Path | Image.Image


def oriented_size(image: QueryImage) -> tuple[int, int]:
    """``(width, height)`` of an image as ``load_image`` presents it (EXIF orientation applied), from the header;
    a missing or unreadable file is a DataError naming it."""
    size = upright_size(image)
    if size is not None:
        return size
    path = Path(image)  # a PIL image always has a size: only files get here
    if not path.exists():
        raise DataError(f"query image not found: {path}")
    if path.is_dir():
        raise DataError(f"query {path} is a folder, not an image")
    raise DataError(f"cannot decode query image {path}: unreadable header; the file is corrupt or not an image")


def query_label(image: QueryImage, position: int) -> str:
    """How messages name query ``position``: its path, or ``query image N (uploaded)``."""
    return f"query image {position + 1} (uploaded)" if isinstance(image, Image.Image) else str(image)


def checked_queries(
    images: Sequence[QueryImage], bboxes: Sequence[Sequence[float] | None] | None, *, check_boxes: bool = True
) -> tuple[list[QueryImage], list[BBox | None], list[str]]:
    """``(images, boxes, labels)``: files as paths, one parsed box (or None) and one label per image.

    With ``check_boxes``, every file's header is read (a missing or undecodable file is a DataError naming it)
    and a box outside its image is a DataError (benchmark evaluation turns it off to crop exactly as the
    published code, which tolerates such boxes).
    """
    images = [image if isinstance(image, Image.Image) else Path(image) for image in images]
    boxes = [None if b is None else parse_bbox(b) for b in (bboxes if bboxes is not None else [None] * len(images))]
    if len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} boxes for {len(images)} images; give one per image (or None)")
    labels = [query_label(image, i) for i, image in enumerate(images)]
    if check_boxes:
        for image, bbox, label in zip(images, boxes, labels, strict=True):
            size = oriented_size(image)  # also turns a missing or undecodable file into a DataError here
            if bbox is not None:
                check_bbox_inside(bbox, size, label)
    return images, boxes, labels
