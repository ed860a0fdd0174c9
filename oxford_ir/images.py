"""Opening images the same way everywhere: RGB, EXIF orientation applied, clear errors.

Any file a camera, phone or image editor writes is turned into 8-bit RGB: grayscale, palette (with
transparency), CMYK, 16-bit and alpha images are converted (transparent areas composited onto white, as
a viewer shows them), the EXIF orientation is applied. A file that cannot be decoded raises
:class:`~oxford_ir.errors.DataError` naming it, never a library exception, so a long run can skip it.

Huge images: Pillow refuses images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 Mpx) as possible
decompression bombs with an exception that is not an ``OSError``. Here the same budget applies to the pixels
actually *decoded* (:data:`MAX_DECODED_PIXELS`): a caller that will downscale anyway passes ``draft_size``,
and a large JPEG is then decoded directly at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling), which is
several times faster, needs 1/s^2 of the memory, and lets JPEGs of up to 64 times the budget through.

Draft mode changes pixels (libjpeg's DCT scaling is not Lanczos), so by default only JPEGs above
:data:`DRAFT_MIN_PIXELS` are drafted and the evaluation protocol stays exact for every benchmark image.
Training loads and the training image cache pass ``always_draft=True``: the image is downscaled and randomly
cropped anyway, so any JPEG at least twice the needed long side is decoded at reduced size.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError

from oxford_ir.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

#: most pixels decoded for one image: Pillow's own error threshold (2 x its default MAX_IMAGE_PIXELS),
#: about 179 Mpx or 540 MB as 8-bit RGB
MAX_DECODED_PIXELS = 2 * 89_478_485
#: JPEGs larger than this (about 16.8 Mpx, e.g. 5000 x 3360) are decoded at reduced size when the caller
#: gives ``draft_size``; smaller ones decode in full, so their pixels do not depend on ``draft_size``
DRAFT_MIN_PIXELS = 1 << 24
#: the background that transparent pixels are composited onto
BACKGROUND = (255, 255, 255)
#: what decoding an untrusted file can raise besides OSError: Pillow plugins leak struct/zlib/index errors
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    MemoryError,
)
#: EXIF orientations that turn the image a quarter: the viewer sees width and height swapped
_QUARTER_TURNS = (5, 6, 7, 8)
# Image.open reads the module-global MAX_IMAGE_PIXELS; it is lifted only while this lock is held (header
# parsing, no decoding) so that concurrent callers (verify's threads) never restore each other's value.
_OPEN_LOCK = threading.Lock()


class DecodedImage(NamedTuple):
    """An RGB image and the size of the full-resolution original (orientation applied)."""

    image: Image.Image
    #: ``(width, height)`` of the whole image as a viewer shows it, also when decoded at reduced size
    size: tuple[int, int]


def load_image(path: str | Path, *, draft_size: int | None = None, always_draft: bool = False) -> Image.Image:
    """Decode ``path`` into an RGB image with its EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB. A missing,
    truncated, undecodable or too large file raises :class:`DataError` naming the file.
    ``draft_size``, ``always_draft``: see :func:`decode_image`.
    """
    return decode_image(path, draft_size=draft_size, always_draft=always_draft).image


def decode_image(path: str | Path, *, draft_size: int | None = None, always_draft: bool = False) -> DecodedImage:
    """:func:`load_image` plus the full-resolution size of the image.

    ``draft_size`` promises that the caller will only use the image with its long side at most
    ``draft_size`` pixels. A JPEG above :data:`DRAFT_MIN_PIXELS` is then decoded at 1/2, 1/4 or 1/8 of
    its size, the strongest reduction that keeps both sides at least ``draft_size`` (so a later downscale
    still only shrinks); other images are unaffected.

    ``always_draft=True`` (training: the image is downscaled and augmented anyway) drafts every JPEG, whatever
    its size, with the strongest reduction that keeps its *long* side at least ``draft_size``: a JPEG is
    decoded at reduced size as soon as its long side is at least twice ``draft_size``.
    """
    path = Path(path)
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be a positive number of pixels or None, got {draft_size}")
    try:
        with _open_without_pillow_limit(path) as opened:
            full_size = opened.size
            _draft(opened, draft_size, always_draft)
            if _pixels(opened.size) > MAX_DECODED_PIXELS:
                raise DataError(
                    f"image {path} is too large to decode: {full_size[0]} x {full_size[1]} pixels, more than "
                    f"{MAX_DECODED_PIXELS:,} (oxford_ir.images.MAX_DECODED_PIXELS); downscale it first"
                    + ("" if opened.format == "JPEG" else ", or save it as JPEG, which is decoded at reduced size")
                )
            opened.load()
            orientation = _orientation(opened)
            image = _exif_transpose(opened, path)
            if image is opened:  # closing the file below would also free these pixels
                image = opened.copy()
            if orientation in _QUARTER_TURNS:  # a quarter turn: the viewer sees the sides swapped
                full_size = (full_size[1], full_size[0])
            return DecodedImage(to_rgb(image), (int(full_size[0]), int(full_size[1])))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"cannot decode image {path}: it is a folder, not an image file") from None
    except DataError:
        raise
    except DECODE_ERRORS as error:
        reason = f"{type(error).__name__}: {error}" if not isinstance(error, OSError | SyntaxError) else str(error)
        raise DataError(f"cannot decode image {path}: {reason}; the file is corrupt or not an image") from None


def upright_size(image: str | Path | Image.Image) -> tuple[int, int] | None:
    """``(width, height)`` of an image as a viewer shows it (EXIF quarter turns swap them), from its header
    only; None when the header cannot be read (decoding will then report the file). ``image`` is a file or an
    opened PIL image (an upload)."""
    sizes = upright_sizes(image)
    return None if sizes is None else sizes[0]


def upright_sizes(
    image: str | Path | Image.Image, draft_size: int | None = None
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(full size, decoded size)``, each ``(width, height)`` as a viewer shows it, from the header only.

    The decoded size is what :func:`decode_image` with the same ``draft_size`` gives: smaller than the full
    size for a JPEG above :data:`DRAFT_MIN_PIXELS`, else equal. None when the header cannot be read.
    """
    if isinstance(image, Image.Image):
        full = decoded = image.size
        orientation = _orientation(image)
    else:
        try:
            with _open_without_pillow_limit(Path(image)) as opened:
                full = opened.size
                _draft(opened, draft_size, always_draft=False)
                decoded = opened.size
                orientation = _orientation(opened)
        except DECODE_ERRORS:
            return None
    if orientation in _QUARTER_TURNS:
        return (full[1], full[0]), (decoded[1], decoded[0])
    return (full[0], full[1]), (decoded[0], decoded[1])


def _draft(opened: Image.Image, draft_size: int | None, always_draft: bool) -> None:
    """Configure a JPEG's decoder for reduced size (see :func:`decode_image`); no pixels are decoded here."""
    if draft_size is None or opened.format != "JPEG":
        return
    if always_draft:
        opened.draft("RGB", _long_side_request(opened.size, int(draft_size)))
    elif _pixels(opened.size) > DRAFT_MIN_PIXELS:
        opened.draft("RGB", (int(draft_size), int(draft_size)))


@contextlib.contextmanager
def _open_without_pillow_limit(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)`` with Pillow's decompression-bomb check lifted (ours applies after draft)."""
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    try:
        yield image
    finally:
        image.close()


def _long_side_request(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """The draft request that keeps the long side of ``size`` at least ``long_side``.

    Pillow picks the scale ``s`` in {8, 4, 2, 1} with ``s <= min(W // w, H // h)`` and decodes
    ``ceil(W / s) x ceil(H / s)``; asking 1 pixel of the short side leaves the choice to the long one.
    """
    if int(size[0]) >= int(size[1]):
        return long_side, 1
    return 1, long_side


def _pixels(size: tuple[int, int]) -> int:
    return max(1, int(size[0])) * max(1, int(size[1]))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except DECODE_ERRORS:
        return 1


def _exif_transpose(image: Image.Image, path: Path) -> Image.Image:
    """The image as a viewer shows it; a broken EXIF block leaves it as stored (logged, not fatal)."""
    try:
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        log.warning("%s: unreadable EXIF orientation (%s); using the image as stored", path, error)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB copy of any PIL image.

    16-bit grayscale is rescaled from 0..65535 (and 32-bit int / float from 0..max), not clipped;
    transparency (alpha channel or a palette's transparent index) is composited onto :data:`BACKGROUND`;
    CMYK, YCbCr, bilevel and the rest go through Pillow's conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
