"""sha256 of files, streamed: download checks, index checksums and model fingerprints share it."""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
