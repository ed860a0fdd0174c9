"""Training batches of mined tuples (``data.mining=pool``): :class:`TupleSampler`.

A batch is ``tuples_per_batch`` (T) tuples laid end to end, each ``(q, p, n1, ..., nN)``: image ``t * (2 + N) +
j`` of the batch is image j of tuple t (``oxford_ir.models.tuple_layout`` builds the loss's pairs or triplets from
exactly this layout). The images go through the ordinary training dataset, so each carries its own label: the
query and its positive their cluster's, each negative its own cluster's.

The tuples of an epoch are mined lazily, when the epoch's first index is drawn (:func:`~oxford_ir.data.
tuple_mining.epoch_tuples` with the network's current weights): Lightning makes the first epoch's iterator
(and, with workers, draws its first indices) before it calls ``on_train_epoch_start``, and later epochs' after,
so no hook order is assumed. The epoch is the one the sampler holds when its iterator is made (``set_epoch``,
which the datamodule sets to the fit loop's epoch before a resumed run makes its first iterator). A run resumed
from an epoch's end re-mines that epoch's tuples from the restored weights and the same ``(seed, epoch)`` draw:
the tuples of an uninterrupted run (checkpoints are only written at epoch ends, so there is never a half-used
epoch of tuples to restore). The last tuples are kept (:attr:`TupleSampler.tuples`) for inspection.

Distributed: every process mines the same tuples (the embedding of queries and pool is sharded across the
processes and gathered by the one extraction path, so every process holds identical embeddings, and mining is
deterministic on them), then keeps the batches at positions ``rank, rank + world, ...``. An epoch is ``qsize``
tuples in all, as in cirtorch: ``qsize // (T * world)`` batches per process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from oxford_ir.benchmarks.splits import TrainSplit
from oxford_ir.data.config_values import non_negative_int, positive_int
from oxford_ir.data.sampler import ShardedEpochSampler
from oxford_ir.data.tuple_mining import PoolSettings, epoch_tuples
from oxford_ir.data.tuple_pairs import training_pairs
from oxford_ir.errors import ConfigError

log = logging.getLogger(__name__)

#: stream tag of the augmentation seeds of a tuple epoch
_SEED_TAG = 0x5EED7


class TupleSampler(ShardedEpochSampler):
    """``(image index, augmentation seed)`` pairs whose chunks of ``batch_size`` are batches of T whole tuples.

    ``make_tuples(epoch)`` returns the epoch's ``n_tuples x tuple_size`` image indices (called once per epoch, on
    the epoch's first draw). Like :class:`~oxford_ir.data.sampler.ClassBalancedSampler` it is a
    :class:`~oxford_ir.data.sampler.ShardedEpochSampler` (Lightning neither wraps nor replaces it and calls
    ``set_epoch``); the augmentation seeds are a function of ``(seed, epoch)``.
    """

    def __init__(
        self,
        make_tuples: Callable[[int], np.ndarray],
        n_tuples: int,
        tuple_size: int,
        tuples_per_batch: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.make_tuples = make_tuples
        self.n_tuples = positive_int(n_tuples, "pool.qsize")
        self.tuple_size = positive_int(tuple_size, "tuple size")
        self.tuples_per_batch = positive_int(tuples_per_batch, "pool.tuples_per_batch")
        self.seed = non_negative_int(seed, "seed")
        self._init_share(num_replicas, rank)
        #: ``(epoch, tuples)`` of the last epoch mined
        self.tuples: tuple[int, np.ndarray] | None = None
        if self.num_batches < 1:
            raise ConfigError(
                f"data.pool.tuples_per_batch={tuples_per_batch} x {self.num_replicas} processes is more than the "
                f"{n_tuples} tuples of an epoch (data.pool.qsize, or the pairs there are); lower it or raise qsize"
            )

    @property
    def batch_size(self) -> int:
        return self.tuples_per_batch * self.tuple_size

    @property
    def num_batches(self) -> int:
        """Batches per process and epoch: the epoch's whole batches, shared equally (the rest is dropped)."""
        return self.n_tuples // self.tuples_per_batch // self.num_replicas

    def epoch_tuples(self, epoch: int) -> np.ndarray:
        """The tuples of ``epoch``, mined on the first call for it."""
        if self.tuples is None or self.tuples[0] != epoch:
            start = time.perf_counter()
            tuples = np.asarray(self.make_tuples(epoch), dtype=np.int64)
            log.info("pool mining: %d tuples of epoch %d in %.1f s", len(tuples), epoch, time.perf_counter() - start)
            if tuples.ndim != 2 or tuples.shape[1] != self.tuple_size or len(tuples) < self.n_tuples:
                raise ValueError(
                    f"epoch {epoch}: expected {self.n_tuples} x {self.tuple_size} tuples, got {tuples.shape}"
                )
            self.tuples = (epoch, tuples)
        return self.tuples[1]

    def batches(self, epoch: int | None = None) -> np.ndarray:
        """This process's ``num_batches x batch_size`` image indices of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rank, world, n = self.rank, self.num_replicas, self.num_batches
        every = self.epoch_tuples(epoch)[: n * world * self.tuples_per_batch]
        return every.reshape(n * world, self.batch_size)[rank::world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The epoch is read now, when the iterator is made; the tuples are mined at the first item."""
        return self._pairs(self.epoch)

    def _pairs(self, epoch: int) -> Iterator[tuple[int, int]]:
        batches = self.batches(epoch)
        world = self.num_replicas
        rng = np.random.default_rng([self.seed, epoch, _SEED_TAG])
        seeds = rng.integers(0, 2**62, size=(self.num_batches * world, self.batch_size), dtype=np.int64)
        for batch, batch_seeds in zip(batches, seeds[self.rank :: world], strict=True):
            yield from zip(batch.tolist(), batch_seeds.tolist(), strict=True)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.n_tuples} tuples of {self.tuple_size} images, {self.tuples_per_batch} a "
            f"batch, {self.num_batches} batches, seed={self.seed})"
        )


def pool_sampler(
    split: TrainSplit,
    benchmark: str,
    data_dir: str | Path,
    settings: PoolSettings,
    seed: int,
    embed: Callable[[Sequence[Path]], torch.Tensor],
) -> TupleSampler:
    """The tuple sampler of ``split``: its query/positive pairs (:func:`~oxford_ir.data.tuple_pairs.training_pairs`),
    labels as clusters, and ``embed(paths) -> N x D`` embeddings by the current network."""
    queries, positives = training_pairs(split, benchmark, data_dir, seed)
    labels = split.labels

    def make_tuples(epoch: int) -> np.ndarray:
        return epoch_tuples(
            queries, positives, labels, settings, seed, epoch, lambda indices: embed(list(split.paths[indices]))
        )

    n_tuples = min(settings.qsize, len(queries))
    return TupleSampler(make_tuples, n_tuples, settings.tuple_size, settings.tuples_per_batch, seed=seed)
