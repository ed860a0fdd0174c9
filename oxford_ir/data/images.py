"""Opening images the same way everywhere: RGB, EXIF orientation applied, clear errors."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from oxford_ir.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` into an RGB image with its EXIF orientation applied.

    Grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB. A missing,
    truncated or undecodable file raises :class:`DataError` naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode image {path}: {error}; the file is corrupt or not an image") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB copy of any PIL image (16-bit and float grayscale are rescaled, not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")
