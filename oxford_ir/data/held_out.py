"""The labelled images of the validation landmarks, which training never sees: the data of the validation loss.

``val/loss`` is the training loss (the same miner and loss) on P x K batches of these images, so that it measures
how well the embedding separates landmarks it was not trained on, on the same scale as ``train/loss``:

- ``landmarks`` split: the positives of the held-out landmarks (excluded from training by the split);
- ``cross`` split: the positives of the evaluation dataset's landmarks (another dataset);
- ``collection`` split: the images of the evaluated val / test split or held-out classes, with their class
  (:func:`~oxford_ir.benchmarks.collection_split.labelled_gallery`), or as ``cross`` for another benchmark;
- ``seed`` split: none. It trains on every evaluated landmark's images, so a loss on them would not be held out.

Classes are the evaluated landmarks with at least K images present (an image that is a positive of two landmarks,
or junk, is left out as in training); no distractors (the evaluation database's other images may be training
images of the landmarks split).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

from oxford_ir.benchmarks.collection_split import labelled_gallery
from oxford_ir.benchmarks.splits import TrainSplit, build_split
from oxford_ir.data.sampler import ClassBalancedSampler
from oxford_ir.errors import OxfordIRError


def held_out_split(split: TrainSplit, images_per_class: int) -> tuple[TrainSplit | None, np.ndarray, str]:
    """``(images, classes, "")``: the labelled validation images and the classes with at least ``images_per_class``
    of them on disk; or ``(None, [], why not)`` when fewer than two such classes exist (no P x K batch)."""
    none = np.zeros(0, dtype=np.int64)
    if split.kind == "seed":
        return None, none, "data.split=seed trains on the images of every evaluated landmark, so none is held out"
    with warnings.catch_warnings():  # ambiguous images were reported with the split; they are left out here too
        warnings.simplefilter("ignore")
        try:
            held = labelled_gallery(split.eval_benchmark) if split.kind == "collection" else None
            held = held or build_split("seed", split.eval_benchmark, use_distractors=False)
        except OxfordIRError as error:
            return None, none, f"the evaluated landmarks have no labelled image to draw from ({error})"
    present = np.array([path.is_file() for path in held.paths], dtype=bool)
    if not present.all():
        keep = np.flatnonzero(present)
        held = replace(held, paths=[held.paths[i] for i in keep], labels=held.labels[keep])
    sizes = held.class_sizes()
    classes = np.flatnonzero(sizes >= images_per_class)
    if len(classes) < 2:
        why = f"{len(classes)} evaluated landmark(s) have images_per_class={images_per_class} labelled images"
        return None, none, f"{why}; a P x K batch needs 2"
    return held, classes, ""


def validation_batches(
    split: TrainSplit, classes_per_batch: int, images_per_class: int, num_batches: int, seed: int
) -> tuple[TrainSplit, ClassBalancedSampler] | str:
    """The images of the validation loss and the sampler of its ``num_batches`` batches (P = ``classes_per_batch``,
    or fewer when fewer landmarks are evaluated; K = ``images_per_class``; one process draws them all, epoch 0:
    the same batches at every validation); or the reason there are none."""
    if not num_batches:
        return "data.val_loss_batches=0"
    held, classes, reason = held_out_split(split, images_per_class)
    if held is None:
        return reason
    per_batch = min(classes_per_batch, len(classes))
    sampler = ClassBalancedSampler(
        held.labels, classes, per_batch, images_per_class, num_batches, seed=seed, num_replicas=1, rank=0
    )
    return held, sampler
