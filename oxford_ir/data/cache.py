"""A preprocessed image cache: images decoded, cropped and resized once, read back as raw pixels.

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

Invalidation: an entry is reused while its source has the same size and mtime_ns; a rebuild copies the
pixels of reused entries and decodes only new and changed images. Entries not asked for are kept while their
source is unchanged (another split of the same dataset reuses them), dropped once it changes or disappears.

Atomicity and concurrency: a build holds ``.lock``, writes a new pixel file under a fresh name, fsyncs it,
then replaces ``manifest.json`` (temp file in the same folder, fsync, ``os.replace``), then deletes the old
pixel file. A crash at any moment leaves the previous manifest and its pixel file, or no manifest: never a
manifest naming pixels that are not complete. A reader takes the manifest and the pixel file it names
together (retrying when a build replaced both in between), so it never mixes two builds. Several processes
(DDP ranks, parallel sweep jobs) may call :func:`build_image_cache` at once: the lock makes one build while
the others wait (logging the pid they wait for) and then find the cache fresh. Under Lightning,
``prepare_data`` (local rank 0) builds and ``setup`` (every rank) opens.

Faults: a full disk or file-size limit raises :class:`ImageCacheError` naming the file, after removing the new
pixel file; a process killed mid-build leaves a pixel file (or temp manifest) that no manifest names, which
readers ignore and the next build deletes. Decoding workers that die, fail or deliver nothing for
``worker_timeout`` seconds end the build with one :class:`~oxford_ir.errors.ResourceError`
(:func:`~oxford_ir.fs.worker_items`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from oxford_ir.data.datasets import BBox, eval_image, train_image
from oxford_ir.errors import NO_ROOM, DataError
from oxford_ir.fs import WORKER_TIMEOUT, exclusive_lock, replace_file, worker_call, worker_items, write_new

log = logging.getLogger(__name__)

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
_TEMP_RE = re.compile(r"^(pixels-[0-9a-f]{32}\.u8|manifest\.[0-9a-f]{32}\.tmp)$")
_OPEN_RETRIES = 5
_SHOWN = 5
_WORKER_HINT = (
    "rerun with fewer decoding workers (oxford-ir-data cache --workers, data.cache.num_workers), or 0 to decode in "
    "the main process"
)

Key = tuple[str, tuple[float, float, float, float] | None]


class ImageCacheError(DataError):
    """An image cache folder is unreadable, corrupt, unwritable, or does not hold the images asked for."""


def cache_key(path: str | Path, box: BBox | None = None) -> Key:
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

    def preprocess(self, path: str, box: BBox | None) -> np.ndarray:
        """The pixels an entry stores: ``H x W x 3`` uint8, C order."""
        image = eval_image(path, self.long_side, box) if self.kind == "eval" else train_image(path, self.long_side)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


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

    def rows(self, paths: Sequence[str | Path], boxes: Sequence[BBox | None] | None = None) -> np.ndarray:
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

    def stale(self, paths: Sequence[str | Path], boxes: Sequence[BBox | None] | None = None) -> list[Key]:
        """The ``(path, box)`` keys whose entry is missing or whose source changed since it was cached."""
        out = []
        for i, path in enumerate(paths):
            key = cache_key(path, None if boxes is None else boxes[i])
            row = self._row_of.get(key)
            if row is None or _source_stat(key[0]) != tuple(self.sources[row]):
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


# -- opening ---------------------------------------------------------------------------------------
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


def _source_stat(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return int(stat.st_size), int(stat.st_mtime_ns)


# -- building --------------------------------------------------------------------------------------
def build_image_cache(
    folder: str | Path,
    paths: Sequence[str | Path],
    *,
    kind: str,
    long_side: int | None,
    boxes: Sequence[BBox | None] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> ImageCache:
    """The cache of ``paths`` (cropped to ``boxes``) in ``folder``, built or updated as needed, opened.

    ``kind="eval"``: :func:`~oxford_ir.data.datasets.eval_image` at ``long_side`` (None: full size);
    ``kind="train"``: :func:`~oxford_ir.data.datasets.train_image` at ``long_side``. A fresh cache (every
    image present and unchanged, same settings) is opened without taking the lock or writing anything (but for
    deleting the files a killed build left, when no build runs).
    ``num_workers > 0`` decodes in that many processes; one that fails or delivers nothing for ``worker_timeout``
    seconds (None: no limit) raises :class:`~oxford_ir.errors.ResourceError`. Raises :class:`DataError` naming a
    missing source image, :class:`ImageCacheError` for a folder that cannot be written (or a full disk).
    """
    settings = CacheSettings(kind, long_side)
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} boxes for {len(paths)} paths; give one per path or None")
    keys = list(dict.fromkeys(cache_key(p, None if boxes is None else boxes[i]) for i, p in enumerate(paths)))
    folder = Path(folder)
    stats = _stat_sources(keys, folder)
    cache = _open_if_fresh(folder, settings, keys, stats, log_reason=False)
    if cache is not None:
        _tidy(folder, cache.pixel_file)
        return cache
    _make_folder(folder)
    with _build_lock(folder):
        # another process may have built it while we waited for the lock
        cache = _open_if_fresh(folder, settings, keys, stats, log_reason=True)
        if cache is not None:
            return cache
        old = _open_same_settings(folder, settings)
        _write_cache(
            folder, settings, keys, stats, old, num_workers=num_workers, progress=progress, timeout=worker_timeout
        )
        _remove_unreferenced(folder)
        return open_image_cache(folder)


def _stat_sources(keys: Sequence[Key], folder: Path) -> dict[str, tuple[int, int]]:
    stats: dict[str, tuple[int, int]] = {}
    for path, _ in keys:
        if path in stats:
            continue
        stat = _source_stat(path)
        if stat is None:
            raise DataError(
                f"image not found: {path} (asked for by the image cache {folder}); restore it or leave it out"
            )
        if not os.path.isfile(path):  # a FIFO or device would block the process reading it
            raise DataError(
                f"{path} is not a regular file (a FIFO, socket or device; asked for by the image cache {folder}); "
                "replace it with the image file or leave it out"
            )
        stats[path] = stat
    return stats


def _open_if_fresh(
    folder: Path, settings: CacheSettings, keys: Sequence[Key], stats: dict[str, tuple[int, int]], *, log_reason: bool
) -> ImageCache | None:
    """The cache in ``folder`` when it holds every key, unchanged, with these settings; else None."""
    if not (folder / MANIFEST_FILE).exists():
        return None
    try:
        cache = open_image_cache(folder)
    except ImageCacheError as error:
        if log_reason:
            log.warning("%s; rebuilding it", error)
        return None
    if cache.manifest["settings"] != settings.as_dict():
        if log_reason:
            log.info(
                "image cache %s was built with other settings (%s); rebuilding it", folder, cache.manifest["settings"]
            )
        return None
    for key in keys:
        row = cache._row_of.get(key)
        if row is None or tuple(int(v) for v in cache.sources[row]) != stats[key[0]]:
            return None
    return cache


def _open_same_settings(folder: Path, settings: CacheSettings) -> ImageCache | None:
    """The existing cache if its entries can be reused (same settings), else None."""
    if not (folder / MANIFEST_FILE).exists():
        return None
    try:
        cache = open_image_cache(folder)
    except ImageCacheError:
        return None
    return cache if cache.manifest["settings"] == settings.as_dict() else None


def _write_cache(
    folder: Path,
    settings: CacheSettings,
    keys: list[Key],
    stats: dict[str, tuple[int, int]],
    old: ImageCache | None,
    *,
    num_workers: int,
    progress: bool,
    timeout: float | None = WORKER_TIMEOUT,
) -> None:
    """Write a new pixel file and commit its manifest (the lock is held)."""
    reuse: list[tuple[Key, int]] = []
    decode: list[Key] = []
    for key in keys:
        row = None if old is None else old._row_of.get(key)
        if row is not None and tuple(int(v) for v in old.sources[row]) == stats[key[0]]:
            reuse.append((key, row))
        else:
            decode.append(key)
    wanted = set(keys)
    if old is not None:  # entries of other images stay while their source is unchanged
        for row, key in enumerate(old.keys):
            if key not in wanted and _source_stat(key[0]) == tuple(int(v) for v in old.sources[row]):
                reuse.append((key, row))
                stats.setdefault(key[0], tuple(int(v) for v in old.sources[row]))
    log.info(
        "image cache %s: decoding %d images, reusing %d (%s, long side %s)",
        folder,
        len(decode),
        len(reuse),
        settings.kind,
        settings.long_side,
    )
    name = f"pixels-{uuid.uuid4().hex}.u8"
    entries: list[list[Any]] = []
    pixel_path = folder / name
    size = 0

    def fill(handle: Any) -> None:
        nonlocal size
        for key, row in reuse:
            data = old.pixels(row)
            handle.write(memoryview(data).cast("B"))
            entries.append(_entry(key, stats[key[0]], size, data.shape))
            size += data.nbytes
        with tqdm(total=len(decode), disable=not progress, desc=f"caching {folder.name}", unit="img") as bar:
            for key, data in _preprocessed(decode, settings, num_workers, timeout):
                handle.write(memoryview(data).cast("B"))
                entries.append(_entry(key, stats[key[0]], size, data.shape))
                size += data.nbytes
                bar.update(1)

    try:
        with _writable(folder, "write"):
            write_new(pixel_path, fill)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "settings": settings.as_dict(),
            "pixels": {"file": name, "bytes": size},
            "count": len(entries),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "entries": entries,
        }
        _commit_manifest(folder, manifest)
    except BaseException:
        # the manifest was not replaced (or this is the new file it names: then it is complete): only an
        # uncommitted pixel file is removed
        if not _manifest_names(folder, name):
            with contextlib.suppress(OSError):
                pixel_path.unlink()
        raise


def _entry(key: Key, stat: tuple[int, int], offset: int, shape: tuple[int, ...]) -> list[Any]:
    path, box = key
    height, width = int(shape[0]), int(shape[1])
    return [path, None if box is None else list(box), int(stat[0]), int(stat[1]), int(offset), height, width]


def _manifest_names(folder: Path, name: str) -> bool:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())["pixels"]["file"] == name
    except (OSError, ValueError, TypeError, KeyError):
        return False


def _commit_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
    with _writable(folder, "write"):
        replace_file(folder / MANIFEST_FILE, text.encode(), temp=folder / f"manifest.{uuid.uuid4().hex}.tmp")


def _remove_unreferenced(folder: Path) -> None:
    """Delete pixel files and temp manifests no manifest names (older builds, crashed builds); the lock is held."""
    try:
        current = json.loads((folder / MANIFEST_FILE).read_text())["pixels"]["file"]
    except (OSError, ValueError, TypeError, KeyError):
        return
    for entry in folder.iterdir():
        if _TEMP_RE.match(entry.name) and entry.name != current:
            with contextlib.suppress(OSError):
                entry.unlink()


class _Busy(Exception):
    pass


def _tidy(folder: Path, current: str) -> None:
    """Delete what a build killed after its commit (or before it) left beside a fresh cache, unless a build is
    running now (its new pixel file is not named yet either); best effort: a read-only folder stays as it is."""
    with contextlib.suppress(OSError):
        if not any(_TEMP_RE.match(p.name) and p.name != current for p in folder.iterdir()):
            return
        with contextlib.suppress(_Busy), exclusive_lock(folder / LOCK_FILE, wait=False, busy=lambda pid: _Busy()):
            _remove_unreferenced(folder)


class _Preprocess(Dataset):
    """Entry ``i`` -> ``(i, pixels)``, or ``(i, message)`` when the source cannot be decoded (no worker traceback)."""

    def __init__(self, keys: Sequence[Key], settings: CacheSettings) -> None:
        self.keys = list(keys)
        self.settings = settings

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | str]:
        return worker_call(lambda: self.describe(index), lambda: self._item(index), _WORKER_HINT)

    def _item(self, index: int) -> tuple[int, np.ndarray | str]:
        path, box = self.keys[index]
        try:
            return index, self.settings.preprocess(path, box)
        except DataError as error:
            return index, str(error)

    def describe(self, index: int) -> str:
        path, box = self.keys[index]
        return f"image {index + 1} of {len(self.keys)} ({path}{'' if box is None else f' box {list(box)}'})"


def _as_is(item: Any) -> Any:
    return item


def _preprocessed(
    keys: Sequence[Key], settings: CacheSettings, num_workers: int, timeout: float | None = WORKER_TIMEOUT
) -> Iterator[tuple[Key, np.ndarray]]:
    """``(key, pixels)`` of every key in order, decoded in ``num_workers`` processes (0: this one)."""
    if not keys:
        return
    dataset = _Preprocess(keys, settings)
    workers = max(0, min(int(num_workers), len(keys)))
    if workers == 0:
        results: Any = (dataset[i] for i in range(len(dataset)))
    else:
        results = worker_items(
            dataset,
            num_workers=workers,
            timeout=timeout,
            describe=dataset.describe,
            hint=_WORKER_HINT,
            timeout_key=None,
            batch_size=None,
            shuffle=False,
            collate_fn=_as_is,
        )
    for index, data in results:
        if isinstance(data, str):
            raise DataError(f"{data} (while building the image cache)")
        yield keys[index], np.ascontiguousarray(data, dtype=np.uint8)


# -- files and locks -------------------------------------------------------------------------------
@contextlib.contextmanager
def _writable(folder: Path, action: str) -> Iterator[None]:
    """Turn an OS error while writing into :class:`ImageCacheError` naming the folder (and file) and the fix."""
    try:
        yield
    except OSError as error:
        reason = NO_ROOM.get(errno.errorcode.get(error.errno or 0, ""))
        if reason is not None:
            where = f" writing {error.filename}" if error.filename else ""
            raise ImageCacheError(
                f"{reason}{where} (the image cache in {folder}): free space (or raise the limit) and run again, or "
                "build the cache on a disk with room (data.cache.dir, oxford-ir-data cache --dir); the previous "
                "cache is kept and nothing half-written is used"
            ) from error
        raise ImageCacheError(
            f"cannot {action} the image cache in {folder}: {error.strerror or error}; set data.cache.dir to a "
            "writable folder with enough space, or disable the cache (data.cache.enabled=false)"
        ) from None


def _make_folder(folder: Path) -> None:
    with _writable(folder, "create"):
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` for the whole build: one process builds, the others wait."""

    def waiting(pid: int | None) -> None:
        who = f"another process (pid {pid})" if pid is not None else "another process"
        log.info("image cache %s: %s is building it; waiting", folder, who)

    with _writable(folder, "lock"):
        (folder / LOCK_FILE).touch()
    with exclusive_lock(folder / LOCK_FILE, wait=True, busy=waiting):
        yield


def cache_folder(cache_dir: str | Path, kind: str, dataset: str, long_side: int | None) -> Path:
    """``<cache_dir>/<kind>-<dataset folder>-<long side or "full">``: the folder of one cache.

    One folder per kind, dataset and size, so that runs at other sizes (a sweep) never rebuild each other's
    cache; the benchmarks sharing a dataset folder (oxford5k and roxford5k) share its caches.
    """
    CacheSettings(kind, long_side)
    return Path(cache_dir) / f"{kind}-{dataset}-{'full' if long_side is None else int(long_side)}"


def default_train_long_side(image_size: int, scale_min: float) -> int:
    """``ceil(image_size / sqrt(scale_min))``: the long side at which the smallest RandomResizedCrop is not upscaled.

    A crop of ``scale_min`` of the area of a square image of that side is ``image_size`` wide; larger crops
    are downscaled. (Elongated images and extreme aspect ratios of the crop can still upscale a little.)
    """
    if not 0 < scale_min <= 1:
        raise ValueError(f"scale_min must be in (0, 1], got {scale_min}")
    return max(1, math.ceil(image_size / math.sqrt(scale_min) - 1e-9))
