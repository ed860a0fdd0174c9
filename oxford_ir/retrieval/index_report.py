"""What one index build did (:class:`IndexReport`): the counts, the files listed per change, the files skipped
and why; written to the index folder's ``report.json`` (:func:`write_report`) and printed by ``oxford-ir-index``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oxford_ir.fs import replace_file
from oxford_ir.retrieval.index_format import REPORT_FILE, SkippedImage

#: paths listed per category in report.json (the counts are always complete; skipped files are all listed)
_LISTED_PATHS = 1000


@dataclass
class IndexReport:
    """What one :func:`~oxford_ir.retrieval.index_build.build_index` run did. ``count == kept + added + updated``."""

    out: Path
    version: str
    count: int
    embedding_dim: int
    dtype: str
    added: list[str]
    updated: list[str]
    removed: list[str]
    kept: int
    skipped: list[SkippedImage]
    #: images decoded and run through the model (added, updated and those found undecodable)
    attempted: int
    seconds: float
    embed_seconds: float
    #: a new version was written (false when nothing changed)
    wrote: bool
    #: why every row was re-embedded (another model, settings, root or dtype; corrupt index), or None
    rebuilt: str | None = None

    @property
    def embedded(self) -> int:
        return len(self.added) + len(self.updated)

    @property
    def images_per_second(self) -> float:
        return self.attempted / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.out),
            "version": self.version,
            "count": self.count,
            "embedding_dim": self.embedding_dim,
            "dtype": self.dtype,
            "added": len(self.added),
            "updated": len(self.updated),
            "removed": len(self.removed),
            "kept": self.kept,
            "skipped": len(self.skipped),
            "embedded": self.embedded,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "wrote": self.wrote,
            "rebuilt": self.rebuilt,
            **{f"{name}_paths": paths[:_LISTED_PATHS] for name, paths in self._lists()},
            "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }

    def _lists(self) -> list[tuple[str, list[str]]]:
        return [("added", self.added), ("updated", self.updated), ("removed", self.removed)]

    def summary(self, max_listed: int = 20) -> str:
        """Lines for the terminal: counts, speed, where the index is, and each skipped file with its reason."""
        lines = [
            f"index: {self.out} ({self.version}: {self.count} images x {self.embedding_dim} dims, {self.dtype})",
            f"added {len(self.added)}, updated {len(self.updated)}, removed {len(self.removed)}, kept {self.kept}, "
            f"skipped {len(self.skipped)} in {self.seconds:.1f} s "
            f"({self.attempted} files read at {self.images_per_second:.1f} images/s)",
        ]
        if self.rebuilt:
            lines.append(f"re-embedded everything: {self.rebuilt}")
        if not self.wrote:
            lines.append("nothing changed: the index was left as it was")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s) that could not be read:")
            lines += [f"  {s.path}: {s.reason}" for s in self.skipped[:max_listed]]
            if len(self.skipped) > max_listed:
                lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        lines.append(f"report: {self.out / REPORT_FILE}")
        return "\n".join(lines)


def write_report(out: Path, report: IndexReport) -> None:
    """Replace ``out/report.json`` with ``report`` (atomically)."""
    replace_file(out / REPORT_FILE, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
