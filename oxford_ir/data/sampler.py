"""The P x K sampler of training: class-balanced batches of P classes x K images (+ D distractors), reproducible
from ``(seed, epoch)`` and sharded across processes by itself (see :class:`ClassBalancedSampler`).

Scale: it costs O(batch) per batch, not O(dataset). Labels are sorted once (class offsets and counts: the members
of a class are a slice of one index array, never a Python list per class), an image round of a class is shuffled
only when a batch first draws that class in the round, and batches are drawn as the loader asks for them. A
1.6-million-image, 81k-class training set gives its first batch in milliseconds after construction
(``experiments/bench/scale_manifest.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from oxford_ir.data.config_values import non_negative_int, positive_int
from oxford_ir.errors import ConfigError

_SHOWN = 5
#: batches whose augmentation seeds are drawn at once while iterating
_SEED_CHUNK = 1024


class _Cycle:
    """Endless draws without replacement: items come in shuffled rounds, and no draw repeats an item."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items, dtype=np.int64)
        self.rng = rng
        self.queue = self.items[:0]

    def take(self, n: int) -> np.ndarray:
        if len(self.queue) >= n:
            out, self.queue = self.queue[:n], self.queue[n:]
            return out
        head = self.queue
        fresh = self.rng.permutation(self.items)
        # what is left of the last round goes first; its items go to the end of the new round, not into this draw
        taken = np.isin(fresh, head)
        fresh = np.concatenate([fresh[~taken], fresh[taken]])
        need = n - len(head)
        self.queue = fresh[need:]
        return np.concatenate([head, fresh[:need]])


class ShardedEpochSampler(DistributedSampler):
    """What the project's training samplers share: an epoch set by ``set_epoch`` and this process's share of each
    epoch (``num_replicas``, ``rank``: given, or the process group's, else one process). Subclassing
    ``DistributedSampler`` makes Lightning call ``set_epoch`` and neither wrap nor replace the sampler. Subclasses
    call :meth:`_init_share` instead of ``DistributedSampler.__init__`` (which needs a dataset)."""

    def _init_share(self, num_replicas: int | None, rank: int | None) -> None:
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        # attributes DistributedSampler users may read
        self.shuffle = True
        self.drop_last = True
        self.dataset = None

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return int(self._num_replicas)
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return int(self._rank)
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class ClassBalancedSampler(ShardedEpochSampler):
    """Indices whose consecutive chunks of ``batch_size`` are class-balanced batches, P classes x K images + D.

    Each batch holds ``classes_per_batch`` distinct classes of ``classes`` with ``images_per_class`` distinct
    images each (classes grouped, in draw order), then ``distractors_per_batch`` distinct indices of
    ``distractors``. Classes, the images of each class and distractors are each drawn in shuffled rounds
    without replacement, so over an epoch every class and image comes up about equally often. Use it as a
    DataLoader's ``sampler`` with ``batch_size=sampler.batch_size, drop_last=True``
    (as pytorch-metric-learning's ``MPerClassSampler``).

    Reproducible: the batches of an epoch are a function of ``(seed, epoch)`` only (``set_epoch``), so a
    resumed run draws exactly what an uninterrupted one would.

    Distributed: every process computes the same ``num_batches x num_replicas`` batches of the epoch and
    keeps those at positions ``rank, rank + num_replicas, ...``: ``num_batches`` per process (steps per
    epoch do not depend on the number of processes), disjoint across processes. ``num_replicas`` and
    ``rank`` default to those of ``torch.distributed`` when it is initialised, read when iterating. It
    subclasses ``DistributedSampler`` because that is how Lightning (``use_distributed_sampler=True``)
    recognises a sampler that already shards itself: it then neither wraps nor replaces it, and calls
    ``set_epoch`` at every epoch. ``DistributedSampler.__init__`` is deliberately not called (it requires an
    initialised process group and a dataset).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[int] | np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        num_batches: int,
        *,
        distractors: Sequence[int] | np.ndarray = (),
        distractors_per_batch: int = 0,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.unique(np.asarray(classes, dtype=np.int64))
        self.classes_per_batch = positive_int(classes_per_batch, "classes_per_batch")
        self.images_per_class = positive_int(images_per_class, "images_per_class")
        self.num_batches = positive_int(num_batches, "batches_per_epoch")
        self.distractors = np.asarray(distractors, dtype=np.int64)
        self.distractors_per_batch = non_negative_int(distractors_per_batch, "distractors_per_batch")
        self.seed = non_negative_int(seed, "seed")
        # the members of class classes[j] are order[starts[j] : starts[j] + counts[j]], in ascending index order
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        self._order = order
        self._starts = np.searchsorted(sorted_labels, self.classes, side="left")
        self._counts = np.searchsorted(sorted_labels, self.classes, side="right") - self._starts
        self._distractor_pool = np.unique(self.distractors)
        if len(self.classes) < self.classes_per_batch:
            raise ConfigError(
                f"classes_per_batch={self.classes_per_batch} but only {len(self.classes)} classes to draw from; "
                f"lower classes_per_batch to at most {len(self.classes)}"
            )
        too_small = self._counts < self.images_per_class
        small = dict(zip(self.classes[too_small].tolist(), self._counts[too_small].tolist(), strict=True))
        if small:
            shown = ", ".join(f"label {c}: {n}" for c, n in list(small.items())[:_SHOWN])
            raise ConfigError(
                f"images_per_class={self.images_per_class} but {len(small)} classes have fewer images ({shown}); "
                "lower images_per_class or leave those classes out"
            )
        if len(self._distractor_pool) < self.distractors_per_batch:
            raise ConfigError(
                f"distractors_per_batch={self.distractors_per_batch} but only {len(self._distractor_pool)} "
                "distractor images; lower distractors_per_batch (0 disables them) or use_distractors=true"
            )
        self._init_share(num_replicas, rank)

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class + self.distractors_per_batch

    def members(self, label: int) -> np.ndarray:
        """Indices of the images of class ``label`` (one of ``classes``), ascending."""
        j = int(np.searchsorted(self.classes, label))
        if j == len(self.classes) or self.classes[j] != label:
            raise KeyError(label)
        return self._order[self._starts[j] : self._starts[j] + self._counts[j]]

    def _draw(self, epoch: int) -> Iterator[np.ndarray]:
        """The ``num_batches * num_replicas`` batches of ``epoch``, one at a time: O(batch) work per batch.

        One generator seeded by ``(seed, epoch)`` shuffles, in the order the batches need them, the rounds of
        classes, of each class's images (a class's first round when a batch first draws it) and of distractors.
        """
        rng = np.random.default_rng([self.seed, int(epoch)])
        class_cycle = _Cycle(np.arange(len(self.classes)), rng)  # positions in classes: the same shuffles
        image_cycles: dict[int, _Cycle] = {}
        distractor_cycle = _Cycle(self._distractor_pool, rng) if self.distractors_per_batch else None
        k = self.images_per_class
        for _ in range(self.num_batches * self.num_replicas):
            parts = []
            for j in class_cycle.take(self.classes_per_batch).tolist():
                cycle = image_cycles.get(j)
                if cycle is None:
                    start = self._starts[j]
                    cycle = image_cycles[j] = _Cycle(self._order[start : start + self._counts[j]], rng)
                parts.append(cycle.take(k))
            if distractor_cycle is not None:
                parts.append(distractor_cycle.take(self.distractors_per_batch))
            yield np.concatenate(parts)

    def global_batches(self, epoch: int) -> np.ndarray:
        """All ``num_batches * num_replicas`` batches of ``epoch`` (every process computes the same)."""
        batches = np.empty((self.num_batches * self.num_replicas, self.batch_size), dtype=np.int64)
        for b, batch in enumerate(self._draw(epoch)):
            batches[b] = batch
        return batches

    def _shard(self, epoch: int | None) -> tuple[int, int, int]:
        """``(epoch, rank, num_replicas)``, checked; ``epoch`` defaults to the current one."""
        rank, world = self.rank, self.num_replicas
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        return (self.epoch if epoch is None else int(epoch)), rank, world

    def batches(self, epoch: int | None = None) -> np.ndarray:
        """This process's ``num_batches x batch_size`` indices of ``epoch`` (default: the current one)."""
        epoch, rank, world = self._shard(epoch)
        return self.global_batches(epoch)[rank::world]

    def draw_seeds(self, epoch: int | None = None) -> np.ndarray:
        """A seed per drawn image, aligned with :meth:`batches`: the augmentation of each draw.

        Augmentations seeded by (seed, epoch, position) make training a pure function of the
        epoch, so a run resumed from ``last.ckpt`` sees exactly the crops an uninterrupted one
        sees, whatever the global random state or the number of workers.
        """
        epoch, rank, world = self._shard(epoch)
        return np.concatenate(list(self._seed_chunks(epoch, self.num_batches * world)))[rank::world]

    def _seed_chunks(self, epoch: int, rows: int) -> Iterator[np.ndarray]:
        """The ``rows x batch_size`` seeds of ``epoch`` in chunks of at most ``_SEED_CHUNK`` batches: the same
        numbers as one draw of them all (each 64-bit draw consumes the generator in order)."""
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        for start in range(0, rows, _SEED_CHUNK):
            yield rng.integers(0, 2**62, size=(min(_SEED_CHUNK, rows - start), self.batch_size), dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(image index, augmentation seed)`` pairs, batch after batch, drawn as they are asked for. The epoch is
        read now, when the iterator is made, not at its first item."""
        epoch, rank, world = self._shard(None)
        return self._pairs(epoch, rank, world)

    def _pairs(self, epoch: int, rank: int, world: int) -> Iterator[tuple[int, int]]:
        batches = self._draw(epoch)
        b = 0
        for chunk in self._seed_chunks(epoch, self.num_batches * world):
            for seeds in chunk:
                batch = next(batches)
                if b % world == rank:
                    yield from zip(batch.tolist(), seeds.tolist(), strict=True)
                b += 1

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.classes_per_batch} of {len(self.classes)} classes, "
            f"K={self.images_per_class}, distractors={self.distractors_per_batch} of {len(self.distractors)}, "
            f"{self.num_batches} batches, seed={self.seed})"
        )
