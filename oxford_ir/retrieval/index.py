"""A retrieval index of any image collection: embeddings of every image, built incrementally and atomically.

On-disk format (``format_version`` 1) of an index folder ``<out>/``::

    CURRENT               one line: the name of the live version folder, e.g. "v000003"
    v000003/
      manifest.json       what the index is (below), with the sha256 of the two data files
      embeddings.npy      N x D float16 or float32 (NumPy .npy, C order), one L2-normalised row per image
      entries.json        N records {"path", "size", "mtime_ns", "width", "height"}, row i of the embeddings
    report.json           what the last run did: added/updated/removed/kept counts, skipped files and why
    .lock                 held (flock) while a build runs; holds the pid of the process building

``manifest.json`` holds ``format`` ("oxford-ir-index"), ``format_version``, ``complete`` (false for a
checkpoint of an interrupted build), ``model`` (:class:`~oxford_ir.retrieval.model_spec.ModelSpec` as a dict:
checkpoint path or embedder config), ``model_description``, ``model_fingerprint``, ``fingerprint`` (of the model
*and* the extraction settings: what query embeddings must match), ``extraction`` (``image_size``, ``scales``,
``pooling_power``, ``preprocessing``, ``batching``, ``precision`` and, for bucket batching, ``buckets``: the
input shapes chosen from the collection when it was first indexed, which updates and queries reuse, so that
an image embeds the same whether it came in the first build, an update or a search), ``dtype``, ``count``,
``embedding_dim``, ``images`` (absolute ``root`` that entry paths are relative to, and the ``source`` given on
the command line), ``files`` (``sha256`` and ``bytes`` of embeddings.npy and entries.json), ``skipped`` (files
that could not be decoded, with the size and mtime they had, so an unchanged bad file is not decoded again),
``created`` and ``tool`` versions.

Atomicity: a build writes a complete new version folder, fsyncs it, then replaces ``CURRENT`` with
``os.replace``; older versions are deleted only after that. A crash, Ctrl-C or SIGKILL at any moment leaves
``CURRENT`` naming a complete version, which :meth:`RetrievalIndex.load` verifies against its checksums; a
version folder that is not named by ``CURRENT`` is never read, and a failed write (disk full, file-size limit)
removes it at once (a killed process leaves it to the next build, which deletes it). A long build also commits
checkpoints (every ``checkpoint_every`` seconds, default 60, but never more often than 20 times the time the
last one took to write, so that they cost at most ~5% of the run; and when interrupted or failing): valid
indexes marked ``complete: false`` whose finished rows the next run reuses, so a SIGKILL loses at most the last
interval.

Concurrency: a build holds ``.lock`` (``flock``, released by the kernel when the process dies, also by
SIGKILL); a second build of the same folder is refused with a message naming the pid of the first.

Incremental updates: a file is unchanged when its relative path, size and mtime_ns equal those recorded;
only new and changed files are embedded, deleted ones dropped, the rows of the rest copied bit for bit.
Rows are reused only when the existing index has the same fingerprint, images root and dtype;
``incremental="auto"`` (default) otherwise re-embeds everything with a warning, ``"strict"`` refuses
(:class:`~oxford_ir.errors.IndexFormatError`), ``"off"`` always re-embeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob as _glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oxford_ir.errors import ConfigError, DataError, IndexFormatError
from oxford_ir.extraction.buckets import MAX_SHAPES
from oxford_ir.extraction.distributed import rank_and_world
from oxford_ir.extraction.embedding import embed_shard, gathered, plan_for_model, resolve_decode
from oxford_ir.extraction.planning import shard
from oxford_ir.fs import WORKER_TIMEOUT, exclusive_lock, fsync_dir, replace_file, write_new
from oxford_ir.hashing import file_sha256
from oxford_ir.images import IMAGE_EXTENSIONS, upright_size
from oxford_ir.retrieval.model_spec import ModelSpec

log = logging.getLogger(__name__)

FORMAT_NAME = "oxford-ir-index"
FORMAT_VERSION = 1
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
ENTRIES_FILE = "entries.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"
DTYPES = ("float16", "float32")
INCREMENTAL_MODES = ("auto", "strict", "off")
#: how images become network input; part of the fingerprint, so changing it invalidates old indexes
PREPROCESSING = (
    "v1: RGB with EXIF orientation, long side downscaled to image_size (Lanczos, never upscaled), "
    "ImageNet mean/std; JPEGs over 16.8 Mpx decoded in draft mode"
)
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_OWN_NAMES = re.compile(r"^(CURRENT|CURRENT\.tmp|report\.json|report\.json\.tmp|\.lock|v\d{6,})$")
#: paths listed per category in report.json (the counts are always complete; skipped files are all listed)
_LISTED_PATHS = 1000
#: seconds between checkpoints of a long build (index.checkpoint_every)
CHECKPOINT_EVERY = 60.0
#: a checkpoint waits at least this many times as long as the last one took to write: <= ~5% of the run
_CHECKPOINT_SHARE = 20


# -- entries and sources ---------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexEntry:
    """One indexed image: ``path`` relative to the index root (posix), file size and mtime, pixel size."""

    path: str
    size: int
    mtime_ns: int
    width: int
    height: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexEntry:
        return cls(str(data["path"]), int(data["size"]), int(data["mtime_ns"]), int(data["width"]), int(data["height"]))


@dataclass(frozen=True)
class SkippedImage:
    """A file that is not in the index, and why; ``size``/``mtime_ns`` are None when it could not be stat'ed."""

    path: str
    reason: str
    size: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class ImageSource:
    """The images to index: an absolute ``root`` and sorted ``paths`` relative to it (posix).

    Unpacks as ``root, paths = resolve_images(...)``; ``spec`` is what the user gave (for messages).
    """

    root: Path
    paths: list[str]
    spec: str = ""
    #: images whose shapes the bucket table also covers though they are not indexed: a benchmark's query crops
    #: ``(absolute path, box)``, so that its index embeds every image as ``oxford-ir-eval`` does
    queries: tuple[tuple[Path, tuple[float, ...] | None], ...] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.root, self.paths))

    def __len__(self) -> int:
        return len(self.paths)


def resolve_images(
    spec: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, allow_missing_images: bool = False
) -> ImageSource:
    """The images named by ``spec``: a folder (searched recursively), a single image file, a glob
    (``photos/**/*.jpg``; its root is the folder before the first wildcard), or ``benchmark:<name>``
    (that benchmark's database images, in its image-list order, read from ``data_dir``).

    Folders and globs keep files with an image extension (:data:`~oxford_ir.images.IMAGE_EXTENSIONS`,
    any case) and skip hidden files and folders; symbolic links to folders are not followed.
    """
    text = str(spec).strip()
    if not text:
        raise ConfigError("images= is empty: give a folder, a quoted glob ('photos/**/*.jpg') or benchmark:<name>")
    if text.startswith("benchmark:"):
        return _benchmark_images(text, data_dir, allow_missing_images)
    path = Path(text).expanduser()
    if path.is_dir():
        root = path.resolve()
        paths = sorted(_walk_images(root))
        if not paths:
            raise DataError(
                f"images={text}: no image files in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return ImageSource(root, paths, text)
    if path.is_file():
        return ImageSource(path.resolve().parent, [path.name], text)
    if any(c in text for c in "*?["):
        return _glob_images(text)
    raise DataError(
        f"images={text}: no such folder or file; give a folder of images, a quoted glob ('photos/**/*.jpg') "
        "or benchmark:<name>"
    )


def _walk_images(root: Path) -> Iterator[str]:
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield (base / name).relative_to(root).as_posix()


def _glob_images(pattern: str) -> ImageSource:
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    root = Path(os.path.abspath(Path(*fixed))) if fixed else Path.cwd()
    matches = [Path(m) for m in _glob.glob(str(Path(pattern).expanduser()), recursive=True)]
    files = [m for m in matches if m.is_file() and m.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(
            f"images={pattern}: the pattern matches no image files ({', '.join(IMAGE_EXTENSIONS)}); "
            "quote it so the shell does not expand it, and check the folder"
        )
    paths = sorted(dict.fromkeys(Path(os.path.abspath(m)).relative_to(root).as_posix() for m in files))
    return ImageSource(root, paths, pattern)


def _benchmark_images(text: str, data_dir: str | os.PathLike | None, allow_missing_images: bool) -> ImageSource:
    from oxford_ir.benchmarks.registry import load_benchmark

    name = text.split(":", 1)[1].strip()
    if data_dir is None:
        raise ConfigError(f"images={text}: a benchmark needs paths.data_dir, the folder holding its dataset")
    benchmark = load_benchmark(name, data_dir, allow_missing_images=allow_missing_images)
    paths = list(dict.fromkeys(f"{n}{benchmark.extension}" for n in benchmark.imlist))
    queries = tuple(
        (Path(p).resolve(), None if b is None else tuple(float(v) for v in b))
        for p, b in zip(benchmark.query_paths, benchmark.query_bboxes, strict=True)
    )
    return ImageSource(Path(benchmark.image_dir).resolve(), paths, text, queries)


def index_fingerprint(
    model_fingerprint: str,
    image_size: int | None,
    scales: Sequence[float],
    *,
    batching: str = "bucket",
    precision: str = "32",
) -> str:
    """Hex sha256 of everything an embedding depends on: the model, image size, scales and preprocessing.

    The approximate options (bucket or aspect batching, bf16) change the embeddings slightly, so they are part
    of it; exact shape batching and float32 are left out, so indexes written before the options existed (all
    exact) keep their fingerprint. The bucket shapes themselves are stored in the manifest, not here: an
    update reuses the index's own.
    """
    payload = {
        "model": model_fingerprint,
        "image_size": None if image_size is None else int(image_size),
        "scales": [float(s) for s in scales],
        "preprocessing": PREPROCESSING,
    }
    if batching != "shape":
        payload["batching"] = batching
    if precision != "32":
        payload["precision"] = precision
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- the loaded index ------------------------------------------------------------------------------
@dataclass
class RetrievalIndex:
    """A loaded, checksum-verified index (see the module docstring for the format)."""

    path: Path
    root: Path
    entries: list[IndexEntry]
    embeddings: np.ndarray
    model: ModelSpec
    image_size: int | None
    scales: list[float]
    fingerprint: str
    dtype: str
    embedding_dim: int
    model_fingerprint: str = ""
    #: how the images were batched (``bucket``, ``shape`` or ``aspect``) and, for buckets, the input shapes
    batching: str = "shape"
    buckets: tuple[tuple[int, int], ...] = ()
    precision: str = "32"
    complete: bool = True
    version: str = ""
    manifest: dict = field(default_factory=dict, repr=False)
    skipped: list[SkippedImage] = field(default_factory=list, repr=False)
    _positions: dict[str, int] | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def vectors(self, dtype: Any = np.float32) -> np.ndarray:
        """The embeddings as ``dtype`` (a new array unless already that dtype)."""
        return np.asarray(self.embeddings, dtype=dtype)

    def image_path(self, i: int) -> Path:
        """Absolute path of the image of row ``i``."""
        return self.root / self.entries[i].path

    def positions(self, paths: Sequence[str]) -> np.ndarray:
        """Row of each relative path; a path not in the index raises :class:`IndexFormatError`."""
        if self._positions is None:
            self._positions = {e.path: i for i, e in enumerate(self.entries)}
        missing = [p for p in paths if p not in self._positions]
        if missing:
            raise IndexFormatError(
                f"index {self.path} has no row for {len(missing)} image(s) ({', '.join(missing[:5])}); "
                f"update it with {_rebuild_command(self.path, self.manifest)}"
            )
        return np.asarray([self._positions[p] for p in paths], dtype=np.int64)

    def build_model(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The index's model, after checking that its files are still those the index was built with."""
        current = self.model.fingerprint()
        if self.model_fingerprint and current != self.model_fingerprint:
            raise IndexFormatError(
                f"index {self.path}: its model ({self.model.describe()}) changed on disk since the index was built; "
                f"query embeddings would not match. Rebuild it with {_rebuild_command(self.path, self.manifest)}"
            )
        return self.model.build(device)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expected_fingerprint: str | None = None,
        expected_dim: int | None = None,
        mmap: bool = False,
        warn_incomplete: bool = True,
    ) -> RetrievalIndex:
        """Load and verify the index in folder ``path``.

        Checks the format, both checksums and the shapes; ``expected_fingerprint`` / ``expected_dim`` also
        check that the index was built by the model (and settings) the caller will embed queries with.
        ``mmap`` maps the embeddings read-only instead of reading them into memory. Any problem raises
        :class:`IndexFormatError` naming the folder and the command that rebuilds it.
        """
        path = Path(path).expanduser()
        for attempt in range(3):  # a build may replace CURRENT and delete the old version while we read it
            version = _read_current(path)
            try:
                index = _load_version(path, version, mmap=mmap)
                break
            except FileNotFoundError as error:
                if attempt < 2 and _read_current(path) != version:
                    continue
                raise IndexFormatError(
                    f"index {path} is incomplete: {Path(error.filename or '?').name} of version {version} is missing; "
                    f"rebuild it with {_rebuild_command(path, {})}"
                ) from None
        if expected_fingerprint is not None and index.fingerprint != expected_fingerprint:
            raise IndexFormatError(
                f"index {path} was built with another model or extraction settings ({index.model.describe()}, "
                f"image_size={index.image_size}, scales={index.scales}; fingerprint {index.fingerprint[:12]}) than "
                f"the one asked for (fingerprint {expected_fingerprint[:12]}): its embeddings are not comparable. "
                f"Search with the index's own model, or rebuild it with {_rebuild_command(path, index.manifest)} "
                "and your model"
            )
        if expected_dim is not None and index.embedding_dim != int(expected_dim):
            raise IndexFormatError(
                f"index {path} holds {index.embedding_dim}-dimensional embeddings, but the model asked for gives "
                f"{expected_dim}; rebuild it with {_rebuild_command(path, index.manifest)} and that model"
            )
        if warn_incomplete and not index.complete:
            log.warning(
                "index %s is a checkpoint of an interrupted build: some images are missing or stale; "
                "finish it by running %s again",
                path,
                _rebuild_command(path, index.manifest),
            )
        return index


def _rebuild_command(path: Path, manifest: Mapping) -> str:
    source = (manifest.get("images") or {}).get("source") if isinstance(manifest, Mapping) else None
    return f"`oxford-ir-index images={source or '<your images>'} out={path}`"


def _read_current(path: Path) -> str:
    if not path.exists():
        raise IndexFormatError(f"no index at {path}: no such folder; build one with {_rebuild_command(path, {})}")
    if not path.is_dir():
        raise IndexFormatError(f"{path} is a file, not an index folder; give the folder written by oxford-ir-index")
    current = path / CURRENT_FILE
    try:
        version = current.read_text().strip()
    except FileNotFoundError:
        raise IndexFormatError(
            f"{path} is not an index (no {CURRENT_FILE} file; an interrupted first build leaves none); "
            f"build it with {_rebuild_command(path, {})}"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise IndexFormatError(f"index {path}: cannot read {CURRENT_FILE} ({error}); rebuild it") from None
    if not _VERSION_RE.match(version):
        raise IndexFormatError(
            f"index {path} is corrupt: {CURRENT_FILE} holds {version[:40]!r}, not a version name like v000001; "
            f"rebuild it with {_rebuild_command(path, {})}"
        )
    return version


def _load_version(path: Path, version: str, *, mmap: bool) -> RetrievalIndex:
    folder = path / version

    def corrupt(what: str, manifest: Mapping | None = None) -> IndexFormatError:
        return IndexFormatError(
            f"index {path} is corrupt ({version}/{what}); rebuild it with {_rebuild_command(path, manifest or {})}"
        )

    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise corrupt(f"{MANIFEST_FILE} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise corrupt(f"{MANIFEST_FILE} is not an {FORMAT_NAME} manifest")
    found_version = manifest.get("format_version")
    if not isinstance(found_version, int) or found_version > FORMAT_VERSION:
        raise IndexFormatError(
            f"index {path} has format_version {found_version!r}; this oxford-ir reads up to {FORMAT_VERSION}: "
            f"upgrade oxford-ir, or rebuild it with {_rebuild_command(path, manifest)}"
        )
    try:
        files = manifest["files"]
        for name in (EMBEDDINGS_FILE, ENTRIES_FILE):
            expected = files[name]["sha256"]
            if file_sha256(folder / name) != expected:
                raise corrupt(f"{name} does not match the sha256 in {MANIFEST_FILE}: the file was damaged", manifest)
        embeddings = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
        raw_entries = json.loads((folder / ENTRIES_FILE).read_text())
        entries = [IndexEntry.from_dict(e) for e in raw_entries]
        count, dim, dtype = int(manifest["count"]), int(manifest["embedding_dim"]), str(manifest["dtype"])
        extraction = manifest["extraction"]
        model = ModelSpec.from_dict(manifest["model"])
        skipped = [SkippedImage(**s) for s in manifest.get("skipped", [])]
        root = Path(manifest["images"]["root"])
        image_size = extraction["image_size"]
        batching = str(extraction.get("batching", "shape"))
        buckets = tuple((int(h), int(w)) for h, w in extraction.get("buckets", []))
    except FileNotFoundError:
        raise
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise corrupt(f"{type(error).__name__}: {error}", manifest) from None
    if embeddings.ndim != 2 or embeddings.shape != (count, dim) or str(embeddings.dtype) != dtype:
        raise corrupt(
            f"{EMBEDDINGS_FILE} is {embeddings.dtype} {embeddings.shape}, the manifest says {dtype} ({count}, {dim})",
            manifest,
        )
    if len(entries) != count:
        raise corrupt(f"{ENTRIES_FILE} has {len(entries)} records for {count} embeddings", manifest)
    return RetrievalIndex(
        path=path,
        root=root,
        entries=entries,
        embeddings=embeddings,
        model=model,
        image_size=None if image_size is None else int(image_size),
        scales=[float(s) for s in extraction["scales"]],
        fingerprint=str(manifest["fingerprint"]),
        dtype=dtype,
        embedding_dim=dim,
        model_fingerprint=str(manifest.get("model_fingerprint", "")),
        batching=batching,
        buckets=buckets,
        precision=str(extraction.get("precision", "32")),
        complete=bool(manifest.get("complete", True)),
        version=version,
        manifest=manifest,
        skipped=skipped,
    )


# -- building --------------------------------------------------------------------------------------
@dataclass
class IndexReport:
    """What one :func:`build_index` run did. ``count == kept + added + updated``."""

    out: Path
    version: str
    count: int
    embedding_dim: int
    dtype: str
    added: list[str]
    updated: list[str]
    removed: list[str]
    kept: int
    skipped: list[SkippedImage]
    #: images decoded and run through the model (added, updated and those found undecodable)
    attempted: int
    seconds: float
    embed_seconds: float
    #: a new version was written (false when nothing changed)
    wrote: bool
    #: why every row was re-embedded (another model, settings, root or dtype; corrupt index), or None
    rebuilt: str | None = None

    @property
    def embedded(self) -> int:
        return len(self.added) + len(self.updated)

    @property
    def images_per_second(self) -> float:
        return self.attempted / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.out),
            "version": self.version,
            "count": self.count,
            "embedding_dim": self.embedding_dim,
            "dtype": self.dtype,
            "added": len(self.added),
            "updated": len(self.updated),
            "removed": len(self.removed),
            "kept": self.kept,
            "skipped": len(self.skipped),
            "embedded": self.embedded,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "wrote": self.wrote,
            "rebuilt": self.rebuilt,
            **{f"{name}_paths": paths[:_LISTED_PATHS] for name, paths in self._lists()},
            "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }

    def _lists(self) -> list[tuple[str, list[str]]]:
        return [("added", self.added), ("updated", self.updated), ("removed", self.removed)]

    def summary(self, max_listed: int = 20) -> str:
        """Lines for the terminal: counts, speed, where the index is, and each skipped file with its reason."""
        lines = [
            f"index: {self.out} ({self.version}: {self.count} images x {self.embedding_dim} dims, {self.dtype})",
            f"added {len(self.added)}, updated {len(self.updated)}, removed {len(self.removed)}, kept {self.kept}, "
            f"skipped {len(self.skipped)} in {self.seconds:.1f} s "
            f"({self.attempted} files read at {self.images_per_second:.1f} images/s)",
        ]
        if self.rebuilt:
            lines.append(f"re-embedded everything: {self.rebuilt}")
        if not self.wrote:
            lines.append("nothing changed: the index was left as it was")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) that could not be read:")
            lines += [f"  {s.path}: {s.reason}" for s in self.skipped[:max_listed]]
            if len(self.skipped) > max_listed:
                lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        lines.append(f"report: {self.out / REPORT_FILE}")
        return "\n".join(lines)


@dataclass
class _Previous:
    """The rows of the existing index that may be reused, and its skipped files."""

    index: RetrievalIndex | None
    reusable: bool
    reason: str | None


def build_index(
    model: ModelSpec,
    images: ImageSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int | None = 1024,
    scales: Sequence[float] = (1.0,),
    dtype: str = "float16",
    batch_size: int = 16,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
    incremental: str = "auto",
    checkpoint_every: float | None = CHECKPOINT_EVERY,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    aspect_tolerance: float = 0.1,
    precision: str = "32",
    channels_last: bool = False,
    decode: str = "cpu",
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> IndexReport:
    """Build or update the index of ``images`` in folder ``out`` with ``model``; returns what was done.

    ``batching``, ``max_shapes``, ``aspect_tolerance``, ``precision``, ``channels_last``, ``decode``: as
    :func:`~oxford_ir.extraction.embedding.extract_embeddings`. With bucket batching the buckets are chosen
    from the images embedded by the first build and kept in the manifest; updates reuse them. Inside a
    ``torch.distributed`` process group (``torchrun ... oxford-ir-index``) every process embeds its share of the
    planned batches and the first process writes the index, identical to one process's; intermediate commits
    are then skipped.

    Embeds only new and changed files (see the module docstring for ``incremental``); undecodable files are
    skipped and reported, never fatal (files that are not regular files, such as FIFOs, are skipped unread).
    ``checkpoint_every`` (seconds, None = never) commits the work done so far during a long run, so that a run
    killed without warning loses at most that much (checkpoints are spaced at least 20 times the time the last
    one took to write); an interruption (Ctrl-C or an error) also commits what was finished, then re-raises.
    ``worker_timeout``: seconds a DataLoader worker may take to deliver a batch (None: no limit); a worker that
    dies, hangs or fails raises :class:`~oxford_ir.errors.ResourceError`. A full disk or file-size limit raises
    the OSError (naming the file) after removing what was half-written. ``out/report.json`` records the run.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"index.dtype={dtype!r}: choose float16 (half the disk and memory) or float32")
    if incremental not in INCREMENTAL_MODES:
        raise ConfigError(f"index.incremental={incremental!r}: choose one of {', '.join(INCREMENTAL_MODES)}")
    scales = [float(s) for s in scales]
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ConfigError(f"extraction.scales={scales}: give a non-empty list of positive factors, e.g. [1.0]")
    if image_size is not None and int(image_size) < 1:
        raise ConfigError(f"extraction.image_size={image_size}: a positive number of pixels (or null: full size)")
    image_size = None if image_size is None else int(image_size)
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size={batch_size}, num_workers={num_workers}: need batch_size >= 1, workers >= 0")
    source = images if isinstance(images, ImageSource) else resolve_images(images)
    out = _prepare_out(Path(out).expanduser())
    device = torch.device(device)
    rank, world = rank_and_world()
    writer = rank == 0  # in a process group every process embeds its share; the first one writes

    lock = exclusive_lock(out / LOCK_FILE, wait=False, busy=lambda pid: _busy(out, pid))
    with lock if writer else contextlib.nullcontext():
        if writer:
            _remove_unreferenced(out)
        model_fp = model.fingerprint()
        fingerprint = index_fingerprint(model_fp, image_size, scales, batching=batching, precision=precision)
        previous = _previous_index(out, fingerprint, source.root, dtype, incremental)
        old = previous.index if previous.reusable else None
        old_rows = {e.path: (i, e) for i, e in enumerate(old.entries)} if old is not None else {}
        old_skipped = {s.path: s for s in old.skipped} if old is not None else {}
        everything_before = {e.path for e in previous.index.entries} if previous.index is not None else set()

        # what changed: stat every file once
        current: dict[str, tuple[int, int]] = {}
        skipped: dict[str, SkippedImage] = {}
        todo: list[str] = []
        kept_rows: dict[str, IndexEntry] = {}
        for rel in source.paths:
            try:
                info = os.stat(source.root / rel)
            except OSError as error:
                skipped[rel] = SkippedImage(rel, f"cannot read the file: {error.strerror or error}")
                continue
            if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the reader
                skipped[rel] = SkippedImage(rel, "not a regular file (a FIFO, socket or device): not read")
                continue
            current[rel] = (info.st_size, info.st_mtime_ns)
            entry = old_rows.get(rel, (None, None))[1]
            bad = old_skipped.get(rel)
            if entry is not None and (entry.size, entry.mtime_ns) == current[rel]:
                kept_rows[rel] = entry
            elif bad is not None and (bad.size, bad.mtime_ns) == current[rel]:
                skipped[rel] = bad  # the same bad file as last time: not decoded again
            else:
                todo.append(rel)
        pending = set(todo)
        removed = sorted(p for p in everything_before if p not in kept_rows and p not in pending)

        state = _BuildState(
            out=out,
            source=source,
            model=model,
            model_fp=model_fp,
            fingerprint=fingerprint,
            image_size=image_size,
            scales=scales,
            dtype=dtype,
            old=old,
            old_rows=old_rows,
            kept=kept_rows,
            current=current,
            skipped=skipped,
            pooling_power=(old.manifest.get("extraction", {}).get("pooling_power") if old is not None else None),
            batching=batching,
            precision=precision,
            buckets=old.buckets if old is not None else (),
        )
        nothing_to_do = (
            not todo
            and not removed
            and old is not None
            and old.complete
            and {s.path for s in old.skipped} == {p for p, s in skipped.items() if s.size is not None}
        )
        embed_seconds = 0.0
        attempted = 0
        if todo:
            net = model.build(device)
            if channels_last:
                net.to(memory_format=torch.channels_last)
            state.pooling_power = float(getattr(net, "power", 1.0))
            embed_started = time.perf_counter()
            files = [source.root / p for p in todo]
            # a fresh bucket table covers the images to embed and, for a benchmark, its query crops (which
            # searches embed with this table), as oxford-ir-eval's does; an update keeps the index's table
            extra = [] if state.buckets else list(source.queries)
            plan = plan_for_model(
                net,
                files + [path for path, _ in extra],
                image_size,
                batch_size,
                bboxes=[None] * len(files) + [box for _, box in extra],
                batching=batching,
                max_shapes=max_shapes,
                buckets=state.buckets if state.buckets else None,
                aspect_tolerance=aspect_tolerance,
            ).part(0, len(files), batch_size, aspect_tolerance)
            state.batching = plan.mode
            state.buckets = plan.buckets  # the table it was given or chose, and any bucket a larger image added
            sizes = plan.sizes
            stream = gathered(  # in a process group: this process's share first, then everyone's rows
                embed_shard(
                    net,
                    files,
                    image_size,
                    plan,
                    shard(plan.batches, rank, world),
                    on_device=resolve_decode(decode, device),
                    scales=scales,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    device=device,
                    precision=precision,
                    channels_last=channels_last,
                    progress=progress and rank == 0,
                    desc="indexing",
                    worker_timeout=worker_timeout,
                ),
                len(todo),
                int(net.embedding_dim),
            )
            last_commit, commit_seconds = time.monotonic(), 0.0
            try:
                for positions, vectors, info in stream:
                    attempted += len(positions)
                    names = [todo[p] for p in positions]
                    if vectors is None:
                        for rel, reason in zip(names, info, strict=True):
                            size, mtime_ns = current[rel]
                            skipped[rel] = SkippedImage(rel, _short_reason(reason, source.root / rel), size, mtime_ns)
                        continue
                    state.add(names, vectors.numpy(), [_upright(sizes, p, source.root / todo[p]) for p in positions])
                    if (
                        writer
                        and checkpoint_every is not None
                        and time.monotonic() - last_commit >= max(checkpoint_every, _CHECKPOINT_SHARE * commit_seconds)
                    ):
                        commit_started = time.monotonic()
                        state.commit(complete=False)
                        last_commit = time.monotonic()
                        commit_seconds = last_commit - commit_started
            except BaseException:
                if writer and state.uncommitted:
                    with contextlib.suppress(Exception):
                        state.commit(complete=False)
                        log.warning("interrupted: committed %d finished images to %s", len(state.new), out)
                raise
            finally:
                embed_seconds = time.perf_counter() - embed_started

        ordered = [p for p in source.paths if p in state.kept or p in state.new]
        final_skipped = [skipped[p] for p in source.paths if p in skipped]
        if not ordered:
            report = _report(state, previous, [], removed, final_skipped, attempted, started, embed_seconds, False)
            _write_report(out, report)
            raise DataError(
                f"images={source.spec or source.root}: none of the {len(source.paths)} files could be read, so no "
                f"index was written (first: {final_skipped[0].path}: {final_skipped[0].reason})"
                if final_skipped
                else f"images={source.spec or source.root}: no images to index"
            )
        wrote = writer and not nothing_to_do
        if wrote:
            state.commit(complete=True)
        elif old is not None:
            state.version = old.version
        report = _report(state, previous, ordered, removed, final_skipped, attempted, started, embed_seconds, wrote)
        if writer:
            _write_report(out, report)
        return report


def _upright(sizes: Sequence[tuple[int, int] | None], position: int, path: Path) -> tuple[int, int]:
    """The (width, height) planning read from the header; decoded fine, so the header is readable."""
    size = sizes[position] or upright_size(path)
    if size is None:
        raise DataError(f"cannot read the size of {path} from its header although it decoded; re-run the index")
    return size


def _short_reason(message: str, path: Path) -> str:
    """A DataError message without the repeated file name."""
    for prefix in (f"cannot decode image {path}: ", f"image {path} is ", f"image not found: {path}"):
        if message.startswith(prefix):
            return message[len(prefix) :] or "the file disappeared"
    return message


def _report(
    state: _BuildState,
    previous: _Previous,
    ordered: list[str],
    removed: list[str],
    skipped: list[SkippedImage],
    attempted: int,
    started: float,
    embed_seconds: float,
    wrote: bool,
) -> IndexReport:
    before = {e.path for e in previous.index.entries} if previous.index is not None else set()
    new = [p for p in ordered if p in state.new]
    dropped = sorted(set(removed) | {p for p in before if p not in state.kept and p not in state.new})
    return IndexReport(
        out=state.out,
        version=state.version,
        count=len(ordered),
        embedding_dim=state.embedding_dim or 0,
        dtype=state.dtype,
        added=[p for p in new if p not in before],
        updated=[p for p in new if p in before],
        removed=dropped,
        kept=sum(p in state.kept for p in ordered),
        skipped=skipped,
        attempted=attempted,
        seconds=time.perf_counter() - started,
        embed_seconds=embed_seconds,
        wrote=wrote,
        rebuilt=None if previous.reusable else previous.reason,
    )


@dataclass
class _BuildState:
    """Rows of the index being built: reused ones (from the old index) and newly embedded ones."""

    out: Path
    source: ImageSource
    model: ModelSpec
    model_fp: str
    fingerprint: str
    image_size: int | None
    scales: list[float]
    dtype: str
    #: the existing index when its rows may be reused, else None
    old: RetrievalIndex | None
    #: path -> (row, entry) of ``old``
    old_rows: dict[str, tuple[int, IndexEntry]]
    #: unchanged files whose old rows are reused
    kept: dict[str, IndexEntry]
    #: path -> (size, mtime_ns) of every file that could be stat'ed
    current: dict[str, tuple[int, int]]
    skipped: dict[str, SkippedImage]
    pooling_power: float | None
    batching: str = "bucket"
    precision: str = "32"
    #: bucket batching: the input shapes of every row (the old index's, plus any a larger new image needed)
    buckets: tuple[tuple[int, int], ...] = ()
    new: dict[str, tuple[np.ndarray, IndexEntry]] = field(default_factory=dict)
    uncommitted: int = 0
    version: str = ""
    embedding_dim: int | None = None

    def __post_init__(self) -> None:
        if self.old is not None:
            self.embedding_dim = self.old.embedding_dim

    def add(self, names: list[str], vectors: np.ndarray, sizes: list[tuple[int, int]]) -> None:
        finite = np.isfinite(vectors).all(axis=1)
        for rel, vector, size, ok in zip(names, vectors, sizes, finite, strict=True):
            file_size, mtime_ns = self.current[rel]
            if not ok:
                self.skipped[rel] = SkippedImage(rel, "the model gave a non-finite embedding", file_size, mtime_ns)
                continue
            if self.embedding_dim is not None and vector.shape[0] != self.embedding_dim:
                raise IndexFormatError(
                    f"index {self.out}: the model now gives {vector.shape[0]}-dimensional embeddings, the index holds "
                    f"{self.embedding_dim}, with the same fingerprint; rebuild it with incremental=off"
                )
            self.embedding_dim = int(vector.shape[0])
            self.new[rel] = (vector, IndexEntry(rel, file_size, mtime_ns, size[0], size[1]))
            self.skipped.pop(rel, None)
            self.uncommitted += 1

    def rows(self, complete: bool) -> tuple[list[IndexEntry], np.ndarray]:
        """Entries and stored-dtype embeddings in source order.

        A checkpoint (``complete=False``) also keeps the old rows of changed files not yet re-embedded, with
        their old size and mtime, so the next run still sees them as changed.
        """
        dtype = np.dtype(self.dtype)
        entries: list[IndexEntry] = []
        new_vectors, old_rows, is_new = [], [], []
        for rel in self.source.paths:
            if rel in self.new:
                vector, entry = self.new[rel]
                new_vectors.append(vector)
            elif rel in self.kept or (not complete and rel in self.old_rows and rel in self.current):
                row, entry = self.old_rows[rel]
                old_rows.append(row)
            else:
                continue
            is_new.append(rel in self.new)
            entries.append(entry)
        embeddings = np.zeros((len(entries), self.embedding_dim or 0), dtype)
        mask = np.asarray(is_new, dtype=bool)
        if new_vectors:  # rows normalised each on its own (bit-identical whatever else is in the commit)
            embeddings[mask] = _normalise(np.stack(new_vectors), dtype)
        if old_rows:  # copied bit for bit
            embeddings[~mask] = np.asarray(self.old.embeddings[np.asarray(old_rows, dtype=np.int64)])
        return entries, embeddings

    def commit(self, complete: bool) -> None:
        entries, embeddings = self.rows(complete)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model.to_dict(),
            "model_description": self.model.describe(),
            "model_fingerprint": self.model_fp,
            "fingerprint": self.fingerprint,
            "extraction": {
                "image_size": self.image_size,
                "scales": self.scales,
                "pooling_power": self.pooling_power,
                "preprocessing": PREPROCESSING,
                "batching": self.batching,
                "precision": self.precision,
                **({"buckets": [list(b) for b in self.buckets]} if self.batching == "bucket" else {}),
            },
            "dtype": self.dtype,
            "count": len(entries),
            "embedding_dim": int(embeddings.shape[1]),
            "images": {"root": str(self.source.root), "source": self.source.spec or str(self.source.root)},
            "skipped": [asdict(s) for p, s in sorted(self.skipped.items()) if s.size is not None],
            "tool": _tool_versions(),
        }
        self.version = _write_version(self.out, entries, embeddings, manifest)
        self.uncommitted = 0


def _normalise(vectors: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows at unit L2 norm in the stored dtype: each row re-normalised in float32 first when rounding would
    matter for it (always for float16)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    redo = np.ones(len(v), dtype=bool) if dtype == np.float16 else np.abs(norms[:, 0] - 1.0) > 1e-5
    return np.where(redo[:, None], v / np.maximum(norms, 1e-12), v).astype(dtype)


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__, "numpy": np.__version__}
    with contextlib.suppress(PackageNotFoundError):
        versions["oxford-ir"] = version("oxford-ir")
    return versions


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder for the index (it is created when missing)")
    if out.is_dir() and not (out / CURRENT_FILE).exists():
        foreign = sorted(p.name for p in out.iterdir() if not _OWN_NAMES.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(
                f"out={out} is a folder with other files ({shown}) "
                "and no index; give a new or empty folder so that nothing of yours is mixed with or replaced by "
                "index files"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"out={out}: cannot create the index folder ({error.strerror or error})") from None
    return out.resolve()


def _busy(out: Path, pid: int | None) -> IndexFormatError:
    who = f"another oxford-ir-index run (pid {pid})" if pid is not None else "another oxford-ir-index run"
    return IndexFormatError(
        f"index {out} is being updated by {who}; wait for it to finish, then run this command again (it embeds "
        "only what is still missing)"
    )


def _previous_index(out: Path, fingerprint: str, root: Path, dtype: str, incremental: str) -> _Previous:
    """The existing index in ``out`` and whether its rows can be reused."""
    if not (out / CURRENT_FILE).exists():
        return _Previous(None, False, None)
    try:
        index = RetrievalIndex.load(out, warn_incomplete=False)
    except IndexFormatError as error:
        if incremental == "strict":
            raise
        log.warning("%s; replacing it with a new index", error)
        return _Previous(None, False, f"the existing index could not be read ({error})")
    differences = []
    if index.fingerprint != fingerprint:
        differences.append(
            f"another model or extraction settings ({index.model.describe()}, image_size={index.image_size}, "
            f"scales={index.scales})"
        )
    if index.root != root:
        differences.append(f"another images root ({index.root})")
    if index.dtype != dtype:
        differences.append(f"dtype {index.dtype}")
    if incremental == "off":
        return _Previous(index, False, "incremental=off")
    if differences:
        reason = f"the existing index was built with {'; '.join(differences)}"
        if incremental == "strict":
            raise IndexFormatError(
                f"index {out}: {reason}; its rows cannot be reused. Use incremental=auto to re-embed every image "
                "into it, or another out= folder"
            )
        log.warning("%s: re-embedding every image", reason)
        return _Previous(index, False, reason)
    return _Previous(index, True, None)


# -- atomic writing --------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (so checksums cost no second read)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)


def _write_file(path: Path, write: Any) -> dict[str, Any]:
    """Create ``path`` with ``write(file)``, fsync it (:func:`~oxford_ir.fs.write_new`); its sha256 and size."""
    writer = _HashingWriter(None)

    def fill(handle: Any) -> None:
        writer.handle = handle
        write(writer)

    write_new(path, fill)
    return {"sha256": writer.digest.hexdigest(), "bytes": writer.bytes}


def _write_embeddings(folder: Path, embeddings: np.ndarray) -> dict[str, Any]:
    return _write_file(folder / EMBEDDINGS_FILE, lambda f: np.lib.format.write_array(f, embeddings, allow_pickle=False))


def _write_entries(folder: Path, entries: list[IndexEntry]) -> dict[str, Any]:
    fields = ("path", "size", "mtime_ns", "width", "height")  # asdict's order, without its deep copies
    text = json.dumps([{f: getattr(e, f) for f in fields} for e in entries], separators=(",", ":"))
    return _write_file(folder / ENTRIES_FILE, lambda f: f.write(text.encode()))


def _write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, allow_nan=False)
    _write_file(folder / MANIFEST_FILE, lambda f: f.write(text.encode()))


def _write_version(out: Path, entries: list[IndexEntry], embeddings: np.ndarray, manifest: dict) -> str:
    """Write a complete new version folder, then point ``CURRENT`` at it, then delete the others.

    A failure before ``CURRENT`` names the new folder (disk full, file-size limit, Ctrl-C) removes the folder:
    nothing half-written stays behind, and ``CURRENT`` still names the previous version.
    """
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _VERSION_RE.match(p.name))]
    version = f"v{max(numbers, default=0) + 1:06d}"
    folder = out / version
    folder.mkdir()
    try:
        files = {EMBEDDINGS_FILE: _write_embeddings(folder, embeddings), ENTRIES_FILE: _write_entries(folder, entries)}
        _write_manifest(folder, {**manifest, "files": files})
        fsync_dir(folder)
        replace_file(out / CURRENT_FILE, (version + "\n").encode())
    except BaseException:
        try:
            named = (out / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            named = None
        except (OSError, UnicodeDecodeError):
            named = version  # unknown: keep the folder (the next build deletes it unless CURRENT names it)
        if named != version:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for other in out.iterdir():
        if _VERSION_RE.match(other.name) and other.name != version:
            shutil.rmtree(other, ignore_errors=True)
    return version


def _remove_unreferenced(out: Path) -> None:
    """Delete the version folders and temp files that ``CURRENT`` does not name: left by a build killed while it
    wrote them, or after its commit but before it deleted the older version (the lock is held)."""
    try:
        current = (out / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        current = None  # no index yet: every version folder is a killed first build's
    except (OSError, UnicodeDecodeError):
        return
    if current is not None and not _VERSION_RE.match(current):
        return  # a corrupt CURRENT: the build replaces the index and then deletes the rest
    for entry in out.iterdir():
        if _VERSION_RE.match(entry.name) and entry.name != current:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name in (CURRENT_FILE + ".tmp", REPORT_FILE + ".tmp"):
            with contextlib.suppress(OSError):
                entry.unlink()


def _write_report(out: Path, report: IndexReport) -> None:
    replace_file(out / REPORT_FILE, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
