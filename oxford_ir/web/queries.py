"""Checking what a request asks for: query images, boxes and k, each failure an :class:`ApiError`.

The API answers every bad request with a status code and one sentence that says what was wrong and
what to send instead; the page shows that sentence as it is.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from oxford_ir.data.images import load_image
from oxford_ir.errors import DataError

#: what an upload may be: the formats a camera, phone or browser produces (no EPS, PDF, ... decoders);
#: the JPEG plugin also opens multi-picture (MPO) files, as phones write them
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: multipart content types that say nothing about the file, so the bytes decide
_NEUTRAL_CONTENT_TYPES = ("", "application/octet-stream")


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and a ``message`` for the person who sent it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` (commas and/or spaces, optional brackets) -> four finite floats; empty -> None."""
    if text is None or not text.strip():
        return None
    parts = [p for p in re.split(r"[\s,]+", text.strip().strip("[]()").strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ApiError(422, f"bbox={text!r} is not a box: give four numbers x1,y1,x2,y2 in pixels of the query image")
    return values  # type: ignore[return-value]


def check_bbox(bbox: tuple[float, float, float, float] | None, width: int, height: int) -> None:
    """Refuse a box that is empty once rounded (as the crop rounds it) or reaches outside the image."""
    if bbox is None:
        return
    x1, y1, x2, y2 = bbox
    shown = ",".join(f"{v:g}" for v in bbox)
    if round(x2) <= round(x1) or round(y2) <= round(y1):
        raise ApiError(422, f"bbox={shown} is empty: x2 must exceed x1 and y2 exceed y1 (by at least one pixel)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ApiError(
            422,
            f"bbox={shown} reaches outside the {width} x {height} image: keep 0 <= x1 < x2 <= {width} "
            f"and 0 <= y1 < y2 <= {height}",
        )


def check_k(k: int, limit: int) -> int:
    """``k`` when ``1 <= k <= limit``."""
    if not 1 <= k <= limit:
        raise ApiError(422, f"k={k} is out of range: ask for 1 to {limit} results")
    return k


def check_content_type(content_type: str | None, name: str) -> None:
    """Refuse a part whose declared type is something other than an image (a text file, a PDF, ...)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in _NEUTRAL_CONTENT_TYPES or kind.startswith("image/"):
        return
    raise ApiError(415, f"{name!r} was sent as {kind}, not an image: upload a JPEG, PNG, WebP, GIF, BMP or TIFF file")


def decode_upload(path: Path, name: str, max_pixels: int) -> Image.Image:
    """The uploaded file at ``path`` as ``load_image`` decodes it, after checking its format and pixel count.

    The header is read first (cheap) so that a format outside :data:`UPLOAD_FORMATS` (415) or an image
    with more than ``max_pixels`` pixels (413) is refused before anything is decoded.
    """
    try:
        with Image.open(path, formats=UPLOAD_FORMATS) as probe:
            width, height = probe.size
    except UnidentifiedImageError:
        raise ApiError(
            415, f"{name!r} is not an image in a supported format: upload a JPEG, PNG, WebP, GIF, BMP or TIFF file"
        ) from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"{name!r} has too many pixels: the limit is {max_pixels / 1e6:g} megapixels") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ApiError(400, f"cannot read {name!r} as an image: {error}") from None
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"{name!r} is {width} x {height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:g} megapixels: downscale it first",
        )
    try:
        return load_image(path)
    except DataError as error:
        reason = str(error).replace(str(path), repr(name))
        raise ApiError(400, f"{reason} (truncated or damaged upload?)") from None
