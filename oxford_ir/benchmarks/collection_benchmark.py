"""A :class:`~oxford_ir.benchmarks.collection.Collection` as a :class:`~oxford_ir.benchmarks.benchmark.Benchmark`:
the queries of one split against that split's gallery, so that evaluation, validation, the index and every table
work on a user's folder or manifest as on Oxford and Paris.

Ground truth, ``original`` protocol: a query's positives (``ok``) are the gallery images with its label; its junk
is its own gallery image (when the query is in the gallery: an image never counts as its own match) and the
gallery images of its ``ignore`` rows; its box, if it has one, crops it. Image names are the paths relative to
the collection's root (sub-folders included, extension kept: ``extension=""``). A query without another image of
its label in the gallery cannot be scored: the protocol leaves it out of the means, and a warning says how many.

Besides mAP and mP@k, such a benchmark reports recall@k (``R@k``, :func:`~oxford_ir.benchmarks.metrics.compute_recall`),
which image retrieval outside landmarks (products, re-identification, a user's objects) usually quotes.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.collection import SPLITS, Collection
from oxford_ir.errors import DataError

#: what a collection benchmark reports besides mAP and mP@k
COLLECTION_METRICS = ("recall",)
_NONE = np.zeros(0, dtype=np.int64)


def collection_benchmark(collection: Collection, split: str) -> Benchmark:
    """The queries of ``split`` (``is_query``) against the gallery of ``split`` (``is_gallery``); see the module
    docstring. A :class:`DataError` naming the collection when the split has no query or no gallery image, or when
    no query has a positive."""
    return benchmark_of_rows(collection, collection.rows(split), f"{split} split")


def evaluated_split(collection: Collection, order: tuple[str, ...] = ("test", "val", "train")) -> str:
    """The first split of ``order`` that holds images: what ``collection:<path>`` evaluates (its test split, else
    val, else every image of a collection that is all train, such as a folder without split folders)."""
    counts = np.bincount(collection.split, minlength=len(SPLITS))
    for split in order:
        if counts[SPLITS.index(split)]:
            return split
    raise DataError(f"{collection.source}: the collection holds no image")


def benchmark_of_rows(collection: Collection, rows: np.ndarray, what: str) -> Benchmark:
    """The benchmark of the collection's ``rows`` (a split, or the held-out classes of one): their queries against
    their gallery images; ``what`` names them in messages."""
    rows = np.asarray(rows, dtype=np.int64)
    gallery = rows[collection.is_gallery[rows]]
    queries = rows[collection.is_query[rows]]
    if not len(queries) or not len(gallery):
        raise DataError(
            f"{collection.source}: the {what} has {len(queries)} queries and {len(gallery)} gallery images; "
            "evaluating it needs both (is_query / is_gallery)"
        )
    gallery_of_row = np.full(len(collection), -1, dtype=np.int64)
    gallery_of_row[gallery] = np.arange(len(gallery))
    # the gallery indices of each label, as slices of one array sorted by label
    gallery_labels = collection.labels[gallery]
    by_label = np.argsort(gallery_labels, kind="stable")
    starts = np.searchsorted(gallery_labels[by_label], np.arange(collection.num_classes + 1))
    gnd: list[dict] = []
    without_positive = 0
    for row in queries.tolist():
        label = collection.labels[row]
        same = by_label[starts[label] : starts[label + 1]]
        own = gallery_of_row[row]
        ignored = collection.ignore.get(row)
        if ignored is None:  # the common case, without np.isin: a million queries stay seconds
            junk = np.array([own]) if own >= 0 else _NONE
            ok = same[same != own] if own >= 0 else same
        else:
            junk = gallery_of_row[np.append(ignored, row)]
            junk = np.unique(junk[junk >= 0])
            ok = same[~np.isin(same, junk)]
        without_positive += not len(ok)
        box = collection.boxes[row]
        gnd.append({"ok": ok, "junk": junk, "bbx": None if np.isnan(box).any() else [float(v) for v in box]})
    if without_positive == len(queries):
        raise DataError(
            f"{collection.source}: no query of the {what} has another image of its label in the gallery, so "
            "nothing can be evaluated; give each class at least two images"
        )
    if without_positive:
        warnings.warn(
            f"{collection.name}: {without_positive} of the {len(queries)} queries of the {what} have no other image "
            "of their label in the gallery and are not scored (left out of mAP and R@k)",
            stacklevel=2,
        )
    return Benchmark(
        name=collection.name,
        root=collection.root,
        protocol="original",
        imlist=collection.paths[gallery].tolist(),
        qimlist=collection.paths[queries].tolist(),
        gnd=gnd,
        source=collection.source,
        image_dir=collection.root,
        extension="",
        query_landmarks=collection.label_names[collection.labels[queries]].tolist(),
        extra_metrics=COLLECTION_METRICS,
        dataset=collection_dataset(collection.source),
    ).validate()


def collection_dataset(source: str | Path) -> str:
    """The cache folder name of the collection read from ``source``: ``collection-<stem>-<8 hex of its resolved
    path>``, so two folders called ``photos`` never share a name."""
    path = Path(source).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem or "root")[:40]
    return f"collection-{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
