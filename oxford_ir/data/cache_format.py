"""The on-disk format of the preprocessed image cache, and reading it: :class:`ImageCache`, :func:`open_image_cache`.

A cache holds images decoded, cropped and resized once, as raw pixels (built by :mod:`oxford_ir.data.cache`).
Decoding a 1024 px JPEG and resizing it with Lanczos costs tens of milliseconds of CPU; a GPU trains on
hundreds of images per second. The cache pays that cost once per image and size: every later epoch,
evaluation and run reads the finished ``H x W x 3`` uint8 pixels.

On-disk format (``format_version`` 1) of a cache folder::

    manifest.json        what the cache holds (below); replacing it is the commit of a build
    pixels-<token>.u8    every image's pixels, row-major H x W x 3 uint8, back to back
    .lock                held (flock) while a build runs; holds the pid of the process building

``manifest.json`` holds ``format`` ("oxford-ir-image-cache"), ``format_version``, ``settings`` (``kind``:
"eval" or "train", ``long_side``, the ``preprocessing`` text and the ``pillow`` version: a change of any
invalidates every entry), ``pixels`` (``file`` and ``bytes``) and ``entries``: one list per image,
``[path, box, size, mtime_ns, offset, height, width]``: absolute source path, crop box ``[x1, y1, x2, y2]``
or null, the source file's size and mtime_ns when it was cached, where its pixels start, their shape.

Why one raw file read through ``np.memmap``: reading an entry is a slice of a memory map, no decode, no
per-image ``open``/``stat``, no allocation but the copy handed to the caller; DataLoader workers and DDP
processes on one machine share the operating system's page cache of a single file, so a dataset that fits
in RAM is read from memory after the first epoch. Compressed formats (PNG, npz) would be a few times smaller
but cost a decode again; re-encoded JPEG would change the pixels, and evaluation must stay bit-identical.
The price is disk: 3 bytes a pixel, about 2.4 MB for a 1024 x 768 image (12 GB for Oxford5k at 1024 px,
6 GB at the 724 px of training at 362 px).

Keys: an entry is ``(source path, crop box or None)``. Evaluation entries are made by
:func:`~oxford_ir.data.datasets.eval_image` (queries cropped to their box before the resize, exactly as
:class:`~oxford_ir.data.datasets.ImageListDataset` does uncached, so tensors are bit-identical); training
entries by :func:`~oxford_ir.data.datasets.train_image` (long side at ``long_side``, JPEG draft mode).

Reading while a build runs: a reader takes the manifest and the pixel file it names together (retrying when a
build replaced both in between), so it never mixes two builds; pixel files and temp manifests that no manifest
names (:data:`BUILD_FILE_RE`, left by a build running or killed) are ignored.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from oxford_ir.errors import DataError

FORMAT_NAME = "oxford-ir-image-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
#: what each kind of entry is; part of the settings, so changing the preprocessing invalidates old caches
PREPROCESSING = {
    "eval": (
        "v1: RGB with EXIF orientation, decoded in full (no draft), cropped to the box (PIL rounding), "
        "Lanczos thumbnail (reducing_gap=None) to long_side * max(crop) / max(full), never upscaled"
    ),
    "train": (
        "v1: RGB with EXIF orientation, JPEG draft keeping the long side >= long_side, "
        "Lanczos thumbnail (reducing_gap=None) to long_side, never upscaled"
    ),
}
KINDS = tuple(PREPROCESSING)
_PIXELS_RE = re.compile(r"^pixels-[0-9a-f]{32}\.u8$")
#: a pixel file or temp manifest a build writes (the current pixel file aside, left by older or killed builds)
BUILD_FILE_RE = re.compile(r"^(pixels-[0-9a-f]{32}\.u8|manifest\.[0-9a-f]{32}\.tmp)$")
_OPEN_RETRIES = 5
_SHOWN = 5

Key = tuple[str, tuple[float, float, float, float] | None]


class ImageCacheError(DataError):
    """An image cache folder is unreadable, corrupt, unwritable, or does not hold the images asked for."""


def cache_key(path: str | Path, box: Sequence[float] | None = None) -> Key:
    """The key of an entry: absolute source path (not resolved: symlinks stay as given), box as four floats."""
    key_box = None if box is None else tuple(float(v) for v in box)
    if key_box is not None and len(key_box) != 4:
        raise DataError(f"{path}: bounding box {list(box)} must be four numbers [x1, y1, x2, y2]")
    return os.path.abspath(os.fspath(path)), key_box


@dataclass(frozen=True)
class CacheSettings:
    """What every entry of a cache is: its kind, the long side, and the code and library that made it."""

    kind: str
    long_side: int | None

    def __post_init__(self) -> None:
        if self.kind not in PREPROCESSING:
            raise ValueError(f"image cache kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.long_side is not None and (isinstance(self.long_side, bool) or int(self.long_side) < 1):
            raise ValueError(f"long_side must be a positive number of pixels or None, got {self.long_side!r}")
        if self.kind == "train" and self.long_side is None:
            raise ValueError("a training image cache needs a long_side")
        if self.long_side is not None:
            object.__setattr__(self, "long_side", int(self.long_side))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "long_side": self.long_side,
            "preprocessing": PREPROCESSING[self.kind],
            "pillow": PIL.__version__,
        }


class ImageCache:
    """An opened, read-only image cache (see the module doc); picklable: a DataLoader worker maps the file again.

    Look-ups: :meth:`rows` turns paths (and boxes) into row numbers once; :meth:`pixels` reads a row.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], pixels: np.ndarray | None) -> None:
        self.folder = Path(folder)
        # everything but the entries, which live on as arrays (a worker gets one copy, not two)
        self.manifest = {key: value for key, value in manifest.items() if key != "entries"}
        settings = manifest["settings"]
        self.settings = CacheSettings(settings["kind"], settings["long_side"])
        self.pixel_file = str(manifest["pixels"]["file"])
        self.pixel_bytes = int(manifest["pixels"]["bytes"])
        entries = manifest["entries"]
        self.keys: list[Key] = [(e[0], None if e[1] is None else tuple(float(v) for v in e[1])) for e in entries]
        self.sources = np.array([[e[2], e[3]] for e in entries], dtype=np.int64).reshape(-1, 2)
        self.offsets = np.array([e[4] for e in entries], dtype=np.int64)
        self.shapes = np.array([[e[5], e[6]] for e in entries], dtype=np.int64).reshape(-1, 2)
        self._row_of = {key: row for row, key in enumerate(self.keys)}
        self._pixels = pixels

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def long_side(self) -> int | None:
        return self.settings.long_side

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._row_of

    def row_of(self, key: Key) -> int | None:
        """The row of the entry ``key`` (see :func:`cache_key`), or None when the cache does not hold it."""
        return self._row_of.get(key)

    def rows(self, paths: Sequence[str | Path], boxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """The row of each ``(path, box)``; an image the cache does not hold raises :class:`ImageCacheError`."""
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(boxes)} boxes for {len(paths)} paths; give one per path or None")
        keys = [cache_key(p, None if boxes is None else boxes[i]) for i, p in enumerate(paths)]
        missing = [key for key in keys if key not in self._row_of]
        if missing:
            shown = ", ".join(p if b is None else f"{p} box {list(b)}" for p, b in missing[:_SHOWN])
            raise ImageCacheError(
                f"the image cache {self.folder} does not hold {len(missing)} of the {len(keys)} images asked for "
                f"({shown}); build it for these images (build_image_cache, or data.cache.enabled=true, which "
                "builds it in prepare_data)"
            )
        return np.array([self._row_of[key] for key in keys], dtype=np.int64)

    def stale(self, paths: Sequence[str | Path], boxes: Sequence[Sequence[float] | None] | None = None) -> list[Key]:
        """The ``(path, box)`` keys whose entry is missing or whose source changed since it was cached."""
        out = []
        for i, path in enumerate(paths):
            key = cache_key(path, None if boxes is None else boxes[i])
            row = self.row_of(key)
            if row is None or source_stat(key[0]) != tuple(self.sources[row]):
                out.append(key)
        return out

    # -- reading ---------------------------------------------------------------------------------
    def pixels(self, row: int) -> np.ndarray:
        """The ``H x W x 3`` uint8 pixels of ``row`` (a copy: safe to keep and to modify)."""
        height, width = (int(v) for v in self.shapes[row])
        start = int(self.offsets[row])
        flat = self._memmap()[start : start + height * width * 3]
        return np.array(flat, dtype=np.uint8).reshape(height, width, 3)

    def image(self, row: int) -> Image.Image:
        """The pixels of ``row`` as a PIL RGB image (what the training augmentation takes)."""
        return Image.fromarray(self.pixels(row), mode="RGB")

    def _memmap(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = _map_pixels(self.folder, self.pixel_file, self.pixel_bytes, reopened=True)
        return self._pixels

    def __getstate__(self) -> dict[str, Any]:
        # never pickle the memory map: NumPy would copy every pixel into the pickle
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder}, {len(self)} {self.kind} images, long_side={self.long_side})"


# -- opening -----------------------------------------------------------------------------------------
def open_image_cache(folder: str | Path) -> ImageCache:
    """Open a built cache for reading; a missing or corrupt one raises :class:`ImageCacheError` naming the folder."""
    folder = Path(folder)
    previous = None
    for _ in range(_OPEN_RETRIES):
        manifest = _read_manifest(folder)
        name = manifest["pixels"]["file"]
        try:
            pixels = _map_pixels(folder, name, int(manifest["pixels"]["bytes"]))
        except FileNotFoundError:
            # a build committed a new manifest and deleted this pixel file between our two reads: read again
            if previous == name:
                break
            previous = name
            continue
        return ImageCache(folder, manifest, pixels)
    raise ImageCacheError(_corrupt(folder, f"its pixel file {previous} is missing"))


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ImageCacheError(
            f"no image cache in {folder} ({MANIFEST_FILE} not found); build it with build_image_cache or "
            "data.cache.enabled=true"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ImageCacheError(_corrupt(folder, f"{MANIFEST_FILE} is unreadable: {error}")) from None
    try:
        manifest = json.loads(text)
        _check_manifest(manifest)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise ImageCacheError(_corrupt(folder, f"{MANIFEST_FILE} is malformed: {error}")) from None
    return manifest


def _check_manifest(manifest: Any) -> None:
    """Raise ValueError/TypeError/KeyError unless ``manifest`` is a well-formed, self-consistent manifest."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"not an {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    settings = manifest["settings"]
    CacheSettings(settings["kind"], settings["long_side"])
    name, size = manifest["pixels"]["file"], manifest["pixels"]["bytes"]
    if not isinstance(name, str) or not _PIXELS_RE.match(name) or not isinstance(size, int) or size < 0:
        raise ValueError(f"bad pixels record {manifest['pixels']!r}")
    entries = manifest["entries"]
    if not isinstance(entries, list):
        raise TypeError("entries is not a list")
    for entry in entries:
        path, box, src_size, mtime, offset, height, width = entry
        if not isinstance(path, str) or not (box is None or (isinstance(box, list) and len(box) == 4)):
            raise ValueError(f"bad entry {entry!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (src_size, mtime, offset, height, width)):
            raise TypeError(f"bad entry {entry!r}")
        if offset < 0 or height < 1 or width < 1 or offset + height * width * 3 > size:
            raise ValueError(f"entry {path} lies outside the {size} bytes of the pixel file")


def _map_pixels(folder: Path, name: str, size: int, *, reopened: bool = False) -> np.ndarray | None:
    """Memory-map the pixel file and check its size; FileNotFoundError passes through (see the retry above)."""
    path = folder / name
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        if reopened:
            raise ImageCacheError(
                f"the image cache {folder} was rebuilt by another process since this one opened it (its pixel file "
                f"{name} is gone); restart this run to read the new cache"
            ) from None
        raise
    if actual != size:
        raise ImageCacheError(_corrupt(folder, f"its pixel file {name} has {actual} bytes, the manifest says {size}"))
    if size == 0:
        return np.zeros(0, dtype=np.uint8)
    try:
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    except OSError as error:
        raise ImageCacheError(_corrupt(folder, f"its pixel file {name} cannot be mapped: {error}")) from None


def _corrupt(folder: Path, reason: str) -> str:
    return (
        f"the image cache {folder} is corrupt: {reason}. Delete the folder (it holds only derived pixels), or build "
        "it again (build_image_cache, `oxford-ir-data cache`, or a run with data.cache.enabled=true rebuilds it)"
    )


def source_stat(path: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a source image, as its entry records them; None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return int(stat.st_size), int(stat.st_mtime_ns)
