"""Downloading Google Landmarks v2's training set, or any subset of its 500 image TARs.

``oxford-ir-data download gldv2 --parts 0-3,7`` fetches into ``<root>/gldv2/``: ``train_clean.csv`` and
``train.csv`` (always), then for each part ``md5.images_NNN.txt`` and ``images_NNN.tar`` (about 1 GB each: the whole
set is about 500 GB, so the parts are always named), checks the TAR's md5 against its md5 file, unpacks it into
``train/`` (:func:`~oxford_ir.benchmarks.archives.safe_extract`: no member may leave the folder) and records the ids
it held (``.parts/images_NNN.ids``, what :func:`~oxford_ir.benchmarks.gldv2.load_gldv2` restricts the CSVs to).

The official URLs (github.com/cvdfoundation/google-landmark) follow one pattern, so the 500 parts are generated here
rather than listed in ``conf/download/`` (whose entries carry a sha256, not an md5 read from a second file):
``<base>/metadata/<csv>``, ``<base>/train/images_NNN.tar``, ``<base>/md5sum/train/md5.images_NNN.txt``, with
``<base>`` = ``https://s3.amazonaws.com/google-landmark`` or a mirror (``--base-url``) with the same tree.

Resumable as every download of the project (:mod:`~oxford_ir.benchmarks.download`): a TAR continues from its
``.part`` file, a part counts as done only once checked, unpacked and its ids recorded (``.download-state.json``),
and ``.complete.json`` (listing the parts) is written last, so a rerun skips the parts already done and an
interrupted run is never read as a dataset. Asking for more parts later removes the marker until they are in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

from oxford_ir import __version__
from oxford_ir.benchmarks.archives import CorruptArchiveError, safe_extract
from oxford_ir.benchmarks.download import _locked, _read_json, _write_json_atomic, dataset_dir
from oxford_ir.benchmarks.gldv2 import (
    CLEAN_CSV,
    COMPLETE_MARKER,
    FULL_CSV,
    GLDV2_FOLDER,
    IMAGE_FOLDER,
    NUM_PARTS,
    PARTS_FOLDER,
    STATE_FILE,
    part_name,
    write_part_ids,
)
from oxford_ir.benchmarks.http_fetch import fetch_with_digest
from oxford_ir.benchmarks.part_lists import format_part_list as format_parts  # noqa: F401  (re-exported)
from oxford_ir.benchmarks.part_lists import parse_part_list
from oxford_ir.errors import ConfigError, DownloadError

log = logging.getLogger(__name__)

BASE_URL = "https://s3.amazonaws.com/google-landmark"
#: approximate size of one training TAR, for the message that asks for --parts
PART_GB = 1.0
_MD5 = re.compile(rb"^\s*([0-9a-fA-F]{32})\b")


def parse_parts(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; ``"all"`` -> every part. A ConfigError says what a part list looks like."""
    return parse_part_list(text, 0, NUM_PARTS - 1, "gldv2", "0-3,7")


def download_gldv2(
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
    """Fetch the CSVs and the training TARs ``parts`` into ``root/gldv2/`` (see the module docstring); return it.

    Raises :class:`DownloadError` (a part whose md5 does not match names the part and its md5 file; the TAR is
    deleted, so a rerun fetches it again) or :class:`ConfigError`.
    """
    if not parts:
        raise ConfigError("gldv2: no parts asked for; pass --parts 0-3,7 (or all)")
    bad = [p for p in parts if not 0 <= p < NUM_PARTS]
    if bad:
        raise ConfigError(f"gldv2: part {bad[0]} does not exist; the parts are 0 to {NUM_PARTS - 1}")
    base = (base_url or BASE_URL).rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        raise ConfigError(f"base URL must start with http://, https:// or file://, got {base_url!r}")
    target = dataset_dir(GLDV2_FOLDER, root)
    target.mkdir(parents=True, exist_ok=True)
    options = {"progress": progress, "retries": retries, "backoff": backoff, "timeout": timeout}
    hint = f"check --base-url (the tree of {BASE_URL}: metadata/, train/, md5sum/train/) or your connection"
    with _locked(target):
        marker = _read_json(target / COMPLETE_MARKER)
        state = _read_json(target / STATE_FILE)
        done: dict[str, dict] = {**marker.get("part_records", {}), **state.get("parts", {})}
        done = {k: v for k, v in done.items() if (target / PARTS_FOLDER / f"{part_name(int(k))}.ids").is_file()}
        wanted = sorted(set(parts) | {int(k) for k in done})
        csvs_there = all((target / name).is_file() for name in (CLEAN_CSV, FULL_CSV))
        if marker and csvs_there and all(str(p) in done for p in wanted) and marker.get("parts") == wanted:
            log.info("gldv2: parts %s are in %s already", format_parts(wanted), target)
            return target
        # from here on the folder is unfinished: the state file first, then the marker goes
        state = {"parts": done, "files": marker.get("files", state.get("files", []))}
        _write_json_atomic(target / STATE_FILE, state)
        (target / COMPLETE_MARKER).unlink(missing_ok=True)
        files = []
        for name in (CLEAN_CSV, FULL_CSV):
            url = f"{base}/metadata/{name}"
            _, digest, size = fetch_with_digest(url, target / name, None, hint=hint, **options)
            files.append({"filename": name, "url": url, "sha256": digest, "size": size})
        state["files"] = files
        _write_json_atomic(target / STATE_FILE, state)
        for part in parts:
            if str(part) in done:
                log.info("gldv2: %s.tar is unpacked already", part_name(part))
                continue
            done[str(part)] = _fetch_part(target, base, part, hint, keep_archives, options)
            _write_json_atomic(target / STATE_FILE, state)
        record = {
            "dataset": GLDV2_FOLDER,
            "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "oxford_ir_version": __version__,
            "parts": wanted,
            "part_records": done,
            "files": files,
        }
        _write_json_atomic(target / COMPLETE_MARKER, record)
        (target / STATE_FILE).unlink(missing_ok=True)
    log.info("gldv2: parts %s complete in %s", format_parts(wanted), target)
    return target


def _fetch_part(target: Path, base: str, part: int, hint: str, keep_archives: bool, options: dict) -> dict:
    """Fetch, check, unpack and record one TAR; return its record."""
    name = part_name(part)
    md5_name, tar_name = f"md5.{name}.txt", f"{name}.tar"
    (target / md5_name).unlink(missing_ok=True)  # a few bytes: always the server's current one
    md5_path, _, _ = fetch_with_digest(f"{base}/md5sum/train/{md5_name}", target / md5_name, None, hint=hint, **options)
    match = _MD5.match(md5_path.read_bytes())
    if match is None:
        md5_path.unlink(missing_ok=True)
        raise DownloadError(
            f"{md5_path}: no md5 in it (expected '<32 hex digits>  {tar_name}'); deleted it, re-run to fetch it again"
        )
    expected = match[1].decode().lower()
    url = f"{base}/train/{tar_name}"
    tar_path, _, size = fetch_with_digest(url, target / tar_name, None, hint=hint, **options)
    actual = _md5(tar_path)
    if actual != expected:
        tar_path.unlink(missing_ok=True)
        md5_path.unlink(missing_ok=True)
        raise DownloadError(
            f"gldv2 part {part} ({tar_name}): md5 {actual} does not match {expected} from {md5_name}; deleted both, "
            "re-run to fetch them again (if it persists, the mirror serves another file)"
        )
    log.info("gldv2: extracting %s into %s", tar_name, target / IMAGE_FOLDER)
    try:
        placed = safe_extract(tar_path, target / IMAGE_FOLDER)
    except CorruptArchiveError as error:
        tar_path.unlink(missing_ok=True)
        raise DownloadError(f"gldv2 part {part}: {error}; deleted it, re-run to download it again") from None
    write_part_ids(target, part, [str(p) for p in placed])
    if not keep_archives:
        tar_path.unlink(missing_ok=True)
    return {"filename": tar_name, "url": url, "md5": actual, "size": size, "extracted_files": len(placed)}


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
