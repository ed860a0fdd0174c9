"""The index version the web app serves, and the switch to the next one that ``oxford-ir-index`` commits.

An index folder names its live version in ``CURRENT`` (:mod:`oxford_ir.retrieval.index_format`). The server
holds one :class:`ServedVersion` at a time: the loaded index, its searcher and what the answers need (the
thumbnail token, the entries' lower-cased paths). A request takes one reference to it
(:meth:`ServedIndex.current`) and uses only that, so no answer mixes two versions.

``current()`` looks at ``CURRENT`` at most every ``check_s`` seconds (one ``stat``; the file is read only when
the stat changed). A new version is loaded, verified and warmed up (model, search backend) in a background
thread while requests go on with the old one; the reference is then swapped in one assignment. A version that
fails to load (corrupt, its model gone, empty) is logged in one line and the old one stays served; it is tried
again when ``CURRENT`` changes, or after :data:`RETRY_FAILED_S`.

Ids are rows of one version. A page shows ids together with the version's token (thumbnail URLs carry it as
``v=``), so the entries of the last :data:`KEEP_RETIRED` versions are kept (sharing the entry objects that did
not change): a thumbnail or search by id from a page of an older version still means the image it showed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oxford_ir.retrieval.index_format import CURRENT_FILE, MANIFEST_FILE, IndexEntry, RetrievalIndex
from oxford_ir.retrieval.search import Searcher

log = logging.getLogger(__name__)

#: seconds before a version that failed to load is tried again although ``CURRENT`` did not change
RETRY_FAILED_S = 60.0
#: how many replaced versions' entries are kept to resolve ids of pages listed before a switch
KEEP_RETIRED = 2
#: how long a request that needs the newest version (a thumbnail whose file changed) waits for it to load
WAIT_FOR_LOAD_S = 30.0


def version_token(index: RetrievalIndex) -> str:
    """Changes whenever the rows do (content, not folder name: a rebuild to the same rows keeps it), so that
    browsers may cache a thumbnail URL carrying it for good, and an id with it names one image."""
    digest = hashlib.sha256(str(index.fingerprint).encode())
    for entry in index.entries:
        digest.update(f"\0{entry.path}\0{entry.size}\0{entry.mtime_ns}".encode())
    return digest.hexdigest()[:12]


def built_time(index: RetrievalIndex) -> tuple[str | None, str]:
    """When the version was built, ISO 8601, and where that came from: the manifest's ``created`` (written by
    every build), else the manifest file's mtime (an index from before ``created`` existed), else None."""
    created = (index.manifest or {}).get("created")
    if isinstance(created, str) and created:
        return created, "manifest"
    try:
        mtime = (Path(index.path) / index.version / MANIFEST_FILE).stat().st_mtime
    except OSError:
        return None, "unknown"
    return _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).isoformat(timespec="seconds"), "manifest file time"


def file_matches(path: Path, entry: IndexEntry) -> bool:
    """Whether the file at ``path`` is still the one ``entry`` recorded (size and mtime, as the index build
    decides what changed); a missing file does not match."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_size, info.st_mtime_ns) == (entry.size, entry.mtime_ns)


@dataclass(frozen=True, eq=False)
class Listing:
    """What ids of a version mean: its rows' entries, under ``root``; all a page of a replaced version needs."""

    name: str
    token: str
    root: Path
    entries: list[IndexEntry] = field(repr=False)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True, eq=False)
class ServedVersion:
    """One committed version and everything an answer about it needs; never changes once built."""

    index: RetrievalIndex
    searcher: Searcher
    #: the version folder's name (``v000003``), or "" for an index not read from a folder
    name: str
    token: str
    built: str | None
    built_source: str
    #: (inode, mtime_ns) of the version's manifest: tells a rebuild under the same folder name apart
    identity: tuple[int, int] | None
    lowered_paths: list[str] = field(repr=False)

    @classmethod
    def of(cls, index: RetrievalIndex, searcher: Searcher) -> ServedVersion:
        built, source = built_time(index)
        return cls(
            index=index,
            searcher=searcher,
            name=str(getattr(index, "version", "") or ""),
            token=version_token(index),
            built=built,
            built_source=source,
            identity=_manifest_identity(Path(index.path), str(getattr(index, "version", "") or "")),
            lowered_paths=[entry.path.lower() for entry in index.entries],
        )

    @property
    def entries(self) -> list[IndexEntry]:
        return self.index.entries

    @property
    def root(self) -> Path:
        return Path(self.index.root)

    def listing(self) -> Listing:
        return Listing(self.name, self.token, self.root, self.entries)

    def __len__(self) -> int:
        return len(self.index.entries)


def _manifest_identity(path: Path, name: str) -> tuple[int, int] | None:
    if not name:
        return None
    try:
        info = (path / name / MANIFEST_FILE).stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def _current_stat(path: Path) -> tuple[int, int, int] | None:
    try:
        info = (path / CURRENT_FILE).stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _share_entries(new: RetrievalIndex, old: Sequence[IndexEntry]) -> None:
    """Replace the new version's entries that equal an old one by the old object: the retired versions kept
    for old pages then cost little more than a list of pointers."""
    by_path = {entry.path: entry for entry in old}
    new.entries[:] = [e if (o := by_path.get(e.path)) is None or o != e else o for e in new.entries]


class ServedIndex:
    """The version served now, and the watch on ``CURRENT`` that replaces it (see the module docstring).

    ``make_searcher(index)`` builds the searcher of a new version with the server's search settings.
    ``check_s``: at least this many seconds between two looks at ``CURRENT`` (0: every request).
    """

    def __init__(
        self, first: ServedVersion, make_searcher: Callable[[RetrievalIndex], Searcher], *, check_s: float = 1.0
    ) -> None:
        self.path = Path(first.index.path)
        self.make_searcher = make_searcher
        self.check_s = float(check_s)
        self._version = first
        self._retired: OrderedDict[str, Listing] = OrderedDict()
        self._lock = threading.Lock()  # guards the fields below, held only for a few assignments
        self._seen: Any = "unread"  # the first look reads CURRENT: it may have moved on since ``first`` was loaded
        self._checked = time.monotonic()
        self._loader: threading.Thread | None = None
        self._failed: tuple[Any, str, float] | None = None  # (CURRENT's stat, version name, when)
        self.switches = 0

    # -- what requests use ------------------------------------------------------------------------------
    def current(self) -> ServedVersion:
        """The version to answer with; starts loading a newer one when ``CURRENT`` changed (not waiting)."""
        now = time.monotonic()
        if now - self._checked >= self.check_s:
            self._checked = now
            self._look(now)
        return self._version

    def newest(self, timeout: float = WAIT_FOR_LOAD_S) -> ServedVersion:
        """Look at ``CURRENT`` now and wait (up to ``timeout`` s) for a newer version to load: for a request
        that found its file changed on disk, which the next version may already describe."""
        now = time.monotonic()
        self._checked = now
        self._look(now)
        loader = self._loader
        if loader is not None:
            loader.join(timeout)
        return self._version

    def listing(self, token: str) -> Listing | ServedVersion | None:
        """The served or a recently replaced version with ``token``; None when unknown."""
        version = self._version
        if token == version.token:
            return version
        with self._lock:
            return self._retired.get(token)

    # -- the switch -------------------------------------------------------------------------------------
    def _look(self, now: float) -> None:
        seen = _current_stat(self.path)
        with self._lock:
            if seen == self._seen and not self._retry_due(now):
                return
            if self._loader is not None and self._loader.is_alive():
                return
            self._loader = threading.Thread(target=self._load, args=(seen,), name="oxford-ir-index-reload", daemon=True)
            self._loader.start()

    def _retry_due(self, now: float) -> bool:
        return self._failed is not None and now - self._failed[2] >= RETRY_FAILED_S

    def _load(self, seen: Any) -> None:
        old = self._version
        try:
            # empty: written in place by another tool at this moment (a build replaces it whole); the next look
            name = (self.path / CURRENT_FILE).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            name = None
        if name is None or (name == old.name and _manifest_identity(self.path, name) == old.identity):
            with self._lock:
                self._seen = seen
                self._failed = None
            return
        failed = self._failed
        if failed is not None and failed[:2] == (seen, name) and not self._retry_due(time.monotonic()):
            return
        try:
            version = self._open(name)
        except Exception as error:  # noqa: BLE001 - whatever is wrong with it, the old version stays served
            log.warning(
                "index %s: version %s cannot be served (%s); still serving %s",
                self.path,
                name,
                str(error).splitlines()[0] if str(error) else type(error).__name__,
                old.name or "the first one",
            )
            with self._lock:
                self._seen = seen
                self._failed = (seen, name, time.monotonic())
            return
        with self._lock:
            self._retired[old.token] = old.listing()
            self._retired.pop(version.token, None)
            while len(self._retired) > KEEP_RETIRED:
                self._retired.popitem(last=False)
            self._version = version
            self._seen = seen
            self._failed = None
            self.switches += 1
        log.info(
            "index %s: now serving %s (%d images, built %s); was %s (%d images)",
            self.path,
            version.name,
            len(version),
            version.built or "at an unknown time",
            old.name,
            len(old),
        )

    def _open(self, name: str) -> ServedVersion:
        """Load, verify and warm up the version ``CURRENT`` names now (the model and the backend are built here,
        not by the first request); raises whatever makes it unservable."""
        index = RetrievalIndex.load(self.path, mmap=True)
        if len(index) == 0:
            raise ValueError(f"version {index.version} holds no images")
        _share_entries(index, self._version.entries)
        searcher = self.make_searcher(index)
        searcher.model  # noqa: B018 - a missing checkpoint fails here, not on a visitor's query
        searcher.database  # noqa: B018 - and the search backend is ready before the switch
        return ServedVersion.of(index, searcher)


def searcher_like(template: Searcher) -> Callable[[RetrievalIndex], Searcher]:
    """A factory of searchers with ``template``'s settings (backend, re-ranking, device, batching)."""

    def make(index: RetrievalIndex) -> Searcher:
        return Searcher(
            index,
            backend=template.backend,
            faiss=template.faiss_options,
            query_expansion=template.query_expansion,
            database_augmentation=template.database_augmentation,
            device=template.device,
            batch_size=template.batch_size,
            num_workers=template.num_workers,
        )

    return make
