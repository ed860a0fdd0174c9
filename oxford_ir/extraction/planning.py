"""Batches of extraction planned before any pixel is decoded, from the image headers.

Test-time images keep their aspect ratio, so they differ in size. The preprocessed size of every image is
known from its header alone (the long side becomes ``image_size`` by Pillow's ``thumbnail`` arithmetic,
reproduced in :func:`~oxford_ir.data.transforms.thumbnail_size`; a query's crop keeps the scale of its full
image), so the batches are fixed up front, in one of three modes (``extraction.batching``):

* ``bucket`` (the default): every image is padded to one of at most ``max_shapes`` bucket shapes chosen
  from the collection's own sizes (:mod:`oxford_ir.extraction.buckets`) and embedded as if alone (masked
  convolution inputs and pooling), so the embeddings equal the exact ones up to floating-point rounding. The
  network sees a small, fixed set of input shapes whatever the collection (cuDNN builds a plan per new
  shape). Needs a model that takes the images' sizes (``supports_padding``); others get ``shape`` batches.
* ``shape`` (exact to the bit; publication numbers): images of exactly equal preprocessed size share a batch.
  No padding, no extra resize: each embedding equals the one of the image alone. As many input shapes as sizes.
* ``aspect``: the images left over in small groups are sorted by aspect ratio and grouped when their ratios
  differ by at most ``aspect_tolerance``; each is resized (bilinear, antialiased) to its group's size.

Because the plan depends only on the list of images (and, in ``bucket`` mode, on the bucket shapes, which a
caller can fix: an index keeps the ones it was built with), it is the same in every process: sharding whole
batches across processes (:func:`shard`) gives each image the same batch companions as a single process
would, and therefore bit-identical embeddings (batch composition can change a convolution's floating-point
result, so sharding image by image would not).
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from oxford_ir.data.transforms import thumbnail_size
from oxford_ir.errors import ConfigError
from oxford_ir.extraction.buckets import ALIGN, MAX_SHAPES, Shape, aligned, assign, choose_buckets
from oxford_ir.images import upright_sizes

BATCHINGS = ("bucket", "shape", "aspect")
#: headers are read by this many threads when planning (file opening is I/O bound)
_PROBE_THREADS = 8


@dataclass(frozen=True)
class PlannedBatch:
    """Indices of the images of one forward pass; ``resize_to`` (aspect mode) or ``pad_to`` (bucket mode): the
    ``(height, width)`` every image of the batch is resized or padded to, None for exact batches."""

    indices: tuple[int, ...]
    resize_to: tuple[int, int] | None = None
    pad_to: tuple[int, int] | None = None


@dataclass(frozen=True)
class ExtractionPlan:
    """The batches of one extraction and what they cost: the network's input shapes and padding."""

    batches: list[PlannedBatch]
    #: each image's upright ``(width, height)`` read from its header (None when unreadable)
    sizes: list[tuple[int, int] | None]
    #: each image's preprocessed ``(height, width)`` (None when unknown)
    shapes: list[tuple[int, int] | None]
    #: ``bucket``, ``shape`` or ``aspect``
    mode: str
    #: bucket mode: the bucket table (every shape the images could be assigned to; empty otherwise)
    buckets: tuple[Shape, ...] = ()
    #: why a requested mode was not used (e.g. a model that cannot pool over a mask), or None
    note: str | None = field(default=None, compare=False)

    def input_shape(self, batch: PlannedBatch) -> tuple[int, int] | None:
        """The ``(height, width)`` the network receives for ``batch`` at scale 1 (None: unknown)."""
        if batch.pad_to is not None:
            return batch.pad_to
        if batch.resize_to is not None:
            return batch.resize_to
        return self.shapes[batch.indices[0]]

    def input_shapes(self) -> set[tuple[int, int]]:
        """The distinct input shapes of the plan (at scale 1; each further scale adds as many)."""
        return {s for s in (self.input_shape(b) for b in self.batches) if s is not None}

    def pixels(self) -> tuple[int, int]:
        """``(valid pixels, pixels the network receives)`` over the images of known size, at scale 1."""
        valid = padded = 0
        for batch in self.batches:
            for i in batch.indices:
                shape = self.shapes[i]
                if shape is not None:
                    target = batch.pad_to or batch.resize_to or shape
                    valid += shape[0] * shape[1]
                    padded += target[0] * target[1] if batch.pad_to else shape[0] * shape[1]
        return valid, padded

    def padding_ratio(self) -> float:
        """Padded pixels / valid pixels over the images of known size (0 without padding)."""
        valid, padded = self.pixels()
        return (padded - valid) / valid if valid else 0.0

    def part(self, start: int, stop: int, batch_size: int, aspect_tolerance: float = 0.1) -> ExtractionPlan:
        """The plan of images ``start:stop`` alone, with the same mode and (bucket mode) the same buckets:
        e.g. a benchmark's database and its queries, planned together so that they share one bucket table."""
        shapes = self.shapes[start:stop]
        if self.mode == "bucket":
            batches, used = plan_buckets(shapes, batch_size, self.buckets)
            table = union_buckets(self.buckets, used)
            return ExtractionPlan(batches, self.sizes[start:stop], shapes, self.mode, table, self.note)
        batches = plan_batches(shapes, batch_size, batching=self.mode, aspect_tolerance=aspect_tolerance)
        return ExtractionPlan(batches, self.sizes[start:stop], shapes, self.mode, note=self.note)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for ``metrics.json`` and reports."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "images": len(self.shapes),
            "batches": len(self.batches),
            "distinct_input_shapes": len(self.input_shapes()),
            "padded_over_valid_pixels": round(self.padding_ratio(), 6),
        }
        if self.mode == "bucket":
            out["buckets"] = [list(b) for b in self.buckets]
        if self.note:
            out["note"] = self.note
        return out


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


def header_sizes(
    sources: Sequence[str | Path | Image.Image],
    image_size: int | None,
    bboxes: Sequence[Sequence[float] | None] | None = None,
) -> list[tuple[tuple[int, int], tuple[int, int]] | None]:
    """``(full size, decoded size)`` (upright ``(width, height)``) of each image, from headers only: the decoded
    size is what the test-time decoder produces (a huge JPEG without a box is decoded at reduced size: see
    :func:`~oxford_ir.data.datasets.eval_image`). None for an unreadable header, and for a path that is not a
    regular file (a FIFO or device would block this process; its decoding fails or times out in a worker)."""

    def sizes(i: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        if isinstance(sources[i], str | Path) and not _regular_file(sources[i]):
            return None
        boxed = bboxes is not None and bboxes[i] is not None
        draft = None if boxed or image_size is None else math.ceil(image_size)
        return upright_sizes(sources[i], draft_size=draft)

    with warnings.catch_warnings():  # Pillow warns about large images at open; decoding handles them
        warnings.simplefilter("ignore", Warning)
        if len(sources) > 256:
            with ThreadPoolExecutor(_PROBE_THREADS) as pool:
                return list(pool.map(sizes, range(len(sources)), chunksize=64))
        return [sizes(i) for i in range(len(sources))]


def _regular_file(path: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # missing: reading the header says so


def plan_extraction(
    sources: Sequence[str | Path | Image.Image],
    image_size: int | None,
    batch_size: int,
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    buckets: Sequence[Shape] | None = None,
    aspect_tolerance: float = 0.1,
) -> ExtractionPlan:
    """The plan of embedding ``sources`` (files or PIL images, queries cropped to ``bboxes``).

    ``bucket`` mode chooses at most ``max_shapes`` buckets from these images, or uses ``buckets`` when given
    (an image larger than every given bucket gets a bucket of its own, rounded up to the alignment).
    """
    check_batching(batching, max_shapes, aspect_tolerance)
    if bboxes is not None and len(bboxes) != len(sources):
        raise ValueError(f"{len(bboxes)} bounding boxes for {len(sources)} images; give one per image or None")
    read = header_sizes(sources, image_size, bboxes)
    sizes = [None if r is None else r[0] for r in read]
    shapes = [
        None if r is None else preprocessed_shape(r[1], image_size, None if bboxes is None else bboxes[i])
        for i, r in enumerate(read)
    ]
    if batching == "bucket":
        known = [s for s in shapes if s is not None]
        table = tuple(tuple(b) for b in buckets) if buckets is not None else choose_buckets(known, max_shapes)
        batches, used = plan_buckets(shapes, batch_size, table)
        return ExtractionPlan(batches, sizes, shapes, "bucket", union_buckets(table, used))
    batches = plan_batches(shapes, batch_size, batching=batching, aspect_tolerance=aspect_tolerance)
    return ExtractionPlan(batches, sizes, shapes, batching)


def union_buckets(*tables: Sequence[Shape]) -> tuple[Shape, ...]:
    """The buckets of several tables, once each, smallest first."""
    return tuple(sorted({tuple(b) for table in tables for b in table}, key=lambda b: (b[0] * b[1], b)))


def check_batching(batching: str, max_shapes: int = MAX_SHAPES, aspect_tolerance: float = 0.1) -> None:
    """ConfigError naming the ``extraction`` key of a bad batching setting."""
    if batching not in BATCHINGS:
        raise ConfigError(
            f"extraction.batching={batching!r}: choose bucket (few input shapes, fast), shape (exact) or aspect"
        )
    if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
        raise ConfigError(f"extraction.max_shapes={max_shapes!r}: a whole number of input shapes >= 1, e.g. 16")
    if isinstance(aspect_tolerance, bool) or not isinstance(aspect_tolerance, int | float) or not aspect_tolerance >= 0:
        raise ConfigError(f"extraction.aspect_tolerance={aspect_tolerance!r}: a relative difference >= 0, e.g. 0.1")


def plan_buckets(
    shapes: Sequence[tuple[int, int] | None], batch_size: int, buckets: Sequence[Shape]
) -> tuple[list[PlannedBatch], tuple[Shape, ...]]:
    """Batches of at most ``batch_size`` images of one bucket each, and the buckets actually used.

    Images go to the smallest bucket that holds them, in index order; one larger than every bucket gets its
    own (its shape rounded up to :data:`~oxford_ir.extraction.buckets.ALIGN`); one of unknown size gets a
    batch of its own. Deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    members: dict[Shape, list[int]] = {}
    unknown: list[int] = []
    for i, shape in enumerate(shapes):
        if shape is None:
            unknown.append(i)
            continue
        bucket = assign(shape, buckets) or aligned(shape, ALIGN)
        members.setdefault(bucket, []).append(i)
    batches: list[PlannedBatch] = []
    for bucket in sorted(members, key=lambda b: (b[0] * b[1], b)):
        rows = members[bucket]
        batches += [
            PlannedBatch(tuple(rows[k : k + batch_size]), pad_to=bucket) for k in range(0, len(rows), batch_size)
        ]
    batches += [PlannedBatch((i,)) for i in unknown]
    return batches, tuple(sorted(members, key=lambda b: (b[0] * b[1], b)))


def plan_batches(
    shapes: Sequence[tuple[int, int] | None],
    batch_size: int,
    *,
    batching: str = "shape",
    aspect_tolerance: float = 0.1,
) -> list[PlannedBatch]:
    """Batches of at most ``batch_size`` images covering every index of ``shapes`` exactly once, in ``shape``
    or ``aspect`` mode (see the module doc).

    ``shapes[i]`` is the preprocessed ``(height, width)`` of image i, or None when unknown (it then gets a
    batch of its own). Deterministic: the same shapes always give the same plan.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batching not in ("shape", "aspect"):
        raise ValueError(f"batching={batching!r}: plan_batches plans shape or aspect batches")
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
