"""``oxford-ir-data check``: what a user's collection (a folder per class or a CSV manifest) holds, and what is wrong.

The summary: images and classes, images per class (min / median / max and the smallest classes), images, classes,
queries and gallery images per split. Warnings (the exit status stays 0): classes with fewer than ``K`` training
images (the P x K sampler cannot fill a batch row with them), files of the folder that are not images (ignored).

Problems, each one line naming the file or the manifest line, exit status 1: rows of the manifest that cannot be
read (:mod:`~oxford_ir.benchmarks.collection_manifest` in ``strict=False`` mode, the same path under two labels
included), images outside any class folder, paths whose symbolic links lead outside the root, missing files, files
whose image header cannot be read (cheap: the pixels are not decoded), and files with the same content: under two
labels ("in two classes") or under one (duplicates). Contents are hashed only for files whose size another file
shares, so a million distinct images cost a ``stat`` each, not a read.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.collection import SPLITS, Collection
from oxford_ir.benchmarks.collection_folder import scan_folder
from oxford_ir.benchmarks.collection_manifest import load_manifest
from oxford_ir.fs import escapes
from oxford_ir.hashing import file_sha256
from oxford_ir.images import upright_size

#: smallest classes named in the summary
SMALLEST_SHOWN = 5


@dataclass
class CheckReport:
    """What :func:`check_collection` found: summary lines, warnings and problems (each one line)."""

    source: Path
    summary: list[str]
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_listed: int = 20) -> str:
        """The report as text: summary, then at most ``max_listed`` warnings and problems (with how many more)."""
        lines = list(self.summary)
        for title, items in (("warnings", self.warnings), ("problems", self.problems)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {item}" for item in items[:max_listed]]
                if len(items) > max_listed:
                    lines.append(f"  ... and {len(items) - max_listed} more (--max-listed)")
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s): fix them (or drop those images) and check again")
        return "\n".join(lines)


def _workers(workers: int | None) -> int:
    return workers or min(8, os.cpu_count() or 1)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _summary(collection: Collection, kind: str) -> list[str]:
    sizes = collection.class_sizes()
    order = np.argsort(sizes, kind="stable")[:SMALLEST_SHOWN]
    smallest = ", ".join(f"{str(collection.label_names[c])!r} {sizes[c]}" for c in order.tolist())
    lines = [
        f"{collection.source}: {len(collection)} images, {collection.num_classes} classes ({kind})",
        f"  images per class: min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}; smallest: {smallest}",
    ]
    for name in SPLITS:
        rows = collection.rows(name)
        if len(rows):
            classes = int(np.count_nonzero(collection.class_sizes(rows)))
            lines.append(
                f"  {name}: {len(rows)} images, {classes} classes, {int(collection.is_query[rows].sum())} queries, "
                f"{int(collection.is_gallery[rows].sum())} in the gallery"
            )
    lines.append(
        f"  queries: {int(collection.is_query.sum())}, gallery: {int(collection.is_gallery.sum())}, "
        f"with a box: {int(np.isfinite(collection.boxes[:, 0]).sum())}, with images to ignore: {len(collection.ignore)}"
    )
    return lines


def _too_small(collection: Collection, images_per_class: int) -> list[str]:
    train = collection.rows("train")
    sizes = collection.class_sizes(train)
    small = np.flatnonzero((sizes > 0) & (sizes < images_per_class))
    return [
        f"class {str(collection.label_names[c])!r} has {sizes[c]} training image(s), fewer than "
        f"--images-per-class {images_per_class}: the P x K sampler cannot draw {images_per_class} of it"
        for c in small.tolist()
    ]


def _file_problems(collection: Collection, where: Callable[[int], str], workers: int) -> list[str]:
    """Links out of the root, missing files, unreadable headers, same content twice."""
    problems: list[str] = []
    names = collection.paths.tolist()
    outside = {position: why for position, _name, why in escapes(collection.root, names)}
    problems += [f"{where(r)}: {why}; the image must lie inside {collection.root}" for r, why in outside.items()]
    base = os.fspath(collection.root)
    files = [os.path.join(base, name) for name in names]  # str, not Path: a third of the memory at a million
    with ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(_size, files))
        present = [r for r, size in enumerate(sizes) if size is not None and r not in outside]
        problems += [f"{where(r)}: no such file ({files[r]})" for r, size in enumerate(sizes) if size is None]
        readable = list(pool.map(lambda r: upright_size(files[r]) is not None, present))
        problems += [
            f"{where(r)}: cannot read the image header; the file is corrupt or not an image"
            for r, ok in zip(present, readable, strict=True)
            if not ok
        ]
        decodable = [r for r, ok in zip(present, readable, strict=True) if ok]
        by_size: dict[int, list[int]] = defaultdict(list)
        for r in decodable:
            by_size[sizes[r]].append(r)
        shared = [r for rows in by_size.values() if len(rows) > 1 for r in rows]
        digests = list(pool.map(lambda r: file_sha256(files[r]), shared))
    by_content: dict[str, list[int]] = defaultdict(list)
    for r, digest in zip(shared, digests, strict=True):
        by_content[digest].append(r)
    for rows in by_content.values():
        if len(rows) < 2:
            continue
        labels = [str(collection.label_names[collection.labels[r]]) for r in rows]
        listed = ", ".join(where(r) for r in rows)
        if len(set(labels)) > 1:
            named = " and ".join(repr(label) for label in dict.fromkeys(labels))
            problems.append(f"the same image is in two classes, {named}: {listed}; keep it in one class")
        else:
            problems.append(f"duplicate images of class {labels[0]!r}: {listed}; keep one")
    return problems


def check_collection(
    target: str | Path,
    *,
    root: str | Path | None = None,
    images_per_class: int = 4,
    workers: int | None = None,
) -> CheckReport:
    """Summarise and check the folder or CSV manifest ``target`` (module docstring); ``root`` is the manifest's
    image root (default: its folder); ``workers`` threads stat, read headers and hash (default: up to 8)."""
    target = Path(target)
    warnings: list[str] = []
    problems: list[str] = []
    if target.is_dir():
        scan = scan_folder(target)
        collection = scan.collection
        kind = "folder per class"

        def where(row: int) -> str:
            return str(collection.root / collection.paths[row])

        warnings += [f"{target / name}: not an image, ignored" for name in scan.ignored]
        problems += [
            f"{target / name}: not in a class folder; move it into the folder of its class" for name in scan.unlabelled
        ]
    else:
        parsed = load_manifest(target, root=root, strict=False, warn=False)
        collection = parsed.collection
        kind = "manifest"
        problems += parsed.problems

        def where(row: int) -> str:
            return f"{target} line {parsed.lines[row]}: {collection.paths[row]}"

    warnings += _too_small(collection, images_per_class)
    problems += _file_problems(collection, where, _workers(workers))
    return CheckReport(target, _summary(collection, kind), warnings, problems)
