"""Revisited Oxford/Paris' 1M distractors (R1M, Radenović et al., CVPR 2018): the layout, and fetching any parts.

revisitop distributes them as 100 archives ``<base>/jpg/revisitop1m.<k>.tar.gz`` (k = 1..100; members are paths
relative to ``jpg/``) and ``<base>/revisitop1m.txt``, the 1,001,001 image names. ``oxford-ir-data download r1m
[--parts 1-10]`` fills ``<root>/revisitop1m/``::

    revisitop1m/
      revisitop1m.txt           the image list (names relative to jpg/)
      jpg/...                   the images of the parts downloaded
      parts.json                a record per part: url, size, sha256, files extracted (and how many of them the list
                                does not name: a warning), state (fetched | extracted)

No checksums are published for R1M, so the sha256 of each archive and of the list are recorded when first
downloaded; a kept or half-extracted archive found by a later run is checked against that record (a mismatch
fetches it again), and a list file that changed on disk is refused. As every download of the project it resumes a
cut transfer (:mod:`~oxford_ir.benchmarks.http_fetch`), extracts safely (:func:`~oxford_ir.benchmarks.archives.
safe_extract`), skips parts already extracted and adds parts asked for later.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path

from oxford_ir.benchmarks.archives import CorruptArchiveError, safe_extract
from oxford_ir.benchmarks.download import _locked, _read_json, _write_json_atomic
from oxford_ir.benchmarks.http_fetch import fetch_with_digest
from oxford_ir.benchmarks.part_lists import parse_part_list
from oxford_ir.errors import ConfigError, DownloadError
from oxford_ir.hashing import file_sha256

log = logging.getLogger(__name__)

R1M_FOLDER = "revisitop1m"
IMAGE_FOLDER = "jpg"
LIST_FILE = "revisitop1m.txt"
PARTS_FILE = "parts.json"
NUM_PARTS = 100
NUM_IMAGES = 1_001_001
BASE_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"


def part_name(part: int) -> str:
    """The archive of part ``part`` (1..100): ``revisitop1m.<part>.tar.gz``."""
    return f"revisitop1m.{part}.tar.gz"


def r1m_dir(root: str | os.PathLike) -> Path:
    """``root/revisitop1m``, or ``root`` itself when it is that folder."""
    root = Path(root).expanduser()
    return root if root.name == R1M_FOLDER else root / R1M_FOLDER


def parse_r1m_parts(text: str | None) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``; ``"all"`` or None -> 1..100."""
    return parse_part_list("all" if text is None else text, 1, NUM_PARTS, "r1m", "1-10,42")


def download_r1m(
    root: str | os.PathLike,
    parts: list[int],
    *,
    base_url: str | None = None,
    progress: bool = True,
    keep_archives: bool = False,
    retries: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """Fetch the list and the archives ``parts`` (1..100) into ``root/revisitop1m/`` (module docstring); return it.

    Raises :class:`DownloadError` (naming the part) or :class:`ConfigError`.
    """
    if not parts or any(not 1 <= p <= NUM_PARTS for p in parts):
        raise ConfigError(f"r1m: parts {parts}: choose from 1 to {NUM_PARTS} (--parts 1-10,42 or all)")
    base = (base_url or BASE_URL).rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        raise ConfigError(f"base URL must start with http://, https:// or file://, got {base_url!r}")
    target = r1m_dir(root)
    target.mkdir(parents=True, exist_ok=True)
    options = {"progress": progress, "retries": retries, "backoff": backoff, "timeout": timeout}
    hint = f"check --base-url (the tree of {BASE_URL}: {LIST_FILE}, jpg/revisitop1m.<k>.tar.gz) or your connection"
    with _locked(target):
        record = _read_json(target / PARTS_FILE)
        record.setdefault("parts", {})
        listed = record.get("list")
        list_path = target / LIST_FILE
        if listed and list_path.is_file() and file_sha256(list_path) != listed["sha256"]:
            raise DownloadError(
                f"{list_path} does not match the sha256 recorded in {target / PARTS_FILE} when it was downloaded; "
                "delete it and run oxford-ir-data download r1m again"
            )
        if not (listed and list_path.is_file()):
            url = f"{base}/{LIST_FILE}"
            _, digest, size = fetch_with_digest(url, list_path, None, hint=hint, **options)
            record["list"] = {"url": url, "sha256": digest, "size": size}
            _write_json_atomic(target / PARTS_FILE, record)
        listed: set[str] | None = None
        for part in parts:
            entry = record["parts"].get(str(part), {})
            if entry.get("state") == "extracted":
                log.info("r1m: %s is extracted already", part_name(part))
                continue
            if listed is None:
                listed = set(_read_list(list_path))
            entry = _fetch_part(target, base, part, entry, hint, keep_archives, record, options)
            record["parts"][str(part)] = _check_listed(entry, part, listed, target)
            _write_json_atomic(target / PARTS_FILE, record)
    done = sorted(int(k) for k, v in record["parts"].items() if v.get("state") == "extracted")
    log.info("r1m: %d of %d parts extracted in %s", len(done), NUM_PARTS, target)
    return target


def _fetch_part(
    target: Path, base: str, part: int, entry: dict, hint: str, keep_archives: bool, record: dict, options: dict
) -> dict:
    """Fetch (or check the kept archive against its recorded sha256), record, extract one part; its record."""
    name = part_name(part)
    url = f"{base}/{IMAGE_FOLDER}/{name}"
    expected = entry.get("sha256") if entry.get("url") == url else None  # recorded by the run that fetched it
    archive = target / name
    if expected is None:
        archive.unlink(missing_ok=True)  # never extract an archive whose download was not recorded
    path, digest, size = fetch_with_digest(url, archive, expected, hint=hint, **options)
    entry = {"filename": name, "url": url, "sha256": digest, "size": size, "state": "fetched"}
    record["parts"][str(part)] = entry
    _write_json_atomic(target / PARTS_FILE, record)  # the sha256 is on disk before anything is extracted
    log.info("r1m: extracting %s into %s", name, target / IMAGE_FOLDER)
    try:
        placed = safe_extract(path, target / IMAGE_FOLDER)
    except CorruptArchiveError as error:
        path.unlink(missing_ok=True)
        del record["parts"][str(part)]
        raise DownloadError(f"r1m part {part}: {error}; deleted it, re-run to download it again") from None
    if not keep_archives:
        path.unlink(missing_ok=True)
    names = [p.relative_to(target / IMAGE_FOLDER).as_posix() for p in placed]
    return {**entry, "state": "extracted", "extracted_files": len(placed), "names": names}


def _check_listed(entry: dict, part: int, listed: set[str], target: Path) -> dict:
    """The part's record, with how many of its files the list does not name (a warning when any: another archive)."""
    names = entry.pop("names")
    unlisted = [n for n in names if n not in listed]
    if unlisted:
        log.warning(
            "r1m part %d: %d of its %d files are not named in %s (first: %s): is the mirror serving revisitop's "
            "archives?",
            part,
            len(unlisted),
            len(names),
            target / LIST_FILE,
            unlisted[0],
        )
    return {**entry, "unlisted_files": len(unlisted)}


def _read_list(path: Path) -> list[str]:
    """The names of revisitop1m.txt (paths relative to jpg/)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.strip() for line in handle if line.strip()]


def r1m_status(root: str | os.PathLike) -> tuple[Path, int | None, list[int]]:
    """The image folder, the number of names in the list (None without it), the parts extracted."""
    target = r1m_dir(root)
    listed = len(_read_list(target / LIST_FILE)) if (target / LIST_FILE).is_file() else None
    parts = _read_json(target / PARTS_FILE).get("parts", {})
    return target / IMAGE_FOLDER, listed, sorted(int(k) for k, v in parts.items() if v.get("state") == "extracted")
