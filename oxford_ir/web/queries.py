"""Checking what a request asks for: query images, boxes and k, each failure an :class:`ApiError`.

The API answers every bad request with a status code and one sentence that says what was wrong and
what to send instead; the page shows that sentence as it is. No message shows a path of the server's file
system (:func:`scrub_paths`): the indexed images are named by their path inside the indexed folder, an
upload by its own file name.

An upload is checked from its header first (:func:`probe_upload`: format, pixel count, size as shown), then
turned into its test-time pixels by :func:`upload_pixels`, which is
:func:`oxford_ir.data.datasets.eval_image` on the uploaded file: exactly what the index did to its files
(the same decoding, JPEG draft decoding above ``DRAFT_MIN_PIXELS`` included, crop and Lanczos downscale), so an
indexed file uploaded again gets its indexed embedding back. Only these small pixels wait for the search.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from oxford_ir.benchmarks import boxes
from oxford_ir.data.eval_pixels import eval_image
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.images import DECODE_ERRORS, upright_size

#: what an upload may be: the formats a camera, phone or browser produces (no EPS, PDF, ... decoders);
#: the JPEG plugin also opens multi-picture (MPO) files, as phones write them
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: multipart content types that say nothing about the file, so the bytes decide
_NEUTRAL_CONTENT_TYPES = ("", "application/octet-stream")
#: what an error message may echo of a value the client sent
ECHO_CHARS = 40
#: an absolute path in a message (POSIX or Windows), up to a space, quote, comma, bracket or semicolon
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/\\])(?:[A-Za-z]:)?[\\/][^\s'",;()\[\]]+""")
SUPPORTED = "upload a JPEG, PNG, WebP, GIF, BMP or TIFF file"


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` and a ``message`` for the person who sent it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def scrub_paths(text: str, root: str | Path | None = None) -> str:
    """``text`` with every absolute path replaced by what a visitor may see: its part inside ``root`` (the
    indexed folder), else its file name."""
    prefixes = [] if root is None else [str(p).rstrip("/\\") + "/" for p in (Path(root), Path(root).resolve())]

    def public(match: re.Match[str]) -> str:
        path = match.group(0)
        for prefix in prefixes:
            if path.startswith(prefix):
                return path[len(prefix) :]
        return Path(path.replace("\\", "/")).name

    return _ABSOLUTE_PATH.sub(public, text)


def echo(value: object) -> str:
    """``value`` as a message may show it: at most :data:`ECHO_CHARS` characters."""
    text = str(value)
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 3] + "..."


def parse_bbox(text: str | None) -> boxes.BBox | None:
    """``"x1,y1,x2,y2"`` (commas and/or spaces, optional brackets) -> four finite floats, by
    :func:`oxford_ir.benchmarks.boxes.parse_bbox`; empty -> None. Whether the box is empty is checked against the
    image, after rounding (:func:`check_bbox`)."""
    if text is None or not text.strip():
        return None
    try:
        return boxes.parse_bbox(text, allow_empty=True)
    except ConfigError:
        raise ApiError(
            422, f"bbox={echo(text)!r} is not a box: give four numbers x1,y1,x2,y2 in pixels of the query image"
        ) from None


def check_bbox(bbox: boxes.BBox | None, width: int, height: int) -> None:
    """Refuse a box that is empty once rounded (as the crop rounds it) or reaches outside the image."""
    if bbox is None:
        return
    shown = boxes.format_bbox(bbox)
    if boxes.bbox_is_empty(bbox, rounded=True):
        raise ApiError(422, f"bbox={shown} is empty: x2 must exceed x1 and y2 exceed y1 (by at least one pixel)")
    if not boxes.bbox_inside(bbox, (width, height)):
        raise ApiError(
            422,
            f"bbox={shown} reaches outside the {width} x {height} image: keep 0 <= x1 < x2 <= {width} "
            f"and 0 <= y1 < y2 <= {height}",
        )


def check_k(k: int, limit: int) -> int:
    """``k`` when ``1 <= k <= limit``."""
    if not 1 <= k <= limit:
        raise ApiError(422, f"k={echo(k)} is out of range: ask for 1 to {limit} results")
    return k


def check_content_type(content_type: str | None, name: str) -> None:
    """Refuse a part whose declared type is something other than an image (a text file, a PDF, ...)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in _NEUTRAL_CONTENT_TYPES or kind.startswith("image/"):
        return
    raise ApiError(415, f"{name!r} was sent as {echo(kind)}, not an image: {SUPPORTED}")


def probe_upload(path: Path, name: str, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of the uploaded image at ``path`` as a viewer shows it, from its header alone.

    Refuses a format outside :data:`UPLOAD_FORMATS` (415), an image of more than ``max_pixels`` pixels (413)
    and a header that cannot be read (400) before anything is decoded.
    """
    try:
        with Image.open(path, formats=UPLOAD_FORMATS) as probe:
            width, height = probe.size
    except UnidentifiedImageError:
        raise ApiError(415, f"{name!r} is not an image in a supported format: {SUPPORTED}") from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"{name!r} has too many pixels: the limit is {max_pixels / 1e6:g} megapixels") from None
    except DECODE_ERRORS as error:
        raise ApiError(400, f"cannot read {name!r} as an image ({_reason(error, path, name)}): {SUPPORTED}") from None
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"{name!r} is {width} x {height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:g} megapixels (max_image_megapixels): downscale it first",
        )
    return upright_size(path) or (width, height)


def upload_pixels(
    path: Path, name: str, image_size: int | None, bbox: tuple[float, float, float, float] | None
) -> Image.Image:
    """The test-time pixels of the upload at ``path`` (checked by :func:`probe_upload`): decoded, cropped to
    ``bbox``, downscaled to ``image_size``, by the one test-time function the index used for its files."""
    try:
        return eval_image(path, image_size, bbox, label=name)
    except DataError as error:
        raise ApiError(400, f"{_reason(error, path, name)} (truncated or damaged upload?)") from None
    except DECODE_ERRORS as error:  # a decoder error outside load_image's net (e.g. while cropping)
        raise ApiError(400, f"cannot decode {name!r} ({_reason(error, path, name)}): the file is damaged") from None


def _reason(error: BaseException, path: Path, name: str) -> str:
    """``error`` as a sentence naming the upload by ``name``, never by the server's temporary file."""
    text = str(error) or type(error).__name__
    return scrub_paths(text.replace(str(path), repr(name)))
