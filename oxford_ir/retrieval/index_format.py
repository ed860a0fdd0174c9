"""The on-disk format of a retrieval index: reading it (:class:`RetrievalIndex`) and writing a version of it.

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

Atomicity: a build writes a complete new version folder (:func:`write_version`), fsyncs it, then replaces
``CURRENT`` with ``os.replace``; older versions are deleted only after that. A crash, Ctrl-C or SIGKILL at any
moment leaves ``CURRENT`` naming a complete version, which :meth:`RetrievalIndex.load` verifies against its
checksums (and every entry's path against its image folder: none, symbolic links followed, leads outside it,
:func:`~oxford_ir.fs.escapes`); a version folder that is not named by ``CURRENT`` is never read, and a failed
write (disk full, file-size limit) removes it at once (a killed process leaves it to the next build, which deletes
it: :func:`remove_unreferenced`).

Building and updating an index (checkpoints, the lock, incremental updates) is
:mod:`oxford_ir.retrieval.index_build`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oxford_ir.errors import IndexFormatError
from oxford_ir.fs import fsync_dir, outside_root, replace_file, write_new
from oxford_ir.hashing import file_sha256
from oxford_ir.retrieval.model_spec import ModelSpec

if TYPE_CHECKING:
    import torch

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
#: how images become network input; part of the fingerprint, so changing it invalidates old indexes
PREPROCESSING = (
    "v1: RGB with EXIF orientation, long side downscaled to image_size (Lanczos, never upscaled), "
    "ImageNet mean/std; JPEGs over 16.8 Mpx decoded in draft mode"
)
_VERSION_RE = re.compile(r"^v(\d{6,})$")
#: what an index folder may hold: a build refuses an ``out=`` folder without ``CURRENT`` that holds anything else
INDEX_FILE_NAMES = re.compile(r"^(CURRENT|CURRENT\.tmp|report\.json|report\.json\.tmp|\.lock|v\d{6,})$")


# -- entries ---------------------------------------------------------------------------------------
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
        model = ModelSpec.from_dict(manifest["model"], source=str(folder / MANIFEST_FILE))
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
    if not root.is_absolute():
        raise corrupt(f"{MANIFEST_FILE} names the image folder {str(root)!r}, not an absolute path", manifest)
    escape = outside_root(root, [e.path for e in entries])  # a file may not point a reader outside the images
    if escape is not None:
        position, name, why = escape
        raise corrupt(f"{ENTRIES_FILE} entry {position} {name!r} {why}, outside the image folder {root}", manifest)
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


def _write_chunks(handle: Any, data: Any, chunk: int = 64 << 20) -> None:
    view = memoryview(data).cast("B")
    for start in range(0, len(view), chunk):
        handle.write(view[start : start + chunk])


def _write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, allow_nan=False)
    _write_file(folder / MANIFEST_FILE, lambda f: f.write(text.encode()))


def write_version(
    out: Path, entries: list[IndexEntry], embeddings: np.ndarray, manifest: dict, extra: Mapping[str, Any] = {}
) -> str:
    """Write a complete new version folder, then point ``CURRENT`` at it, then delete the others.

    ``extra``: more files of the version (name -> bytes-like, e.g. the budgeted search index, written in chunks
    without a copy of the whole), checksummed in the manifest's ``files`` like the others. A failure before
    ``CURRENT`` names the new folder (disk full, file-size limit, Ctrl-C) removes the folder: nothing half-written
    stays behind, and ``CURRENT`` still names the previous version.
    """
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _VERSION_RE.match(p.name))]
    version = f"v{max(numbers, default=0) + 1:06d}"
    folder = out / version
    folder.mkdir()
    try:
        files = {EMBEDDINGS_FILE: _write_embeddings(folder, embeddings), ENTRIES_FILE: _write_entries(folder, entries)}
        for name, data in extra.items():
            files[name] = _write_file(folder / name, lambda f, data=data: _write_chunks(f, data))
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


def remove_unreferenced(out: Path) -> None:
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
