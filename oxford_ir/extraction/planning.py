"""Batches of extraction planned before any pixel is decoded, from the image headers.

Evaluation images keep their aspect ratio, so they differ in size and cannot all share one forward pass.
The preprocessed size of every image is known from its header alone (the long side becomes ``image_size``
by Pillow's ``thumbnail`` arithmetic, reproduced in :func:`thumbnail_size`; a query's crop keeps the scale
of its full image), so the batches are fixed up front:

* ``shape`` batching (the default, exact): images of exactly equal preprocessed size share a batch. No
  padding, no extra resize: each embedding equals the one of the image alone.
* ``aspect`` batching: the images left over in small groups (cropped queries, odd sizes) are sorted by
  aspect ratio and grouped when their ratios differ by at most ``aspect_tolerance``; each is resized
  (bilinear, antialiased) to its group's size. Faster when sizes vary; embeddings move slightly.

Because the plan depends only on the list of images, it is the same in every process: sharding whole
batches across processes (:func:`shard`) gives each image the same batch companions as a single process
would, and therefore bit-identical embeddings (batch composition can change a convolution's floating-point
result, so sharding image by image would not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oxford_ir.data.transforms import thumbnail_size

BATCHINGS = ("shape", "aspect")


@dataclass(frozen=True)
class PlannedBatch:
    """Indices of the images of one forward pass, and the ``(height, width)`` they are resized to (or None)."""

    indices: tuple[int, ...]
    resize_to: tuple[int, int] | None = None


def preprocessed_shape(
    full_size: tuple[int, int], image_size: float | None, bbox: Sequence[float] | None = None
) -> tuple[int, int]:
    """``(height, width)`` of the tensor :class:`~oxford_ir.data.datasets.ImageListDataset` makes of an image
    whose upright size is ``full_size`` (width, height): cropped to ``bbox`` (PIL rounds the box), the long side
    downscaled to ``image_size`` (a crop to ``image_size * max(crop) / max(full)``)."""
    width, height = full_size
    size = image_size
    if bbox is not None:
        x1, y1, x2, y2 = (round(float(v)) for v in bbox)
        crop_w, crop_h = abs(x2 - x1), abs(y2 - y1)
        if size is not None:
            size = max(size * max(crop_w, crop_h) / max(width, height), 1.0)
        width, height = crop_w, crop_h
    if size is not None and width > 0 and height > 0:
        width, height = thumbnail_size(width, height, size)
    return height, width


def plan_batches(
    shapes: Sequence[tuple[int, int] | None],
    batch_size: int,
    *,
    batching: str = "shape",
    aspect_tolerance: float = 0.1,
) -> list[PlannedBatch]:
    """Batches of at most ``batch_size`` images covering every index of ``shapes`` exactly once.

    ``shapes[i]`` is the preprocessed ``(height, width)`` of image i, or None when unknown (it then gets a
    batch of its own). Deterministic: the same shapes always give the same plan. See the module doc for
    the two ``batching`` modes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batching not in BATCHINGS:
        raise ValueError(f"batching={batching!r}: choose one of {', '.join(BATCHINGS)}")
    if not aspect_tolerance >= 0:
        raise ValueError(f"aspect_tolerance must be >= 0, got {aspect_tolerance}")
    groups: dict[tuple[int, int], list[int]] = {}
    unknown: list[int] = []
    for i, shape in enumerate(shapes):
        if shape is None:
            unknown.append(i)
        else:
            groups.setdefault((int(shape[0]), int(shape[1])), []).append(i)
    batches: list[PlannedBatch] = []
    leftovers: list[int] = []
    for members in groups.values():
        full = len(members) - len(members) % batch_size if batching == "aspect" else len(members)
        batches += [PlannedBatch(tuple(members[k : k + batch_size])) for k in range(0, full, batch_size)]
        leftovers += members[full:]
    if leftovers:
        batches += _aspect_groups(leftovers, shapes, batch_size, aspect_tolerance)
    batches += [PlannedBatch((i,)) for i in unknown]
    return batches


def _aspect_groups(
    indices: list[int], shapes: Sequence[tuple[int, int] | None], batch_size: int, tolerance: float
) -> list[PlannedBatch]:
    """Consecutive runs of the images sorted by aspect ratio, each resized to the shape of its median image."""

    def aspect(i: int) -> float:
        h, w = shapes[i]  # type: ignore[misc]
        return w / h

    order = sorted(indices, key=lambda i: (aspect(i), i))
    batches: list[PlannedBatch] = []
    start = 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order)
            and end - start < batch_size
            and aspect(order[end]) <= aspect(order[start]) * (1 + tolerance)
        ):
            end += 1
        members = sorted(order[start:end])
        if len({shapes[i] for i in members}) == 1:
            batches.append(PlannedBatch(tuple(members)))
        else:
            median = sorted(members, key=lambda i: (shapes[i][0] * shapes[i][1], i))[len(members) // 2]  # type: ignore[index]
            batches.append(PlannedBatch(tuple(members), tuple(shapes[median])))  # type: ignore[arg-type]
        start = end
    return batches


def shard(batches: Sequence[PlannedBatch], rank: int, world_size: int) -> list[PlannedBatch]:
    """The batches process ``rank`` of ``world_size`` runs: every ``world_size``-th, so shards are balanced."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return list(batches[rank::world_size])
