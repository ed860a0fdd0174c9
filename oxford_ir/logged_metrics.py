"""The metrics a training run logged, read from its files without trusting them: Lightning's ``csv/metrics.csv``
and W&B's offline transaction log ``wandb/offline-run-*/run-<id>.wandb`` (read without W&B's service or network).

A run killed mid-write, a disk that filled up, a file copied half-way or edited by hand: each damaged line or record
is skipped with one warning naming the file and the line (or byte offset) and what was left out, and the rest is
used. Nothing here raises on what a file holds. Only numbers are kept (images and tables of the W&B log are not).
"""

from __future__ import annotations

import csv
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: one logged row: metric -> value; ``epoch`` and ``step`` among them when the logger wrote them
Row = dict[str, float]
#: the step column of each logger (Lightning's CSVLogger; its WandbLogger): both read as ``step``
STEP_KEYS = {"step": "step", "trainer/global_step": "step"}
#: warnings about one file beyond this many are counted, not listed
MAX_WARNINGS_PER_FILE = 5


class Warnings(list):
    """Warning lines (``<file>:<line>: what was skipped``), at most :data:`MAX_WARNINGS_PER_FILE` per file."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}

    def add(self, path: Path, text: str) -> None:
        count = self._counts[str(path)] = self._counts.get(str(path), 0) + 1
        if count <= MAX_WARNINGS_PER_FILE:
            self.append(text)

    def close(self) -> None:
        """Append one line per file that had more warnings than were listed."""
        for path, count in self._counts.items():
            if count > MAX_WARNINGS_PER_FILE:
                self.append(f"{path}: {count - MAX_WARNINGS_PER_FILE} more damaged lines or records skipped")
        self._counts.clear()


def number(value: Any) -> float | None:
    """``value`` as a finite-or-not float, None when it is no number (empty, text, a W&B image's dict)."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- Lightning's CSV ---------------------------------------------------------------------------------------------
def csv_rows(path: Path, warnings: Warnings, still_writing: bool = False) -> list[Row]:
    """The rows of a Lightning ``metrics.csv``. A line that is not UTF-8, has another number of fields than the
    header or a field that is not a number is skipped with a warning; a last line cut short (a run killed, or still
    writing: then without a warning) keeps its fields before the cut, which were written whole."""
    try:
        data = path.read_bytes()
    except OSError as error:
        warnings.add(path, f"{path}: cannot be read ({error.strerror}): left out")
        return []
    lines = data.split(b"\n")
    cut = lines[-1] != b""  # no newline at the end: the last line is cut short
    if not cut:
        lines = lines[:-1]
    header = _csv_fields(path, 1, lines[0] if lines else b"", warnings)
    if not header:
        if lines:
            warnings.add(path, f"{path}:1: no header line: the file is left out")
        return []
    if cut and len(lines) == 1:
        return []  # the header is still being written
    rows = []
    for index, raw in enumerate(lines[1:], start=2):
        last_cut = cut and index == len(lines)
        fields = _csv_fields(path, index, raw, warnings)
        if fields is None:
            continue
        if last_cut:
            if not still_writing:
                left = header[len(fields) - 1] if len(fields) <= len(header) else "its end"
                warnings.add(path, f"{path}:{index}: the last line is cut short (a run killed while writing it): "
                                   f"its fields from {left} on are left out")  # fmt: skip
            fields = fields[:-1]  # the field the cut went through may be cut itself
        elif len(fields) != len(header):
            warnings.add(path, f"{path}:{index}: {len(fields)} fields where the header has {len(header)}: "
                               "line skipped")  # fmt: skip
            continue
        row, bad = {}, None
        for name, text in zip(header, fields, strict=False):
            value = number(text)
            if value is None and text.strip():
                bad = (name, text)
                break
            if value is not None:
                row[STEP_KEYS.get(name, name)] = value
        if bad is not None:
            warnings.add(path, f"{path}:{index}: {bad[0]} holds {bad[1][:20]!r}, not a number: line skipped")
            continue
        if row:
            rows.append(row)
    return rows


def _csv_fields(path: Path, index: int, raw: bytes, warnings: Warnings) -> list[str] | None:
    try:
        text = raw.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError as error:
        warnings.add(path, f"{path}:{index}: not UTF-8 text (byte {error.start} of the line): line skipped")
        return None
    if "\x00" in text:
        warnings.add(path, f"{path}:{index}: holds NUL bytes (a file cut and padded by a crash?): line skipped")
        return None
    try:
        return next(csv.reader([text]), [])
    except csv.Error as error:
        warnings.add(path, f"{path}:{index}: not a CSV line ({error}): line skipped")
        return None


# -- W&B's transaction log ---------------------------------------------------------------------------------------
#: the W&B transaction log (``run-<id>.wandb``, what ``wandb sync`` uploads): a 7-byte header, then LevelDB-style
#: 32 KiB blocks of chunks (crc32, length, type), each record a serialised ``wandb_internal_pb2.Record``
WANDB_MAGIC = b":W&B"
WANDB_BLOCK = 32768
WANDB_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_rows(path: Path, warnings: Warnings, still_writing: bool = False) -> list[Row]:
    """The numeric history rows of a W&B run file (``epoch``; ``trainer/global_step`` as ``step``)."""
    rows = []
    for record in wandb_records(path, warnings, still_writing):
        if not record.HasField("history"):
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                value = number(json.loads(item.value_json))
            except ValueError:
                value = None
            if value is not None:
                row[STEP_KEYS.get(key, key)] = value
        if row:
            rows.append(row)
    return rows


def wandb_records(path: Path, warnings: Warnings, still_writing: bool = False) -> Iterator[Any]:
    """The records of a W&B run file, without the W&B service. A record that does not parse is skipped with a
    warning; a record cut short ends the file (with a warning unless the run is still writing it)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    try:
        data = path.read_bytes()
    except OSError as error:
        warnings.add(path, f"{path}: cannot be read ({error.strerror}): left out")
        return
    if len(data) < WANDB_HEADER:  # a run that has just started
        return
    if data[:4] != WANDB_MAGIC:
        warnings.add(path, f"{path}: not a W&B run file (no {WANDB_MAGIC!r} header): left out")
        return
    pos, pending, start = WANDB_HEADER, b"", WANDB_HEADER
    while pos + WANDB_HEADER <= len(data):
        space = WANDB_BLOCK - pos % WANDB_BLOCK
        if space < WANDB_HEADER:  # a block's tail too short for a chunk header is padding
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + WANDB_HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += space
            continue
        if kind not in (FULL, FIRST, MIDDLE, LAST) or length > space - WANDB_HEADER:
            warnings.add(path, f"{path}: byte {pos}: not a record chunk (damaged): the rest of the block skipped")
            pos, pending = pos + space, b""
            continue
        if pos + WANDB_HEADER + length > len(data):
            break
        if kind in (FULL, FIRST):
            start = pos
        chunk = data[pos + WANDB_HEADER : pos + WANDB_HEADER + length]
        pos += WANDB_HEADER + length
        if kind in (FIRST, MIDDLE):
            pending = chunk if kind == FIRST else pending + chunk
            continue
        raw, pending = (chunk if kind == FULL else pending + chunk), b""
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:
            warnings.add(path, f"{path}: byte {start}: a record that does not parse (damaged): skipped")
            continue
        yield record
    if not still_writing and (pending or any(data[pos:])):
        warnings.add(path, f"{path}: byte {pos}: the last record is cut short (a run killed while writing it): "
                           "left out")  # fmt: skip
