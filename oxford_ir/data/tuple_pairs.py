"""The query/positive pairs that pool mining (:mod:`oxford_ir.data.tuple_mining`) draws its ``qsize`` tuples from.

retrieval-SfM-120k publishes them: ``qidxs``/``pidxs`` of the pickle's train part (:func:`sfm120k_pairs`), pairs
chosen by the 3D models for their overlap, as cnnimageretrieval-pytorch's ``qpool``/``ppool``. Any other training
split has labels only: every landmark image of a class with at least two images is a query once, its positive
another image of its class drawn with the seed (:func:`label_pairs`). Distractors (a label each) are never in a
pair; they are negatives only. Both return image indices into the training split (``TrainSplit.paths``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.sfm120k import IMAGE_FOLDER, NAME, PICKLE_NAME, cid2filename, read_sfm120k_pickle, sfm120k_dir
from oxford_ir.benchmarks.splits import TrainSplit
from oxford_ir.errors import DataError

log = logging.getLogger(__name__)

#: stream tag of the positive draw of :func:`label_pairs`
_PAIR_TAG = 0x9A125


def label_pairs(labels: np.ndarray, num_landmark_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, positives)``: each image whose label (< ``num_landmark_classes``) has another image is a query
    once, in index order, with a positive drawn uniformly among the other images of its label (``seed``)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    counts = np.searchsorted(sorted_labels, sorted_labels, side="right") - starts
    keep = (sorted_labels < num_landmark_classes) & (counts > 1)
    position = np.arange(len(labels)) - starts  # rank of each image within its class
    rng = np.random.default_rng([int(seed), _PAIR_TAG])
    # another member of the class: skip the query's own rank by drawing among count - 1 and shifting past it
    other = rng.integers(0, np.maximum(counts - 1, 1))
    other = other + (other >= position)
    queries, positives = order[keep], order[(starts + other)[keep]]
    back = np.argsort(queries, kind="stable")
    return queries[back], positives[back]


def sfm120k_pairs(split: TrainSplit, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The published pairs of retrieval-SfM-120k's train part, as indices into ``split`` (the collection split of
    ``sfm120k`` under ``data_dir``). A pair with an image the split lacks (missing, excluded as an overlap) is left
    out, with a log line; none left is a :class:`~oxford_ir.errors.DataError`."""
    folder = sfm120k_dir(data_dir)
    part = read_sfm120k_pickle(folder / PICKLE_NAME)["train"]
    images = folder / IMAGE_FOLDER
    position = {os.fspath(path): i for i, path in enumerate(split.paths)}
    q = np.array([position.get(os.fspath(images / cid2filename(c)), -1) for c in part.cids[part.qidxs].tolist()])
    p = np.array([position.get(os.fspath(images / cid2filename(c)), -1) for c in part.cids[part.pidxs].tolist()])
    kept = (q >= 0) & (p >= 0)
    if not kept.any():
        raise DataError(
            f"{NAME}: none of the {len(q)} query/positive pairs of {folder / PICKLE_NAME} is among the {len(split)} "
            "training images; check data.benchmark and that the train part's images are present"
        )
    if not kept.all():
        log.info("%s: %d of %d query/positive pairs left out (an image not trained on)", NAME, (~kept).sum(), len(q))
    return q[kept].astype(np.int64), p[kept].astype(np.int64)


def training_pairs(split: TrainSplit, benchmark: str, data_dir: str | Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``split``: the published ones for ``sfm120k``, else :func:`label_pairs`; a split without any
    pair is a :class:`~oxford_ir.errors.DataError`."""
    if benchmark == NAME:
        return sfm120k_pairs(split, data_dir)
    queries, positives = label_pairs(split.labels, split.num_landmark_classes, seed)
    if not len(queries):
        raise DataError(
            f"data.mining=pool: no class of {benchmark}'s training split has two images, so there is no "
            "query/positive pair; use data.mining=batch or a split with more images per class"
        )
    return queries, positives
