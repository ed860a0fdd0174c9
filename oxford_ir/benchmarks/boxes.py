"""Query boxes ``x1,y1,x2,y2`` as people give them: the one reader (:func:`parse_bbox`) and the one set of checks
(:func:`bbox_is_empty`, :func:`bbox_inside`, :func:`check_bbox_inside`) of every place a box comes from: the search
command and its query lists, :meth:`~oxford_ir.retrieval.search.Searcher.embed_images`, the web page and its API.
A benchmark's query boxes come from its ground truth: :func:`check_query_crop` refuses one that does not overlap its
image or leaves less than :data:`MIN_QUERY_SIDE` pixels of it (a query image replaced by another); one that only
runs past the image's edge is cropped as the published code crops it (PIL pads the outside with black).

Coordinates are pixels of the image as displayed (EXIF rotation applied), as the ground truth's query boxes are; a
crop rounds them as ``PIL.Image.crop`` does. Errors name the key the box came under (``bbox``,
``queries.txt:3: bbox``) and the value, and say what to give instead: a :class:`~oxford_ir.errors.ConfigError` for a
value that is no box, a :class:`~oxford_ir.errors.DataError` for a box outside its image. The web API words them for
its visitors (:mod:`oxford_ir.web.queries`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from oxford_ir.errors import ConfigError, DataError

BBox = tuple[float, float, float, float]

#: what separates the four numbers of a box written as text
_SEPARATORS = re.compile(r"[\s,]+")


def parse_bbox(value: Any, key: str = "bbox", *, allow_empty: bool = False) -> BBox | None:
    """Four finite floats ``(x1, y1, x2, y2)`` from ``value``; None stays None.

    ``value`` is a string of four numbers separated by commas and/or whitespace, optionally in brackets
    (``"10,20,200,180"``, ``"[10 20 200 180]"``), or a sequence of four numbers. Anything else is a
    :class:`ConfigError` naming ``key`` and the value; so is an empty box (x2 <= x1 or y2 <= y1) unless
    ``allow_empty``: the caller then checks it against its image (:func:`bbox_is_empty` after rounding).
    """
    if value is None:
        return None
    parts = _SEPARATORS.split(value.strip().strip("[]()").strip()) if isinstance(value, str) else value
    try:
        numbers = tuple(float(v) for v in parts if not (isinstance(v, str) and not v))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise ConfigError(f"{key}={value!r}: give a box as four numbers x1,y1,x2,y2 (pixels), e.g. {key}=10,20,200,180")
    if not allow_empty and bbox_is_empty(numbers):
        raise ConfigError(f"{key}={value!r}: the box is empty; x1,y1,x2,y2 needs x2 > x1 and y2 > y1")
    return numbers  # type: ignore[return-value]


def format_bbox(bbox: Sequence[float]) -> str:
    """``bbox`` as a message shows it: ``x1,y1,x2,y2`` with each number in ``%g``."""
    return ",".join(f"{v:g}" for v in bbox)


def bbox_is_empty(bbox: Sequence[float], *, rounded: bool = False) -> bool:
    """True when x2 <= x1 or y2 <= y1; ``rounded``: once each coordinate is rounded as ``PIL.Image.crop`` rounds it
    (a box thinner than a pixel crops nothing)."""
    x1, y1, x2, y2 = (round(v) for v in bbox) if rounded else bbox
    return x2 <= x1 or y2 <= y1


def bbox_inside(bbox: Sequence[float], size: tuple[int, int]) -> bool:
    """True when ``bbox`` lies inside an image of ``size = (width, height)``."""
    x1, y1, x2, y2 = bbox
    width, height = size
    return not (x1 < 0 or y1 < 0 or x2 > width or y2 > height)


def check_bbox_inside(bbox: Sequence[float], size: tuple[int, int], label: str) -> None:
    """A box must lie inside the image: PIL would pad the outside with black and embed that silently. A
    :class:`DataError` naming the image ``label`` otherwise."""
    if not bbox_inside(bbox, size):
        width, height = size
        raise DataError(
            f"{label}: bbox {format_bbox(bbox)} lies outside the {width} x {height} image; "
            "boxes are x1,y1,x2,y2 in pixels of the image as displayed (EXIF rotation applied)"
        )


#: fewest pixels of the image a query crop must hold in each direction: fewer is not a view of the landmark
MIN_QUERY_SIDE = 4


def check_query_crop(bbox: Sequence[float], size: tuple[int, int], label: str, fix: str) -> None:
    """A :class:`DataError` naming ``label`` (benchmark and query), the box and the image size when the crop of
    ``bbox`` (rounded as ``PIL.Image.crop`` rounds it) holds no pixel of an image of ``size = (width, height)``, or
    fewer than :data:`MIN_QUERY_SIDE` in a direction; ``fix`` says what to do."""
    width, height = size
    x1, y1, x2, y2 = (round(float(v)) for v in bbox)
    inside_w, inside_h = min(x2, width) - max(x1, 0), min(y2, height) - max(y1, 0)
    if inside_w <= 0 or inside_h <= 0:
        problem = "does not overlap"
    elif min(inside_w, inside_h) < MIN_QUERY_SIDE:
        problem = (
            f"holds only {inside_w} x {inside_h} pixels of (at least {MIN_QUERY_SIDE} x {MIN_QUERY_SIDE} make a query)"
        )
    else:
        return
    raise DataError(f"{label}: box {format_bbox(bbox)} {problem} the {width} x {height} image; {fix}")
