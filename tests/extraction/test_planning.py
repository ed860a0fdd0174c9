"""Planned extraction batches: shapes predicted from headers equal the decoded ones; plans cover every image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.data.transforms import thumbnail_size
from oxford_ir.extraction.planning import (
    PlannedBatch,
    plan_batches,
    preprocessed_shape,
    shard,
)
from oxford_ir.images import upright_size


def test_thumbnail_size_is_pillows_arithmetic() -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        width, height = (int(v) for v in rng.integers(1, 400, size=2))
        size = float(rng.uniform(1, 450))
        image = Image.new("L", (width, height))
        image.thumbnail((size, size), Image.Resampling.NEAREST, reducing_gap=None)
        assert thumbnail_size(width, height, size) == image.size, (width, height, size)


def test_predicted_shapes_equal_the_dataset_tensors_with_crops_and_exif(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths, boxes = [], []
    for i in range(12):
        width, height = (int(v) for v in rng.integers(20, 120, size=2))
        path = tmp_path / f"im{i}.jpg"
        image = Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))
        exif = Image.Exif()
        if i % 3 == 0:
            exif[0x0112] = 6  # rotated a quarter turn: the viewer sees height x width
        image.save(path, exif=exif)
        paths.append(path)
        if i % 2:
            x1, y1 = rng.uniform(0, 10, size=2)
            boxes.append((float(x1), float(y1), float(x1 + rng.uniform(5, 15)), float(y1 + rng.uniform(5, 15))))
        else:
            boxes.append(None)
    for image_size in (None, 16, 37.0, 64):
        dataset = ImageListDataset(paths, image_size, bboxes=boxes)
        for i, path in enumerate(paths):
            predicted = preprocessed_shape(upright_size(path), image_size, boxes[i])
            assert predicted == tuple(dataset[i][0].shape[-2:]), (path.name, image_size, boxes[i])
    assert upright_size(paths[0]) == Image.open(paths[0]).size[::-1]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert upright_size(broken) is None and upright_size(tmp_path / "missing.jpg") is None


def _covers(plan: list[PlannedBatch], n: int) -> None:
    seen = sorted(i for b in plan for i in b.indices)
    assert seen == list(range(n))


def test_shape_plan_groups_equal_shapes_in_order_and_isolates_unknown_ones() -> None:
    shapes = [(3, 4), (4, 3), (3, 4), None, (3, 4), (4, 3), (3, 4), (5, 5)]
    plan = plan_batches(shapes, batch_size=3)
    _covers(plan, len(shapes))
    assert plan == [
        PlannedBatch((0, 2, 4)),
        PlannedBatch((6,)),
        PlannedBatch((1, 5)),
        PlannedBatch((7,)),
        PlannedBatch((3,)),
    ]
    assert all(b.resize_to is None for b in plan)
    assert plan_batches(shapes, batch_size=3) == plan  # deterministic


def test_aspect_plan_merges_leftovers_of_similar_aspect_and_resizes_them() -> None:
    # two full batches of one shape, then single odd sizes: near-square ones merge, the panorama stays alone
    shapes = [(30, 40)] * 4 + [(20, 20), (21, 20), (19, 20), (10, 50), (30, 40)]
    plan = plan_batches(shapes, batch_size=4, batching="aspect", aspect_tolerance=0.15)
    _covers(plan, len(shapes))
    assert plan[0] == PlannedBatch((0, 1, 2, 3))
    merged = [b for b in plan if set(b.indices) == {4, 5, 6}]
    assert len(merged) == 1 and merged[0].resize_to == (20, 20)  # the median-area image's shape
    assert PlannedBatch((7,)) in plan and PlannedBatch((8,)) in plan
    wide = plan_batches(shapes, batch_size=4, batching="aspect", aspect_tolerance=10.0)
    _covers(wide, len(shapes))
    assert max(len(b.indices) for b in wide) == 4 and len(wide) < len(plan)


def test_shards_partition_the_plan() -> None:
    plan = [PlannedBatch((i,)) for i in range(7)]
    shards = [shard(plan, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2]
    assert sorted(b.indices[0] for s in shards for b in s) == list(range(7))
    with pytest.raises(ValueError, match="outside"):
        shard(plan, 3, 3)


def test_bad_plan_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([(1, 1)], 0)
    with pytest.raises(ValueError, match="batching"):
        plan_batches([(1, 1)], 1, batching="padding")
