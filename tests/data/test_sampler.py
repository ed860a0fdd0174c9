"""ClassBalancedSampler: balanced, reproducible, sharded P x K (+ distractors) batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data.distributed import DistributedSampler

from oxford_ir.data.sampler import ClassBalancedSampler
from oxford_ir.errors import ConfigError


def check_batch(batch: np.ndarray, labels: np.ndarray, n_classes: int, p: int, k: int, d: int) -> None:
    """One batch: P distinct landmark classes x K distinct images each, then D distinct distractors."""
    assert len(batch) == p * k + d and len(set(batch.tolist())) == len(batch)
    landmark = labels[batch[: p * k]]
    assert (landmark < n_classes).all()
    counts = Counter(landmark.tolist())
    assert len(counts) == p and set(counts.values()) == {k}
    assert (labels[batch[p * k :]] >= n_classes).all()


LABELS = np.array([0] * 5 + [1] * 3 + [2] * 4 + [3] * 6 + [4] * 2 + list(range(5, 12)))
DISTRACTORS = np.arange(20, 27)


def sampler(**overrides) -> ClassBalancedSampler:
    kwargs = {
        "labels": LABELS,
        "classes": [0, 1, 2, 3],  # class 4 has only 2 images: not drawn with K=3
        "classes_per_batch": 3,
        "images_per_class": 3,
        "num_batches": 10,
        "distractors": DISTRACTORS,
        "distractors_per_batch": 2,
        "seed": 0,
        **overrides,
    }
    return ClassBalancedSampler(**kwargs)


def test_every_batch_is_p_classes_by_k_images_plus_distractors() -> None:
    s = sampler()
    assert s.batch_size == 11 and len(s) == 110
    batches = s.batches(0)
    assert batches.shape == (10, 11)
    for batch in batches:
        check_batch(batch, LABELS, 5, 3, 3, 2)
        assert 4 not in LABELS[batch]
    assert [i for i, _ in s] == batches.ravel().tolist()


def test_draws_are_balanced_over_an_epoch() -> None:
    batches = sampler(num_batches=12).batches(0)
    per_class = Counter(LABELS[batches[:, :9]].ravel().tolist())
    # 12 batches x 3 classes over 4 classes in rounds: each class 9 times, i.e. 27 images
    assert per_class == {0: 27, 1: 27, 2: 27, 3: 27}
    # images of a class come in rounds too: counts differ by at most one
    per_image = Counter(batches[:, :9].ravel().tolist())
    for c in range(4):
        seen = [per_image[i] for i in np.flatnonzero(np.equal(LABELS, c))]
        assert max(seen) - min(seen) <= 1
    seen = [Counter(batches[:, 9:].ravel().tolist())[i] for i in DISTRACTORS]
    assert max(seen) - min(seen) <= 1 and sum(seen) == 24


def test_reproducible_for_a_seed_and_epoch() -> None:
    a, b = sampler(), sampler()
    assert np.array_equal(a.batches(0), b.batches(0))
    a.set_epoch(3)
    assert np.array_equal(np.array([i for i, _ in a]).reshape(10, 11), b.batches(3))
    assert not np.array_equal(b.batches(0), b.batches(1))
    assert not np.array_equal(sampler(seed=1).batches(0), b.batches(0))


def test_shards_by_rank() -> None:
    single = sampler(num_replicas=1, rank=0)
    ranks = [sampler(num_replicas=3, rank=r) for r in range(3)]
    assert all(len(r) == len(single) for r in ranks)  # steps per epoch do not depend on the world size
    global_batches = ranks[0].global_batches(2)
    assert global_batches.shape == (30, 11)
    for r, s in enumerate(ranks):
        s.set_epoch(2)
        assert np.array_equal(np.array([i for i, _ in s]).reshape(10, 11), global_batches[r::3])
    # the first ten global batches are what a single process draws
    assert np.array_equal(single.batches(2), global_batches[:10])
    assert isinstance(single, DistributedSampler)


def test_sampler_refuses_impossible_batches() -> None:
    with pytest.raises(ConfigError, match=r"images_per_class=3 but 1 classes have fewer images \(label 4: 2\)"):
        sampler(classes=[0, 1, 2, 4])
    with pytest.raises(ConfigError, match="classes_per_batch=5 but only 4 classes"):
        sampler(classes_per_batch=5)
    with pytest.raises(ConfigError, match="distractors_per_batch=8 but only 7 distractor images"):
        sampler(distractors_per_batch=8)
    with pytest.raises(ConfigError, match="batches_per_epoch must be a positive integer"):
        sampler(num_batches=0)
    assert sampler(distractors=(), distractors_per_batch=0).batch_size == 9


def test_members_are_the_images_of_each_class_from_one_sort() -> None:
    labels = np.random.default_rng(0).integers(0, 50, size=2000)
    s = ClassBalancedSampler(labels, np.unique(labels), 4, 2, 5)
    for c in np.unique(labels):
        assert np.array_equal(s.members(int(c)), np.flatnonzero(labels == c))
    with pytest.raises(KeyError):
        s.members(10_000)


def test_a_batch_costs_a_batch_not_an_epoch() -> None:
    """300k images in 30k classes and an endless epoch: construction sorts the labels once and the first batches
    come at once (a per-class scan or an epoch drawn up front would take minutes or exhaust memory)."""
    import time

    labels = np.random.default_rng(0).permutation(np.arange(300_000) % 30_000)
    start = time.perf_counter()
    s = ClassBalancedSampler(
        labels, np.arange(30_000), 8, 4, 10**12, distractors=np.arange(10), distractors_per_batch=2
    )
    it = iter(s)
    drawn = np.array([next(it) for _ in range(3 * s.batch_size)])
    assert time.perf_counter() - start < 5
    for batch in drawn[:, 0].reshape(3, s.batch_size):
        assert len(set(batch.tolist())) == len(batch)
        assert sorted(Counter(labels[batch[:32]].tolist()).values()) == [4] * 8


def test_the_iterator_keeps_the_epoch_it_was_made_in() -> None:
    """Lightning may create the loader's iterator before ``set_epoch``; the iterator draws the epoch current when
    it was made (``RetrievalDataModule`` sets the resumed epoch before making the loader)."""
    s = sampler()
    it = iter(s)
    s.set_epoch(1)
    assert np.array_equal(np.array([i for i, _ in it]).reshape(10, 11), s.batches(0))
    assert [seed for _, seed in s] == s.draw_seeds(1).ravel().tolist()
