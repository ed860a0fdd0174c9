"""Fetching and unpacking the official Oxford5k / Paris6k files.

The archives are large (1.8 GB and 2.5 GB) and hosted on academic servers that drop
connections, so every step is resumable: a transfer continues from its ``.part`` file
with an HTTP Range request, an extraction happens in a temporary folder that is moved
into place only when it succeeded (with one rename when its folder is new), and the dataset
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
import filecmp
import gzip
import http.client
import json
import logging
import lzma
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from oxford_ir import __version__
from oxford_ir.errors import ConfigError, DownloadError, no_room_error
from oxford_ir.hashing import file_sha256

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

CHUNK_BYTES = 1 << 20
#: HTTP statuses worth retrying: the server is busy or a proxy timed out
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


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


# -- fetching ------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (connection dropped, timeout, busy server)."""


def fetch(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    *,
    retries: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` left by an earlier attempt.

    ``dest`` appears (atomically) only once complete and, when ``sha256`` is given, verified.
    Connection errors, timeouts and 5xx answers are retried ``retries`` times with
    exponential ``backoff``; anything else raises :class:`DownloadError` naming the URL.
    """
    return _fetch(url, Path(dest), sha256, progress=progress, retries=retries, backoff=backoff, timeout=timeout)[0]


def _fetch(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    progress: bool,
    retries: int,
    backoff: float,
    timeout: float,
    hint: str = "check the URL",
) -> tuple[Path, str, int]:
    """:func:`fetch`, also returning the file's sha256 and size."""
    expected = sha256.lower() if sha256 else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        actual = file_sha256(dest)
        if expected is None or actual == expected:
            log.info("%s is already downloaded", dest)
            return dest, actual, dest.stat().st_size
        log.warning("%s does not match its sha256 (%s, expected %s); downloading it again", dest, actual, expected)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _transfer(url, part, progress=progress, timeout=timeout, hint=hint)
            break
        except _Transient as error:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DownloadError(
                    f"{error}; gave up after {attempt} attempts. Check your connection and re-run: "
                    f"the download resumes from the {have} bytes kept in {part}"
                ) from None
            delay = backoff * 2 ** (attempt - 1)
            log.warning("%s; retrying in %.1f s (%d/%d)", error, delay, attempt, retries)
            time.sleep(delay)
    actual = file_sha256(part)
    if expected is not None and actual != expected:
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {dest.name} from {url}: expected sha256 {expected}, got {actual}; the download "
            "was deleted. Re-run to fetch it again; if the mismatch persists the file changed upstream: "
            "update (or null) its sha256 in the sources file"
        )
    size = part.stat().st_size
    os.replace(part, dest)
    return dest, actual, size


def _transfer(url: str, part: Path, *, progress: bool, timeout: float, hint: str) -> None:
    """Bring ``part`` to the full length of ``url`` in one connection (appending when the server allows)."""
    from tqdm import tqdm

    for _ in range(3):  # at most: a refused resume, a mismatched resume, then a fresh start
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": f"oxford-ir/{__version__} (python urllib)", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as error:
            with contextlib.closing(error):
                if error.code == 416 and offset:
                    total = _content_range(error.headers.get("Content-Range"))[2]
                    if total == offset:
                        return  # the earlier attempt already got every byte
                    log.info("server refused to resume %s (HTTP 416); restarting from zero", url)
                    part.unlink()
                    continue
                if error.code in RETRY_STATUSES:
                    raise _Transient(f"HTTP {error.code} {error.reason} from {url}") from None
                raise DownloadError(f"HTTP {error.code} {error.reason} for {url}; {hint}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, FileNotFoundError):  # a file:// URL: retrying cannot help
                raise DownloadError(f"{url} does not exist; {hint}") from None
            if isinstance(reason, TimeoutError):
                raise _Transient(f"timed out after {timeout:g} s connecting to {url}") from None
            raise _Transient(f"cannot reach {url}: {reason}") from None
        with response:
            status = getattr(response, "status", None)
            length = response.headers.get("Content-Length")
            remaining = int(length) if length and length.isdigit() else None
            if offset and status == 206:
                start, _, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    log.info("server resumed %s at byte %s instead of %d; restarting from zero", url, start, offset)
                    part.unlink()
                    continue
                if remaining is None and total is not None:
                    remaining = total - offset
            elif offset:
                log.info("server ignored the Range request for %s; downloading it again from zero", url)
                offset = 0
            received = 0
            with (
                open(part, "ab" if offset else "wb") as out,
                tqdm(
                    total=None if remaining is None else offset + remaining,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name[: -len(".part")],
                    file=sys.stderr,
                    disable=not progress,
                ) as bar,
            ):
                try:
                    while True:
                        try:
                            chunk = response.read(CHUNK_BYTES)
                        except TimeoutError:
                            raise _Transient(f"timed out after {timeout:g} s reading {url}") from None
                        except (http.client.HTTPException, OSError) as error:
                            raise _Transient(
                                f"connection to {url} broke after {offset + received} bytes: {error}"
                            ) from None
                        if not chunk:
                            break
                        _write(out, chunk, part)
                        received += len(chunk)
                        bar.update(len(chunk))
                    _write(out, b"", part, sync=True)
                except BaseException:
                    with contextlib.suppress(OSError):  # keep what reached the disk: the next attempt resumes it
                        out.flush()
                    raise
            if remaining is not None and received < remaining:
                raise _Transient(f"connection to {url} closed after {offset + received} of {offset + remaining} bytes")
            return
    raise _Transient(f"could not resume {url}")


def _write(out: Any, data: bytes, path: Path, *, sync: bool = False) -> None:
    """Append ``data`` (and flush and fsync when ``sync``); a failed write is an OSError naming ``path`` (a full
    disk or a file-size limit is not worth retrying and is reported as such, see ``no_room_error``)."""
    try:
        if data:
            out.write(data)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from None
        raise


def _content_range(header: str | None) -> tuple[int | None, int | None, int | None]:
    """(first byte, last byte, total) of a Content-Range header; None where absent or unknown."""
    match = _CONTENT_RANGE.match(header or "")
    if not match:
        return None, None, None
    first, last, total = match.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total and total != "*" else None,
    )


# -- extraction ----------------------------------------------------------------------------------


class _CorruptArchiveError(DownloadError):
    """The archive cannot be read (truncated, or not an archive at all): downloading it again may help."""


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, flatten: bool = False) -> list[Path]:
    """Unpack a tar (any compression) or zip ``archive`` into ``dest``; return the files placed there.

    Every member is checked before anything is written: absolute paths, ``..``, links
    pointing outside ``dest`` and device files are refused with :class:`DownloadError`
    naming the archive and member. Members are unpacked into a temporary folder next to
    ``dest`` and moved into place only when all of them succeeded. ``flatten`` moves
    every file to the top of ``dest`` (two different files with the same name are refused).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DownloadError(f"archive not found: {archive}")
    is_zip = zipfile.is_zipfile(archive)
    unreadable = "cannot read {} as a tar or zip archive ({}): it is truncated or not an archive (a server error page?)"
    try:
        handle = zipfile.ZipFile(archive) if is_zip else tarfile.open(archive, "r:*")  # noqa: SIM115 - closed below
    except _CORRUPT as error:
        raise _CorruptArchiveError(unreadable.format(archive, error)) from None
    with handle:
        try:
            members = handle.infolist() if is_zip else handle.getmembers()
        except _CORRUPT as error:
            raise _CorruptArchiveError(unreadable.format(archive, error)) from None
        for member in members:
            name = member.filename if is_zip else member.name
            why = _zip_member_problem(member) if is_zip else _tar_member_problem(member, dest, flatten)
            if why is not None:
                raise DownloadError(
                    f"refusing to extract {archive}: member {name!r} {why}; nothing was extracted. "
                    "The archive is not the official one or was tampered with: delete it and download it again"
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _staging_folder(dest)
        try:
            try:
                if is_zip or not hasattr(tarfile, "data_filter"):
                    handle.extractall(tmp, members=members)  # every member was checked above
                else:
                    handle.extractall(tmp, members=members, filter="data")
            except _CORRUPT as error:
                raise _CorruptArchiveError(f"cannot extract {archive}: it is truncated or corrupt ({error})") from None
            except tarfile.FilterError as error:  # a chain of links that only escapes once earlier members exist
                raise DownloadError(
                    f"refusing to extract {archive}: member {error.tarinfo.name!r} is unsafe ({error}); "
                    f"nothing was extracted into {dest}"
                ) from None
            except OSError as error:
                raise DownloadError(
                    f"cannot extract {archive} into {dest.parent}: {error}; free disk space or fix the permissions, "
                    "then re-run"
                ) from None
            return _flatten_into(tmp, dest, archive) if flatten else _merge_into(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: what reading a damaged archive raises (gzip.BadGzipFile is an OSError, so this is checked first)
_CORRUPT = (
    tarfile.ReadError,
    tarfile.CompressionError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


def _unsafe_path(name: str) -> str | None:
    """Why an archive member name would land outside the target folder, or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out of the target folder with '..'"
    return None


def _tar_member_problem(member: tarfile.TarInfo, dest: Path, flatten: bool) -> str | None:
    """Why ``member`` must not be extracted into ``dest``, or None."""
    why = _unsafe_path(member.name)
    if why is None and (member.ischr() or member.isblk() or member.isfifo()):
        why = "is a device file or pipe"
    if why is None and member.issym():
        resolved = os.path.normpath(os.path.join(os.path.dirname(member.name), member.linkname))
        if flatten:
            why = f"is a symbolic link (to {member.linkname!r}), which cannot be flattened"
        elif member.linkname.startswith("/") or resolved == ".." or resolved.startswith("../"):
            why = f"is a symbolic link pointing outside the target folder ({member.linkname!r})"
        elif not hasattr(tarfile, "data_filter"):
            why = "is a symbolic link, which this Python (no tarfile.data_filter) cannot check safely"
    if why is None and member.islnk() and _unsafe_path(member.linkname):
        why = f"is a hard link pointing outside the target folder ({member.linkname!r})"
    if why is None and hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as error:
            why = f"is unsafe ({error})"
    return why


def _zip_member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` must not be extracted, or None."""
    why = _unsafe_path(info.filename)
    mode = info.external_attr >> 16
    if why is None and stat.S_ISLNK(mode):
        why = "is a symbolic link, which is not extracted from zip files"
    if why is None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
        why = "is a device file or pipe"
    return why


def _staging_folder(dest: Path) -> Path:
    """A new hidden folder beside ``dest`` (``.<name>.extract-<pid>-<random>``, removed by the next run when left
    behind), with the permissions of the user's umask (``mkdtemp`` would make it 0700, and it may become ``dest``)."""
    while True:
        folder = dest.parent / f".{dest.name}.extract-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _merge_into(src: Path, dest: Path) -> list[Path]:
    """Move the tree ``src`` into ``dest``, replacing files of the same name (a re-run re-extracts).

    A new ``dest`` is ``src`` renamed, in one step: it never exists half-filled."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(src, dest)
        return sorted(p for p in dest.rglob("*") if p.is_file() or p.is_symlink())
    placed: list[Path] = []
    dest.mkdir(exist_ok=True)
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise DownloadError(
                    f"cannot extract into {dest}: {target} is a file and the archive has a folder there; "
                    "move it away and re-run"
                )
            placed.extend(_merge_into(entry, target))
        else:
            if target.is_dir() and not target.is_symlink():
                raise DownloadError(
                    f"cannot extract into {dest}: {target} is a folder and the archive has a file there; "
                    "move it away and re-run"
                )
            os.replace(entry, target)
            placed.append(target)
    return placed


def _flatten_into(src: Path, dest: Path, archive: Path) -> list[Path]:
    """Move every regular file below ``src`` to the top of ``dest``."""
    chosen: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(src):
        subfolders.sort()  # archive order is arbitrary; walk in name order so that errors are reproducible
        for name in sorted(files):
            path = Path(folder) / name
            if name in chosen:
                if not filecmp.cmp(chosen[name], path, shallow=False):
                    first, second = (p.relative_to(src).as_posix() for p in (chosen[name], path))
                    raise DownloadError(
                        f"cannot flatten {archive}: {first!r} and {second!r} are different files with the same name; "
                        "set flatten: false for this entry in the sources file"
                    )
                continue
            chosen[name] = path
    # a new dest is filled beside it and renamed into place in one step; an existing one (a second archive into
    # the same folder, or a re-run) receives the files one by one
    fresh = not dest.exists() and not dest.is_symlink()
    target = _staging_folder(dest) if fresh else dest
    try:
        for name in sorted(chosen):
            os.replace(chosen[name], target / name)
        if fresh:
            os.replace(target, dest)
    finally:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
    return [dest / name for name in sorted(chosen)]


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
            path, digest, size = _fetch(
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
                except _CorruptArchiveError as error:
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
