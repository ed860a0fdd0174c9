"""Bucket shapes: the bound on distinct input shapes, fitting, padding, and the plans built on them."""

from __future__ import annotations

import random

import pytest

from oxford_ir.errors import ConfigError
from oxford_ir.extraction.buckets import ALIGN, aligned, assign, choose_buckets, padding_ratio
from oxford_ir.extraction.planning import ExtractionPlan, PlannedBatch, plan_buckets


def _random_shapes(seed: int, n: int, low: int = 1, high: int = 1024) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(n)]


def _oxford_paris_mix(seed: int = 0) -> list[tuple[int, int]]:
    """Database images at 1024 px in the sizes of Oxford5k / Paris6k (landscape and portrait 1024 x 768, 1024 x
    683, 1024 x 576, a few odd ones) and query crops of random sizes at the same scale."""
    rng = random.Random(seed)
    shapes = []
    for short, count in ((768, 900), (683, 400), (576, 60), (681, 40), (680, 20), (771, 10), (1024, 10)):
        portrait = count * 2 // 5
        shapes += [(short, 1024)] * (count - portrait) + [(1024, short)] * portrait
    shapes += [(rng.randint(120, 1024), rng.randint(120, 1024)) for _ in range(70)]
    return shapes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_shapes", [1, 4, 16])
def test_at_most_max_shapes_buckets_and_every_shape_fits_one(seed: int, max_shapes: int) -> None:
    shapes = _random_shapes(seed, 300)
    buckets = choose_buckets(shapes, max_shapes)
    assert 1 <= len(buckets) <= max_shapes
    for h, w in buckets:
        assert h % ALIGN == 0 and w % ALIGN == 0
    for shape in shapes:
        bucket = assign(shape, buckets)
        assert bucket is not None and bucket[0] >= shape[0] and bucket[1] >= shape[1]
        # the smallest one that holds it
        assert all(b[0] * b[1] >= bucket[0] * bucket[1] for b in buckets if b[0] >= shape[0] and b[1] >= shape[1])


def test_few_sizes_keep_their_own_aligned_shapes() -> None:
    shapes = [(768, 1024), (1024, 768), (683, 1024), (768, 1024), (100, 50)]
    assert set(choose_buckets(shapes, 16)) == {(768, 1024), (1024, 768), (704, 1024), (128, 64)}


def test_the_cheapest_merge_by_hand() -> None:
    # three 32 x 32 images, one 64 x 64, one 32 x 64; with 2 buckets the 32 x 64 image joins the 64 x 64 one
    # (adds 64 * 64 - 32 * 64 = 2048 px) rather than the three small ones (3 * 1024 px more: 3072)
    shapes = [(32, 32)] * 3 + [(64, 64), (32, 64)]
    assert choose_buckets(shapes, 2) == ((32, 32), (64, 64))
    assert choose_buckets(shapes, 1) == ((64, 64),)


def test_buckets_are_deterministic_and_independent_of_order() -> None:
    shapes = _random_shapes(7, 500)
    assert choose_buckets(shapes, 16) == choose_buckets(list(reversed(shapes)), 16)


def test_many_distinct_sizes_are_coarsened_first() -> None:
    shapes = _random_shapes(3, 3000, high=4000)  # original resolutions: thousands of aligned shapes
    buckets = choose_buckets(shapes, 16)
    assert len(buckets) <= 16 and all(assign(s, buckets) is not None for s in shapes)


def test_padding_on_the_oxford_paris_size_mix_is_small() -> None:
    shapes = _oxford_paris_mix()
    buckets = choose_buckets(shapes, 16)
    padded = [assign(s, buckets) for s in shapes]
    ratio = padding_ratio(shapes, padded)
    assert ratio <= 0.15, ratio  # the bound; in practice about 2%
    # against the naive choice of padding everything to the largest shape
    assert ratio < padding_ratio(shapes, [(1024, 1024)] * len(shapes)) / 5


def test_aligned_and_padding_ratio_by_hand() -> None:
    assert aligned((1, 33)) == (32, 64) and aligned((64, 64)) == (64, 64)
    assert padding_ratio([(30, 30), (64, 64)], [(32, 32), (64, 64)]) == pytest.approx((32 * 32 - 900) / (900 + 4096))
    assert assign((65, 10), [(64, 64)]) is None


def test_bucket_plan_groups_by_bucket_in_index_order() -> None:
    shapes = [(30, 30), (64, 64), (20, 10), None, (32, 32), (60, 64)]
    batches, used = plan_buckets(shapes, 2, ((32, 32), (64, 64)))
    assert used == ((32, 32), (64, 64))
    assert batches == [
        PlannedBatch((0, 2), pad_to=(32, 32)),
        PlannedBatch((4,), pad_to=(32, 32)),
        PlannedBatch((1, 5), pad_to=(64, 64)),
        PlannedBatch((3,)),  # unknown size: alone, decoding will report it
    ]


def test_an_image_larger_than_every_given_bucket_gets_its_own() -> None:
    batches, used = plan_buckets([(30, 30), (100, 40)], 4, ((32, 32),))
    assert used == ((32, 32), (128, 64))
    assert batches[-1] == PlannedBatch((1,), pad_to=(128, 64))


def test_plan_summary_counts_shapes_and_padding() -> None:
    shapes = [(30, 30), (64, 64), (20, 10)]
    batches, used = plan_buckets(shapes, 8, ((32, 32), (64, 64)))
    plan = ExtractionPlan(batches, [None] * 3, shapes, "bucket", used)
    summary = plan.summary()
    assert summary["distinct_input_shapes"] == 2 and summary["mode"] == "bucket" and summary["images"] == 3
    valid = 900 + 4096 + 200
    assert summary["padded_over_valid_pixels"] == pytest.approx((2 * 1024 + 4096 - valid) / valid, abs=1e-6)
    assert summary["buckets"] == [[32, 32], [64, 64]]


def test_bad_bucket_settings() -> None:
    with pytest.raises(ValueError, match="max_shapes"):
        choose_buckets([(1, 1)], 0)
    from oxford_ir.extraction.planning import check_batching

    with pytest.raises(ConfigError, match="extraction.max_shapes"):
        check_batching("bucket", 0)
    with pytest.raises(ConfigError, match="extraction.batching='padding'"):
        check_batching("padding")
