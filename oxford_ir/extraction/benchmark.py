"""A benchmark through the extraction path: its database and queries planned together, embedded, summarised.

In bucket mode the database images and the cropped queries share one bucket table (:func:`plan_benchmark`), so
a benchmark has at most ``max_shapes`` input shapes; ``oxford-ir-eval`` (:func:`extract_benchmark`) and
validation during training (:func:`benchmark_loaders`, whose items
:func:`~oxford_ir.extraction.embedding.embed_loader_item` embeds) use the same plans, and :func:`plans_summary`
is what ``metrics.json`` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.registry import benchmark_spec
from oxford_ir.data.cache import build_image_cache, cache_folder
from oxford_ir.data.cache_format import ImageCache
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.extraction.buckets import MAX_SHAPES
from oxford_ir.extraction.distributed import barrier, rank_and_world
from oxford_ir.extraction.embedding import extract_embeddings, plan_for_model, planned_dataset
from oxford_ir.extraction.planning import ExtractionPlan, union_buckets
from oxford_ir.fs import WORKER_TIMEOUT, share_tensors_by_name


def every_image(benchmark: Benchmark) -> tuple[list[Path], list[Sequence[float] | None]]:
    """The database images then the queries of ``benchmark``, with each query's box (None for the database)."""
    return [*benchmark.db_paths, *benchmark.query_paths], [None] * benchmark.n_db + list(benchmark.query_bboxes)


def plan_benchmark(
    model: nn.Module,
    benchmark: Benchmark,
    image_size: int | None,
    batch_size: int,
    *,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    aspect_tolerance: float = 0.1,
) -> tuple[ExtractionPlan, ExtractionPlan]:
    """``(database plan, query plan)`` of a benchmark, planned together: in bucket mode the database images and
    the cropped queries share one bucket table, so the benchmark has at most ``max_shapes`` input shapes."""
    sources, boxes = every_image(benchmark)
    joint = plan_for_model(
        model,
        sources,
        image_size,
        batch_size,
        bboxes=boxes,
        batching=batching,
        max_shapes=max_shapes,
        aspect_tolerance=aspect_tolerance,
    )
    n_db = benchmark.n_db
    return (
        joint.part(0, n_db, batch_size, aspect_tolerance),
        joint.part(n_db, len(sources), batch_size, aspect_tolerance),
    )


def plans_summary(plans: Sequence[ExtractionPlan]) -> dict[str, Any]:
    """One summary of several plans run by one network (e.g. a benchmark's database and queries)."""
    shapes: set[tuple[int, int]] = set()
    valid = padded = 0
    for plan in plans:
        shapes |= plan.input_shapes()
        plan_valid, plan_padded = plan.pixels()
        valid, padded = valid + plan_valid, padded + plan_padded
    out: dict[str, Any] = {
        "mode": plans[0].mode,
        "images": sum(len(p.shapes) for p in plans),
        "batches": sum(len(p.batches) for p in plans),
        "distinct_input_shapes": len(shapes),
        "padded_over_valid_pixels": round((padded - valid) / valid, 6) if valid else 0.0,
    }
    if plans[0].mode == "bucket":
        out["buckets"] = [list(b) for b in union_buckets(*(p.buckets for p in plans))]
    notes = sorted({p.note for p in plans if p.note})
    if notes:
        out["note"] = "; ".join(notes)
    return out


def extract_benchmark(
    model: nn.Module,
    benchmark: Benchmark,
    image_size: int | None,
    *,
    scales: Sequence[float] = (1.0,),
    cache: ImageCache | None = None,
    plans: tuple[ExtractionPlan, ExtractionPlan] | None = None,
    batch_size: int = 16,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    aspect_tolerance: float = 0.1,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(database n_db x D, queries n_q x D)`` embeddings; queries are cropped to their boxes.

    ``plans``: the database and query plans of :func:`plan_benchmark` (made here when None: in bucket mode one
    bucket table for both). ``cache``: an evaluation :class:`~oxford_ir.data.cache_format.ImageCache` at ``image_size``
    holding the database images and the cropped queries (:func:`benchmark_cache`): the same tensors, read
    instead of decoded.
    """
    if plans is None:
        plans = plan_benchmark(
            model,
            benchmark,
            image_size,
            batch_size,
            batching=batching,
            max_shapes=max_shapes,
            aspect_tolerance=aspect_tolerance,
        )
    db_images = queries_images = None
    if cache is not None:
        db_images = ImageListDataset(benchmark.db_paths, image_size, cache=cache)
        queries_images = ImageListDataset(benchmark.query_paths, image_size, bboxes=benchmark.query_bboxes, cache=cache)
    common = {"scales": scales, "batch_size": batch_size, **kwargs}
    db = extract_embeddings(model, benchmark.db_paths, image_size, images=db_images, plan=plans[0], **common)
    queries = extract_embeddings(
        model,
        benchmark.query_paths,
        image_size,
        bboxes=benchmark.query_bboxes,
        images=queries_images,
        plan=plans[1],
        **common,
    )
    return db, queries


def benchmark_loaders(
    model: nn.Module,
    benchmark: Benchmark,
    *,
    image_size: int | None,
    batch_size: int,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    gpu_decode: bool = False,
    images: tuple[Dataset, Dataset] | None = None,
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> tuple[list[DataLoader], tuple[ExtractionPlan, ExtractionPlan]]:
    """``[database loader, query loader]`` of a benchmark's planned batches, and the two plans: what validation
    during training iterates (each item is one planned batch, for :func:`embed_loader_item`).

    ``images``: the ``(database, queries)`` test-time datasets (e.g. reading the image cache); None reads the
    files. ``gpu_decode``: the loaders yield encoded batches for the device to decode. ``worker_timeout``: seconds
    a worker may take to deliver a batch (None: no limit) before the loader raises (a hung worker would stall
    validation forever); a worker's own failure arrives as an item that :func:`embed_loader_item` raises.
    """
    plans = plan_benchmark(model, benchmark, image_size, batch_size, batching=batching, max_shapes=max_shapes)
    parts = (
        (benchmark.db_paths, None, plans[0]),
        (benchmark.query_paths, benchmark.query_bboxes, plans[1]),
    )
    loaders = [
        planned_loader(
            paths,
            image_size,
            plan,
            bboxes=bboxes,
            images=None if images is None else images[k],
            gpu_decode=gpu_decode,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            worker_timeout=worker_timeout,
        )
        for k, (paths, bboxes, plan) in enumerate(parts)
    ]
    return loaders, plans


def image_list_loader(
    model: nn.Module,
    paths: Sequence[Path],
    *,
    image_size: int | None,
    batch_size: int,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    **loader_kwargs: Any,
) -> tuple[DataLoader, ExtractionPlan]:
    """The loader of whole images ``paths`` planned for ``model`` (e.g. the training images a whitening is learned
    from during validation), and its plan; ``loader_kwargs`` as :func:`planned_loader`'s."""
    plan = plan_for_model(model, paths, image_size, batch_size, batching=batching, max_shapes=max_shapes)
    return planned_loader(paths, image_size, plan, **loader_kwargs), plan


def planned_loader(
    paths: Sequence[Path],
    image_size: int | None,
    plan: ExtractionPlan,
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    images: Dataset | None = None,
    gpu_decode: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> DataLoader:
    """A DataLoader whose items are the planned batches of ``plan`` (decoded by workers from ``images`` or the
    files, or read for the device to decode with ``gpu_decode``), for :func:`embed_loader_item`."""
    if num_workers > 0:
        share_tensors_by_name()  # a stopped worker cannot block the handover of a batch past the timeout
    dataset = planned_dataset(paths, image_size, plan.batches, bboxes=bboxes, images=images, on_device=gpu_decode)
    return DataLoader(
        dataset,
        batch_size=None,  # each item is a whole planned batch
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        timeout=float(worker_timeout or 0) if num_workers > 0 else 0,
    )


def benchmark_cache(
    benchmark: Benchmark, image_size: int | None, cache_dir: str | Path, *, num_workers: int = 0, progress: bool = True
) -> ImageCache:
    """The evaluation image cache of ``benchmark`` at ``image_size`` under ``cache_dir`` (the folder the
    datamodule uses too), built or updated by the first process of a group and opened by all."""
    paths, boxes = every_image(benchmark)
    folder = cache_folder(cache_dir, "eval", benchmark.dataset or benchmark_spec(benchmark.name).folder, image_size)

    def build() -> ImageCache:
        return build_image_cache(
            folder, paths, boxes=boxes, kind="eval", long_side=image_size, num_workers=num_workers, progress=progress
        )

    rank, world = rank_and_world()
    cache = build() if rank == 0 else None
    barrier()
    return cache if cache is not None else build()  # fresh by now: opened without writing
