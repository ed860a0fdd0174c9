"""Downloading a whole dataset: its sources (what to fetch), its folder (``root/<dataset>/``), and the markers that
tell a finished download from an unfinished one.

The archives are large (1.8 GB and 2.5 GB) and hosted on academic servers that drop
connections, so every step is resumable: a transfer continues from its ``.part`` file
with an HTTP Range request (:mod:`~oxford_ir.benchmarks.http_fetch`), an extraction happens in a temporary folder
that is moved into place only when it succeeded, with one rename when its folder is new
(:mod:`~oxford_ir.benchmarks.archives`), and the dataset
folder gets its ``.complete.json`` marker only after every file is in place. Until then the
folder holds ``.download-state.json``, and :func:`oxford_ir.benchmarks.registry.load_benchmark` refuses it as an
unfinished download. An interrupted run (also one killed with SIGKILL at any point) therefore never leaves a
half-dataset that looks whole, and re-running picks up where it stopped and ends with the same files as an
uninterrupted run. A write that fails for want of room (a full disk, a file-size limit) is not retried: it
is reported as such, naming the file, and what was fetched so far is kept for the next run.

The URLs live in ``conf/download/<dataset>.yaml`` (a list of entries
``{url, filename, sha256, extract_to, flatten}``); ``--sources FILE`` replaces them and
``--base-url`` fetches the same file names from a mirror.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from oxford_ir import __version__
from oxford_ir.benchmarks.archives import CorruptArchiveError, safe_extract
from oxford_ir.benchmarks.http_fetch import fetch_with_digest
from oxford_ir.errors import ConfigError, DownloadError, no_room_error

log = logging.getLogger(__name__)

#: written into the dataset folder once every file is fetched and extracted
COMPLETE_MARKER = ".complete.json"
#: steps finished so far by an unfinished run (removed when the marker is written)
STATE_FILE = ".download-state.json"
LOCK_FILE = ".download.lock"
#: where ``load_sources(name)`` looks for ``<name>.yaml`` (the repository's conf/download)
SOURCES_DIR = Path(__file__).resolve().parents[2] / "conf" / "download"
#: dataset name -> folder under the data root; the Revisited benchmarks share their images
DATASET_FOLDERS = {"oxford5k": "oxford5k", "roxford5k": "oxford5k", "paris6k": "paris6k", "rparis6k": "paris6k"}
DATASET_FOLDERS["sfm120k"] = "retrieval-SfM-120k"  # training set of cnnimageretrieval-pytorch (benchmarks.sfm120k)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Source:
    """One file of a dataset: where it comes from, what it must hash to, where its contents go."""

    url: str
    filename: str
    sha256: str | None = None
    #: folder (relative to the dataset folder) the archive is unpacked into; None keeps the file as is
    extract_to: str | None = None
    #: move every file of the archive to the top of ``extract_to`` (Paris ships paris/<landmark>/*.jpg)
    flatten: bool = False


# -- sources -------------------------------------------------------------------------------------


def load_sources(name_or_file: str | os.PathLike) -> list[Source]:
    """The entries of ``conf/download/<name>.yaml``, or of the YAML file ``name_or_file``.

    Raises :class:`ConfigError` naming the file and entry when an entry is malformed.
    """
    from omegaconf import OmegaConf

    text = str(name_or_file)
    if isinstance(name_or_file, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(name_or_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"sources file not found: {path}; pass an existing YAML file to --sources")
    else:
        path = SOURCES_DIR / f"{DATASET_FOLDERS.get(text, text)}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in SOURCES_DIR.glob("*.yaml")) if SOURCES_DIR.is_dir() else []
            raise ConfigError(
                f"no download sources for {text!r}: {path} does not exist; known datasets: {known or 'none'}. "
                "Pass --sources FILE with a list of {url, filename, sha256, extract_to, flatten} entries"
            )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:  # omegaconf and yaml raise many types; all mean "fix the file"
        raise ConfigError(f"{path}: cannot read sources: {error}") from None
    if isinstance(raw, dict):
        unknown = set(raw) - {"files"}
        if unknown or "files" not in raw:
            raise ConfigError(f"{path}: expected a mapping with only a 'files' list, got keys {sorted(raw)}")
        raw = raw["files"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: 'files' must be a non-empty list of {{url, filename, ...}} entries")
    sources = [_parse_source(entry, path, i) for i, entry in enumerate(raw)]
    names = [s.filename for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: file names must be unique, {duplicates} appear more than once")
    return sources


def _parse_source(entry: object, path: Path, index: int) -> Source:
    where = f"{path}: files[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping with url and filename, got {entry!r}")
    fields = set(Source.__dataclass_fields__)
    unknown = set(entry) - fields
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    url, filename = entry.get("url"), entry.get("filename")
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise ConfigError(f"{where}: url must be an http(s) or file URL, got {url!r}")
    if filename is None:
        filename = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if not isinstance(filename, str) or not filename or filename in (".", "..") or "/" in filename or "\\" in filename:
        raise ConfigError(f"{where}: filename must be a plain file name, got {filename!r}")
    if filename.startswith(".") or filename.endswith(".part"):
        raise ConfigError(f"{where}: filename {filename!r} clashes with the downloader's own files; rename it")
    digest = entry.get("sha256")
    if digest is not None and (not isinstance(digest, str) or not _SHA256.match(digest)):
        raise ConfigError(f"{where}: sha256 must be null or 64 hex digits, got {digest!r}")
    extract_to = entry.get("extract_to")
    if extract_to is not None:
        parts = PurePosixPath(str(extract_to)).parts
        if not isinstance(extract_to, str) or not parts or extract_to.startswith("/") or ".." in parts:
            raise ConfigError(f"{where}: extract_to must be a folder inside the dataset folder, got {extract_to!r}")
    flatten = entry.get("flatten", False)
    if not isinstance(flatten, bool):
        raise ConfigError(f"{where}: flatten must be true or false, got {flatten!r}")
    if flatten and extract_to is None:
        raise ConfigError(f"{where}: flatten needs extract_to (only archives are flattened)")
    return Source(url, filename, digest.lower() if digest else None, extract_to, flatten)


# -- whole datasets ------------------------------------------------------------------------------


def is_complete(path: str | os.PathLike) -> bool:
    """True when the dataset folder ``path`` holds a valid completion marker written by :func:`download_dataset`."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("files"), list)


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """The folder ``download_dataset(name, root)`` fills: ``root/<folder>``, or ``root`` itself when so named."""
    folder = DATASET_FOLDERS.get(name, name)
    root = Path(root).expanduser()
    return root if root.name == folder else root / folder


def download_dataset(
    name: str,
    root: str | os.PathLike,
    sources: str | os.PathLike | Sequence[Source] | None = None,
    *,
    progress: bool = True,
    base_url: str | None = None,
    keep_archives: bool = False,
    retries: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """Fetch and unpack every file of dataset ``name`` into ``root/<name>/``; return that folder.

    ``sources`` is a YAML file or a list of :class:`Source` (default: ``conf/download/<name>.yaml``);
    ``base_url`` fetches the same file names from a mirror. Finished steps are skipped
    on a re-run; a complete dataset returns at once. Archives are deleted after
    extraction unless ``keep_archives``. Raises :class:`DownloadError` or :class:`ConfigError`.
    """
    if sources is None and name not in DATASET_FOLDERS:
        raise ConfigError(
            f"unknown dataset {name!r}; downloadable: {sorted(DATASET_FOLDERS)} (or pass --sources FILE for others)"
        )
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"dataset name must be a plain folder name, got {name!r}")
    if base_url is not None and urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise ConfigError(f"base URL must start with http://, https:// or file://, got {base_url!r}")
    target = dataset_dir(name, root)
    if is_complete(target):
        log.info("%s is complete (%s)", target, COMPLETE_MARKER)
        (target / STATE_FILE).unlink(missing_ok=True)  # left by a run killed just after writing the marker
        return target
    if sources is None or isinstance(sources, (str, os.PathLike)):
        origin = str(sources if sources is not None else SOURCES_DIR / f"{DATASET_FOLDERS[name]}.yaml")
        entries = load_sources(sources if sources is not None else name)
    else:
        origin, entries = "the sources passed in", list(sources)
    hint = (
        f"the file moved or the URL is wrong: fix its url in {origin}, pass --sources FILE, "
        "or --base-url URL of a mirror holding the same file names"
    )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if no_room_error(error) is not None:
            raise
        raise ConfigError(
            f"cannot create the dataset folder {target}: {error.strerror or error}; give a --root folder that "
            "you can write to (not a file)"
        ) from None
    with _locked(target):
        if is_complete(target):  # another process finished while we waited for the lock
            (target / STATE_FILE).unlink(missing_ok=True)
            return target
        for stale in target.glob(".*.extract-*"):  # left by a killed run: nothing in them is used
            shutil.rmtree(stale, ignore_errors=True)
        for stale in (*target.glob(f".{STATE_FILE}.*.tmp"), *target.glob(f".{COMPLETE_MARKER}.*.tmp")):
            stale.unlink(missing_ok=True)
        state_path = target / STATE_FILE
        state = _read_json(state_path)
        records = []
        for source in entries:
            url = urllib.parse.urljoin(base_url.rstrip("/") + "/", source.filename) if base_url else source.url
            done = state.get(source.filename)
            landed = target / (source.extract_to or source.filename)
            if isinstance(done, dict) and done.get("url") == url and landed.exists():
                log.info("skipping %s: done by an earlier run", source.filename)
                records.append(done)
                continue
            path, digest, size = fetch_with_digest(
                url,
                target / source.filename,
                source.sha256,
                progress=progress,
                retries=retries,
                backoff=backoff,
                timeout=timeout,
                hint=hint,
            )
            record = {**asdict(source), "url": url, "sha256": digest, "size": size}
            if source.extract_to is not None:
                log.info("extracting %s into %s", path.name, target / source.extract_to)
                try:
                    record["extracted_files"] = len(safe_extract(path, landed, flatten=source.flatten))
                except CorruptArchiveError as error:
                    path.unlink(missing_ok=True)
                    raise DownloadError(f"{error}; deleted it, re-run to download it again") from None
            state[source.filename] = record
            _write_json_atomic(state_path, state)
            records.append(record)
        # archives go before the marker: a run killed in between finds every step done and only writes it
        if not keep_archives:
            for record in records:
                if record.get("extract_to") is not None:
                    (target / record["filename"]).unlink(missing_ok=True)
        marker = {
            "dataset": name,
            "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "oxford_ir_version": __version__,
            "files": records,
        }
        _write_json_atomic(target / COMPLETE_MARKER, marker)
        state_path.unlink(missing_ok=True)
    log.info("%s is complete", target)
    return target


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so that two runs (e.g. one per node) never write the same files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking, runs must not overlap
        yield
        return
    with open(folder / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another download into %s is running; waiting for it", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from None
        raise
