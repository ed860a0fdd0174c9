"""Thumbnails of indexed images, made on demand and kept in a byte-bounded LRU cache.

The web page never serves files from disk: it asks for ``/thumb/<id>``, an integer into the index, and
gets a JPEG re-encoded here. The path is taken from the index, never from the request, and is checked
to lie inside the index's image root even so (a tampered manifest cannot point the server elsewhere).

A thumbnail must show the picture whose embedding the index holds: :func:`entry_thumbnail` reads the file only
while it still has the size and mtime its index entry recorded (checked on the open file before and after
decoding), else raises :class:`FileChanged`; the cache is keyed by the entry (path, size, mtime), never by a
row number, so a replaced file can never be answered with the thumbnail of the file it replaced, nor the
reverse.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from oxford_ir.errors import DataError
from oxford_ir.images import DECODE_ERRORS, to_rgb


def contained_path(root: Path, path: Path) -> Path:
    """``path`` resolved (symlinks followed), or :class:`DataError` when that leaves ``root``."""
    resolved_root = root.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(resolved_root):
        raise DataError(f"{path} resolves to {resolved}, outside the indexed folder {resolved_root}; not served")
    return resolved


class FileChanged(DataError):
    """The file is not the one the index entry recorded any more: ``deleted``, or replaced or rewritten."""

    def __init__(self, message: str, deleted: bool) -> None:
        super().__init__(message)
        self.deleted = deleted


def entry_key(path: str, file_size: int, mtime_ns: int, size: int) -> tuple[str, int, int, int]:
    """The cache key of the thumbnail of an index entry at ``size`` pixels: the file as recorded, not its row."""
    return (path, int(file_size), int(mtime_ns), int(size))


def entry_thumbnail(path: Path, file_size: int, mtime_ns: int, size: int) -> bytes:
    """:func:`make_thumbnail` of ``path`` if it is still the file of size ``file_size`` and mtime ``mtime_ns``
    from start to end of the decode; :class:`FileChanged` otherwise (the picture would not match the embedding)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; fstat needs the handle
    except FileNotFoundError:
        raise FileChanged(f"image not found: {path}", deleted=True) from None
    except OSError as error:
        raise DataError(f"cannot open image {path}: {error.strerror or error}") from None
    with handle:

        def check() -> None:
            info = os.fstat(handle.fileno())
            if (info.st_size, info.st_mtime_ns) != (file_size, mtime_ns):
                raise FileChanged(f"image {path} changed on disk since it was indexed", deleted=False)

        check()
        try:
            data = make_thumbnail(handle, size, name=path)
        except DataError:
            check()  # rewritten in place while it was decoded: say that, not that the half-written file is corrupt
            raise
        check()
    return data


def make_thumbnail(path: Path | BinaryIO, size: int, quality: int = 85, *, name: Path | None = None) -> bytes:
    """JPEG bytes of ``path`` (or an open binary file, ``name`` for messages) fitted into ``size`` x ``size``
    (aspect kept, never upscaled).

    Decodes as :func:`oxford_ir.images.load_image` does (EXIF orientation, any mode to RGB), but
    lets the JPEG decoder skip detail first (``draft``): a 12-megapixel photo is decoded at 1/8 scale
    for a 256-pixel thumbnail, which is what keeps a page of results fast.
    """
    name = name if name is not None else path
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG only; stays >= size on both sides, so orientation is moot
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise DataError(f"image not found: {name}; the folder changed since indexing, rebuild the index") from None
    except DECODE_ERRORS as error:
        raise DataError(f"cannot decode image {name}: {error}") from None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


class ThumbnailCache:
    """Least-recently-used map ``key -> bytes`` holding at most ``max_bytes`` in total; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: object, value: bytes) -> None:
        """Store ``value``; evict the least recently used items until the total fits (too big: not stored)."""
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
