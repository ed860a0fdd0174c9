"""A :class:`~oxford_ir.benchmarks.collection.Collection` as a training split (``data.split=collection``, set by
``data=collection``): which images train, with which class, and which benchmark validation evaluates.

- training images: the rows of split ``train``, each with its label (the classes play the landmarks' part of
  :class:`~oxford_ir.benchmarks.splits.TrainSplit`: classes first, sorted by name; no distractors);
- the evaluated benchmark: another benchmark when one is given (``data.eval_benchmark``: train on a collection such
  as retrieval-SfM-120k, evaluate Revisited Oxford); else the collection's ``val`` split
  (:func:`~oxford_ir.benchmarks.collection_benchmark.collection_benchmark`), else its ``test`` split; else, when
  every image is in ``train`` (a folder without split folders), some classes are held out exactly as the
  ``landmarks`` split holds out landmarks (``held_out_landmarks`` by name, or ``n_held_out`` drawn with ``seed``
  among the classes that can be evaluated) and the benchmark is their images alone, each against the others.

Training never sees an evaluated image of the collection: the evaluated rows are another split's or a held-out
class's. The held-out settings are used only in the last case (``conf/data/base.yaml`` sets ``n_held_out`` for
the Oxford and Paris splits; a collection with a val split ignores it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.collection import SPLITS, Collection
from oxford_ir.benchmarks.collection_benchmark import COLLECTION_METRICS, benchmark_of_rows
from oxford_ir.benchmarks.path_array import PathArray
from oxford_ir.benchmarks.registry import (
    COLLECTION_PREFIX,
    check_benchmark_name,
    checked_images,
    is_collection,
    read_collection,
)
from oxford_ir.benchmarks.splits import SPLIT_KINDS, TrainSplit, _resolve_held_out, landmark_of_queries
from oxford_ir.errors import ConfigError

#: the split kind of a collection (beside :data:`~oxford_ir.benchmarks.splits.SPLIT_KINDS`)
COLLECTION_KIND = "collection"


def check_split_settings(split: str, benchmark: str, eval_benchmark: str | None) -> None:
    """``data.split``, ``data.benchmark`` and ``data.eval_benchmark`` of a data config, checked together: known
    names, a collection with ``split=collection`` (and only a collection), ``cross`` with another dataset."""
    if split not in (*SPLIT_KINDS, COLLECTION_KIND):
        raise ConfigError(f"data.split={split!r} is unknown; choose one of {', '.join(SPLIT_KINDS)}")
    check_benchmark_name(benchmark)
    if eval_benchmark is not None:
        check_benchmark_name(eval_benchmark)
    if is_collection(benchmark) != (split == COLLECTION_KIND):
        raise ConfigError(
            f"data.benchmark={benchmark} is a collection: its split is read from it (data.split=collection); use "
            "data=collection"
            if is_collection(benchmark)
            else f"data.split=collection needs data.benchmark=collection:<folder or manifest>, not {benchmark}"
        )
    if split == "cross" and (eval_benchmark is None or eval_benchmark == benchmark):
        raise ConfigError(
            f"data.split=cross trains on {benchmark} and evaluates on another dataset: set data.eval_benchmark "
            "(e.g. benchmark=paris6k eval_benchmark=roxford5k)"
        )


def collection_split(
    collection: Collection | str,
    eval_benchmark: Benchmark | None = None,
    *,
    held_out_landmarks: Sequence[str] | None = None,
    n_held_out: int | None = None,
    seed: int = 0,
    allow_missing_images: bool = False,
    name: str | None = None,
) -> TrainSplit:
    """The training images and labels of ``collection`` (a Collection, or a ``collection:<path>`` name read with
    :func:`~oxford_ir.benchmarks.registry.read_collection`) and the benchmark to evaluate (module docstring).

    The collection's own evaluated images must be on disk (a :class:`~oxford_ir.errors.DataError` naming them), or
    with ``allow_missing_images`` the benchmark is restricted to those present; missing training images are left to
    the caller (:meth:`TrainSplit.restrict_to_available`). Impossible settings raise :class:`ConfigError`.
    ``name``: the benchmark name the split trains on (``train_benchmark``, which names its image cache); default
    the name given, else ``collection:<source>``.
    """
    if isinstance(collection, str):
        name, collection = name or collection, read_collection(collection)
    name = name or f"{COLLECTION_PREFIX}{collection.source}"
    train_rows = collection.rows("train")
    held_out: tuple[str, ...] = ()
    dropped: dict[str, int] = {}
    present = np.bincount(collection.split, minlength=len(SPLITS)) > 0
    own = eval_benchmark is None  # evaluated on its own images, checked here as load_benchmark checks them
    if eval_benchmark is not None:
        how = f"evaluate {eval_benchmark.name}"
    elif present[SPLITS.index("val")] or present[SPLITS.index("test")]:
        evaluated = "val" if present[SPLITS.index("val")] else "test"
        eval_benchmark = benchmark_of_rows(collection, collection.rows(evaluated), f"{evaluated} split")
        how = f"evaluate its {evaluated} split"
    else:
        held_out = _held_out_classes(collection, train_rows, held_out_landmarks, n_held_out, seed)
        out = np.isin(collection.label_names[collection.labels[train_rows]], held_out)
        eval_benchmark = benchmark_of_rows(collection, train_rows[out], "held-out classes")
        eval_benchmark = replace(eval_benchmark, is_subset=True, subset_note=f"held-out classes {', '.join(held_out)}")
        train_rows, dropped = train_rows[~out], {"held_out": int(out.sum())}
        how = f"evaluate the held-out classes {', '.join(held_out)}"
    if not len(train_rows):
        raise ConfigError(
            f"{collection.source}: no image is left to train on (split train: {len(collection.rows('train'))} "
            "images); give the collection train images or hold out fewer classes"
        )
    if own:
        eval_benchmark = checked_images(name, eval_benchmark, allow_missing_images)
    trained, labels = np.unique(collection.labels[train_rows], return_inverse=True)
    order = np.argsort(labels, kind="stable")
    rows, labels = train_rows[order], labels.reshape(-1)[order].astype(np.int64)
    sizes = np.bincount(labels)
    description = (
        f"collection split of {name}: train on {len(trained)} classes ({len(rows)} images, {sizes.min()}-"
        f"{sizes.max()} per class); {how}: {eval_benchmark.n_queries} queries against {eval_benchmark.n_db} images"
    )
    return TrainSplit(
        kind=COLLECTION_KIND,
        paths=PathArray(collection.root, collection.paths, rows),  # row numbers only: no copy of the names
        labels=labels,
        label_names=collection.label_names[trained].tolist(),
        num_landmark_classes=len(trained),
        eval_benchmark=eval_benchmark,
        train_benchmark=name,
        held_out_landmarks=held_out,
        description=description,
        dropped=dropped,
    )


def labelled_gallery(benchmark: Benchmark) -> TrainSplit | None:
    """The gallery images of a collection's benchmark, each with the class of the queries it is a positive of (an
    image that is a positive of two classes is left out), as a split (classes sorted by name, no distractors): the
    labelled images of validation's ``val/loss`` (:mod:`oxford_ir.data.held_out`). None for a benchmark not made
    from a collection (its queries' positives and junk need the landmarks split's rules: ``build_split``)."""
    if tuple(benchmark.extra_metrics) != COLLECTION_METRICS:
        return None
    names = sorted(set(landmark_of_queries(benchmark)))
    index = {name: i for i, name in enumerate(names)}
    label = np.full(benchmark.n_db, -1, dtype=np.int64)
    clash = np.zeros(benchmark.n_db, dtype=bool)
    for q, landmark in enumerate(benchmark.query_landmarks):
        ok = benchmark.positives(q)
        clash[ok] |= (label[ok] >= 0) & (label[ok] != index[landmark])
        label[ok] = index[landmark]
    keep = np.flatnonzero((label >= 0) & ~clash)
    keep = keep[np.argsort(label[keep], kind="stable")]
    return TrainSplit(
        kind=COLLECTION_KIND,
        paths=[benchmark.image_path(benchmark.imlist[i]) for i in keep],
        labels=label[keep],
        label_names=names,
        num_landmark_classes=len(names),
        eval_benchmark=benchmark,
        train_benchmark=benchmark.name,
        description=f"labelled gallery images of {benchmark.name}",
    )


def _held_out_classes(
    collection: Collection,
    rows: np.ndarray,
    names: Sequence[str] | None,
    count: int | None,
    seed: int,
) -> tuple[str, ...]:
    """The classes held out of an all-train collection, chosen as the landmarks split chooses its landmarks
    (:func:`~oxford_ir.benchmarks.splits._resolve_held_out`): by name, or ``count`` drawn with ``seed`` among the
    classes that can be evaluated (a query and another image of its class in the gallery)."""
    if not names and count is None:
        raise ConfigError(
            f"{collection.source}: every image is in the train split, so some classes must be held out to evaluate "
            "on: set data.n_held_out=<how many classes> (drawn with data.seed) or data.held_out_landmarks=[<class>,"
            " ...], or give the collection a val or test split"
        )
    labels = collection.labels[rows]
    query = collection.is_query[rows]
    gallery = collection.is_gallery[rows]
    n_gallery = np.bincount(labels[gallery], minlength=collection.num_classes)
    n_query = np.bincount(labels[query], minlength=collection.num_classes)
    n_query_only = np.bincount(labels[query & ~gallery], minlength=collection.num_classes)
    scored = ((n_query > 0) & (n_gallery >= 2)) | ((n_query_only > 0) & (n_gallery >= 1))
    classes = collection.label_names[np.unique(labels)].tolist()
    evaluable = collection.label_names[np.flatnonzero(scored)].tolist()
    # _resolve_held_out reads the landmark of each query of its benchmarks: one stand-in query per evaluable class
    stand_in = Benchmark(
        name=collection.name,
        root=collection.root,
        protocol="original",
        imlist=[],
        qimlist=evaluable,
        gnd=[{"ok": []} for _ in evaluable],
        source=collection.source,
        image_dir=collection.root,
        query_landmarks=evaluable,
    )
    return _resolve_held_out(stand_in, stand_in, classes, names, count, seed)
