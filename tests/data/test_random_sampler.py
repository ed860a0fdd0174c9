"""RandomBatchSampler (data.sampler=random): uniform batches without replacement per epoch, reproducible from
(seed, epoch), sharded by rank, iterated as the class-balanced sampler is (index, augmentation seed)."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data.distributed import DistributedSampler

from oxford_ir.data.random_sampler import RandomBatchSampler
from oxford_ir.errors import ConfigError

POOL = np.arange(3, 40)  # 37 images: not a multiple of the batch


def sampler(**overrides) -> RandomBatchSampler:
    kwargs = {"indices": POOL, "batch_size": 6, "num_batches": 6, "seed": 7, **overrides}
    return RandomBatchSampler(**kwargs)


def test_an_epoch_draws_each_image_at_most_once_and_every_image_comes_up() -> None:
    s = sampler()
    batches = s.batches(0)
    assert batches.shape == (6, 6) and isinstance(s, DistributedSampler)
    flat = batches.reshape(-1)
    assert len(np.unique(flat)) == 36 and np.isin(flat, POOL).all()  # 36 of the 37 images, none twice
    # an epoch longer than the pool: a new round, no image twice within a batch, each image once per round
    long = sampler(num_batches=13).batches(0)
    assert all(len(set(b.tolist())) == 6 for b in long)
    counts = np.bincount(long.reshape(-1), minlength=40)[POOL]
    assert counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 78
    # uniform: over many epochs every image is drawn about equally often (36/37 of the epochs each)
    seen = np.bincount(np.concatenate([s.batches(e).reshape(-1) for e in range(200)]), minlength=40)[POOL]
    assert seen.min() > 170 and seen.max() <= 200


def test_reproducible_for_a_seed_and_epoch_and_iterated_with_its_seeds() -> None:
    a, b = sampler(), sampler()
    assert np.array_equal(a.batches(3), b.batches(3)) and not np.array_equal(a.batches(3), a.batches(4))
    assert not np.array_equal(a.batches(0), sampler(seed=8).batches(0))
    a.set_epoch(2)
    iterator = iter(a)
    a.set_epoch(5)  # the iterator keeps the epoch it was made in (a resumed loader is made before set_epoch)
    pairs = np.array(list(iterator))
    assert np.array_equal(pairs[:, 0], a.batches(2).reshape(-1))
    assert np.array_equal(pairs[:, 1], a.draw_seeds(2).reshape(-1)) and len(a) == len(pairs) == 36


def test_shards_by_rank() -> None:
    whole = sampler(num_batches=3, num_replicas=2, rank=0).global_batches(1)
    shards = [sampler(num_batches=3, num_replicas=2, rank=r).batches(1) for r in (0, 1)]
    assert np.array_equal(shards[0], whole[0::2]) and np.array_equal(shards[1], whole[1::2])
    assert not set(shards[0].reshape(-1).tolist()) & set(shards[1].reshape(-1).tolist())


def test_refuses_a_batch_larger_than_the_pool() -> None:
    with pytest.raises(ConfigError, match="batches of 40 images .* only 37 training images"):
        sampler(batch_size=40)
    with pytest.raises(TypeError, match="no members"):
        sampler().members(3)
