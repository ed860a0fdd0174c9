"""Check a benchmark's images against its ground truth before spending hours on extraction.

A missing or corrupt image otherwise surfaces deep inside a DataLoader worker, after
minutes of work; the Paris6k archives are known to ship a few corrupt JPEGs. Every
listed image is decoded exactly as training and evaluation decode it
(:func:`oxford_ir.images.load_image`), so a truncated JPEG is caught here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.errors import DataError
from oxford_ir.images import load_image


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_benchmark` found: counts, missing images per role, undecodable images with the reason."""

    benchmark: str
    image_dir: Path
    n_db: int
    n_queries: int
    #: database images that do not exist on disk, in ``imlist`` order
    missing_db: list[Path]
    #: query images that do not exist on disk, in ``qimlist`` order
    missing_queries: list[Path]
    #: (image, why) for every image on disk that cannot be decoded
    undecodable: list[tuple[Path, str]]
    #: how many distinct images were decoded
    n_checked: int

    @property
    def missing(self) -> list[Path]:
        """Every missing image once (a query image is often a database image too)."""
        return list(dict.fromkeys([*self.missing_db, *self.missing_queries]))

    @property
    def ok(self) -> bool:
        """All listed images are present and decodable."""
        return not self.missing and not self.undecodable

    def passed(self, allow_missing: bool = False) -> bool:
        """Nothing undecodable, and nothing missing unless ``allow_missing`` (a subset is accepted)."""
        return not self.undecodable and (allow_missing or not self.missing)

    def format(self, max_listed: int = 20, allow_missing: bool = False) -> str:
        """Human-readable report ending in OK or FAILED; long lists are cut after ``max_listed`` entries."""
        lines = [
            f"{self.benchmark}: {self.n_db} database images, {self.n_queries} query images listed; "
            f"images in {self.image_dir}",
            f"  missing: {len(self.missing_db)} database, {len(self.missing_queries)} query "
            f"({len(self.missing)} distinct files)",
        ]
        lines += _listing(self.missing, max_listed, lambda p: f"    {p}")
        lines.append(f"  undecodable: {len(self.undecodable)} of {self.n_checked} images on disk")
        lines += _listing(self.undecodable, max_listed, lambda item: f"    {item[0]}: {item[1]}")
        if self.ok:
            lines.append("  OK: every listed image is present and decodable")
        elif self.passed(allow_missing):
            lines.append(
                f"  OK (subset): {len(self.missing)} missing images accepted (--allow-missing); every image on disk "
                "decodes. Numbers on this subset are not comparable with published ones"
            )
        else:
            fixes = []
            if self.missing and not allow_missing:
                fixes.append(
                    "download the missing images (oxford-ir-data download), or pass --allow-missing to accept "
                    "the subset on disk"
                )
            if self.undecodable:
                fixes.append(
                    "the undecodable files are corrupt: delete them and accept the subset (--allow-missing; Paris6k "
                    "ships a few corrupt images), or download the dataset again after removing its .complete.json"
                )
            lines.append("  FAILED: " + "; ".join(fixes))
        return "\n".join(lines)


def _listing(items: list, max_listed: int, fmt: Callable) -> list[str]:
    lines = [fmt(item) for item in items[:max_listed]]
    if len(items) > max_listed:
        lines.append(f"    ... and {len(items) - max_listed} more")
    return lines


def _decode_error(path: Path) -> str | None:
    """None when ``path`` decodes, else why not."""
    try:
        load_image(path)
    except DataError as error:
        return str(error).removeprefix(f"cannot decode image {path}: ")
    return None


def verify_benchmark(benchmark: Benchmark, *, workers: int | None = None, progress: bool = False) -> VerifyReport:
    """Find the listed images of ``benchmark`` that are missing or cannot be decoded.

    Each distinct image is fully decoded once, in ``workers`` threads (Pillow releases
    the GIL while decoding; default: up to 8, one per CPU).
    """
    names = list(dict.fromkeys([*benchmark.imlist, *benchmark.qimlist]))
    paths = {name: benchmark.image_path(name) for name in names}
    present = {name for name, path in paths.items() if path.is_file()}
    to_check = [paths[name] for name in names if name in present]
    workers = workers or min(8, os.cpu_count() or 1)
    undecodable: list[tuple[Path, str]] = []
    if to_check:
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(_decode_error, to_check)
            bar = tqdm(results, total=len(to_check), desc="decoding", unit="img", disable=not progress, leave=False)
            for path, why in zip(to_check, bar, strict=True):
                if why is not None:
                    undecodable.append((path, why))
    return VerifyReport(
        benchmark=benchmark.name,
        image_dir=benchmark.image_dir,
        n_db=benchmark.n_db,
        n_queries=benchmark.n_queries,
        missing_db=[paths[n] for n in dict.fromkeys(benchmark.imlist) if n not in present],
        missing_queries=[paths[n] for n in dict.fromkeys(benchmark.qimlist) if n not in present],
        undecodable=undecodable,
        n_checked=len(to_check),
    )
