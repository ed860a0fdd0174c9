"""Fetching one file over HTTP(S) (or from a ``file://`` URL), resumable and checked.

The archives are large (1.8 GB and 2.5 GB) and hosted on academic servers that drop connections, so a transfer
continues from its ``.part`` file with an HTTP Range request, connection errors, timeouts and busy answers (5xx,
429, ...) are retried with exponential backoff, and the file appears under its name (atomically) only once it is
complete and, when a sha256 is given, verified. A write that fails for want of room (a full disk, a file-size
limit) is not retried: it is reported as such, naming the file, and what was fetched so far is kept for the next
attempt.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from oxford_ir import __version__
from oxford_ir.errors import DownloadError
from oxford_ir.hashing import file_sha256

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
#: HTTP statuses worth retrying: the server is busy or a proxy timed out
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


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
    return fetch_with_digest(
        url, Path(dest), sha256, progress=progress, retries=retries, backoff=backoff, timeout=timeout
    )[0]


def fetch_with_digest(
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
    """:func:`fetch`, also returning the file's sha256 and size; ``hint`` ends the message of an HTTP error that a
    retry cannot cure (a 404: say where the URL comes from and how to change it)."""
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
