"""Building and updating the preprocessed image cache (:func:`build_image_cache`), where caches live
(:func:`cache_folder`) and their ``data.cache`` settings (:class:`CacheConfig`).

The format of a cache folder and reading it (:class:`~oxford_ir.data.cache_format.ImageCache`) are
:mod:`oxford_ir.data.cache_format`. Evaluation entries are made by :func:`~oxford_ir.data.datasets.eval_image`,
training entries by :func:`~oxford_ir.data.datasets.train_image`.

Invalidation: an entry is reused while its source has the same size and mtime_ns; a rebuild copies the
pixels of reused entries and decodes only new and changed images. Entries not asked for are kept while their
source is unchanged (another split of the same dataset reuses them), dropped once it changes or disappears.

Atomicity and concurrency: a build holds ``.lock``, writes a new pixel file under a fresh name, fsyncs it,
then replaces ``manifest.json`` (temp file in the same folder, fsync, ``os.replace``), then deletes the old
pixel file. A crash at any moment leaves the previous manifest and its pixel file, or no manifest: never a
manifest naming pixels that are not complete. Several processes (DDP ranks, parallel sweep jobs) may call
:func:`build_image_cache` at once: the lock makes one build while the others wait (logging the pid they wait
for) and then find the cache fresh. Under Lightning, ``prepare_data`` (local rank 0) builds and ``setup``
(every rank) opens.

Faults: a full disk or file-size limit raises :class:`~oxford_ir.data.cache_format.ImageCacheError` naming the
file, after removing the new pixel file; a process killed mid-build leaves a pixel file (or temp manifest) that no
manifest names, which readers ignore and the next build deletes. Decoding workers that die, fail or deliver
nothing for ``worker_timeout`` seconds end the build with one :class:`~oxford_ir.errors.ResourceError`
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
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from oxford_ir.data.cache_format import (
    BUILD_FILE_RE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    CacheSettings,
    ImageCache,
    ImageCacheError,
    Key,
    cache_key,
    open_image_cache,
    source_stat,
)
from oxford_ir.data.config_values import non_negative_int, positive_int
from oxford_ir.data.datasets import train_image
from oxford_ir.data.eval_pixels import BBox, eval_image
from oxford_ir.errors import NO_ROOM, ConfigError, DataError
from oxford_ir.fs import WORKER_TIMEOUT, exclusive_lock, replace_file, worker_call, worker_items, write_new

log = logging.getLogger(__name__)

_WORKER_HINT = (
    "rerun with fewer decoding workers (oxford-ir-data cache --workers, data.cache.num_workers), or 0 to decode in "
    "the main process"
)


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
        stat = source_stat(path)
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
        row = cache.row_of(key)
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
        row = None if old is None else old.row_of(key)
        if row is not None and tuple(int(v) for v in old.sources[row]) == stats[key[0]]:
            reuse.append((key, row))
        else:
            decode.append(key)
    wanted = set(keys)
    if old is not None:  # entries of other images stay while their source is unchanged
        for row, key in enumerate(old.keys):
            if key not in wanted and source_stat(key[0]) == tuple(int(v) for v in old.sources[row]):
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
        if BUILD_FILE_RE.match(entry.name) and entry.name != current:
            with contextlib.suppress(OSError):
                entry.unlink()


class _Busy(Exception):
    pass


def _tidy(folder: Path, current: str) -> None:
    """Delete what a build killed after its commit (or before it) left beside a fresh cache, unless a build is
    running now (its new pixel file is not named yet either); best effort: a read-only folder stays as it is."""
    with contextlib.suppress(OSError):
        if not any(BUILD_FILE_RE.match(p.name) and p.name != current for p in folder.iterdir()):
            return
        with contextlib.suppress(_Busy), exclusive_lock(folder / LOCK_FILE, wait=False, busy=lambda pid: _Busy()):
            _remove_unreferenced(folder)


def preprocess(settings: CacheSettings, path: str, box: BBox | None) -> np.ndarray:
    """The pixels an entry of a cache with ``settings`` stores: ``H x W x 3`` uint8, C order."""
    if settings.kind == "eval":
        image = eval_image(path, settings.long_side, box)
    else:
        image = train_image(path, settings.long_side)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


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
            return index, preprocess(self.settings, path, box)
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


# -- where caches live, at what size, and their settings ------------------------------------------
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


@dataclass(frozen=True)
class CacheConfig:
    """``data.cache``: the preprocessed image cache of training and evaluation images (see
    :mod:`oxford_ir.data.datamodule`)."""

    #: read training and evaluation images from the cache (built in ``prepare_data``)
    enabled: bool = False
    #: folder of the caches; None: ``<data_dir>/cache``
    dir: str | None = None
    #: long side of cached training images; None: ``ceil(image_size / sqrt(augmentation.scale[0]))``
    train_long_side: int | None = None
    #: processes decoding while building; None: ``data.num_workers``
    num_workers: int | None = None
    #: progress bar while building
    progress: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> CacheConfig:
        """Validate ``data.cache`` (a mapping or None); a bad value raises ConfigError naming the key."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise ConfigError(f"data.cache must be a mapping such as {{enabled: true}}, got {config!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown data.cache key(s) {unknown}; known: {sorted(known)}")
        values = dict(config)
        for name in ("enabled", "progress"):
            if name in values and not isinstance(values[name], bool):
                raise ConfigError(f"data.cache.{name} must be true or false, got {values[name]!r}")
        if values.get("dir") is not None:
            if not isinstance(values["dir"], (str, Path)) or not str(values["dir"]).strip():
                raise ConfigError(f"data.cache.dir must be a folder path or null, got {values['dir']!r}")
            values["dir"] = str(values["dir"])
        if values.get("train_long_side") is not None:
            positive_int(values["train_long_side"], "cache.train_long_side")
        if values.get("num_workers") is not None:
            non_negative_int(values["num_workers"], "cache.num_workers")
        return cls(**values)
