"""Reading what W&B wrote offline: the records of a ``run-<id>.wandb`` file.

The file is W&B's transaction log (what ``wandb sync`` uploads): a 7-byte header, then
LevelDB-style 32 KiB blocks of chunks (crc32, length, type FULL/FIRST/MIDDLE/LAST), each
record a serialised ``wandb_internal_pb2.Record``. wandb >= 0.2x dropped its Python reader.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending, raw = HEADER, b"", []
    while pos + HEADER <= len(data):
        space = BLOCK - pos % BLOCK
        if space < HEADER:
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += space - HEADER
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            raw.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            raw.append(pending + chunk)
            pending = b""
    records = []
    for chunk in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def read_finished_records(path: Path, timeout: float = 120.0) -> list:
    """The records of a run file once it holds the run's exit record: W&B's service process writes the file after
    ``wandb.finish()`` hands it the last records, so under load a reader right after the run may see it unfinished
    (the test that read it at once failed that way once). A run file still unfinished after ``timeout`` s fails."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(path)
        except (ValueError, OSError, struct.error):
            records = []
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            assert any(r.HasField("exit") for r in records), f"{path} holds no exit record after {timeout:.0f} s"
            return records
        time.sleep(0.5)
