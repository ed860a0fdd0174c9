"""Plain shuffled training batches (``data.sampler=random``): what many-class losses need instead of P x K.

A classification loss (ArcFace, CosFace: one learned weight vector per class) scores each image against every
class's weights, so it needs no positives in the batch, and with 81k classes a P x K batch of 8 classes would
update 8 of them a step. :class:`RandomBatchSampler` draws batches uniformly from all training images instead,
without replacement within an epoch, reproducible from ``(seed, epoch)`` and sharded across processes exactly as
:class:`~oxford_ir.data.sampler.ClassBalancedSampler` (it is one, with another draw: the seeds of the
augmentations, the sharding, ``set_epoch`` and the ``(index, seed)`` pairs it yields are inherited), so a resumed
run draws what an uninterrupted one would.

Cost: one permutation of the pool per round (a few tens of ms for a million images, made when a round's first
batch is drawn), then O(batch) per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from oxford_ir.data.config_values import non_negative_int, positive_int
from oxford_ir.data.sampler import ClassBalancedSampler, _Cycle
from oxford_ir.errors import ConfigError


class RandomBatchSampler(ClassBalancedSampler):
    """Indices whose consecutive chunks of ``batch_size`` are uniformly shuffled batches of ``indices``.

    Each epoch shuffles ``indices`` with a generator seeded by ``(seed, epoch)`` and cuts the permutation into
    ``num_batches x num_replicas`` batches; an epoch longer than the pool starts a new shuffled round, and no
    batch holds an image twice. Batches may hold any number of images of a class (also one, also none of the
    other images of its class): fine for a classification loss, not for a triplet loss (the datamodule warns).

    The interface of :class:`~oxford_ir.data.sampler.ClassBalancedSampler` (``batch_size``, ``set_epoch``,
    ``batches``, ``global_batches``, ``draw_seeds``, iteration as ``(index, seed)`` pairs, sharding by rank), whose
    ``__init__`` is deliberately not called: there are no classes to index. ``members`` does not apply.
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        num_batches: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.indices = np.unique(np.asarray(indices, dtype=np.int64))
        self._batch_size = positive_int(batch_size, "batch_size")
        self.num_batches = positive_int(num_batches, "batches_per_epoch")
        self.seed = non_negative_int(seed, "seed")
        if len(self.indices) < self._batch_size:
            raise ConfigError(
                f"data.sampler=random: batches of {self._batch_size} images (classes_per_batch x images_per_class) "
                f"but only {len(self.indices)} training images; lower classes_per_batch or images_per_class"
            )
        self._init_share(num_replicas, rank)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def members(self, label: int) -> np.ndarray:
        raise TypeError("RandomBatchSampler draws images, not classes: it has no members of a class")

    def _draw(self, epoch: int) -> Iterator[np.ndarray]:
        """The ``num_batches * num_replicas`` batches of ``epoch``, one at a time, from one generator seeded by
        ``(seed, epoch)`` (the same seed sequence as the class-balanced draw; its augmentation seeds differ by key)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        cycle = _Cycle(self.indices, rng)
        for _ in range(self.num_batches * self.num_replicas):
            yield cycle.take(self._batch_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._batch_size} of {len(self.indices)} images a batch, "
            f"{self.num_batches} batches, seed={self.seed})"
        )
