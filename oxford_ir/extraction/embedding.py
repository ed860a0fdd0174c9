"""Embedding image lists and benchmarks: planned batches, single- or multi-scale, in the order of the paths.

Preprocessing follows cnnimageretrieval-pytorch (long side downscaled to ``image_size``, queries cropped
to their boxes at full-image scale). The batches are planned from the image headers before decoding
(:mod:`oxford_ir.extraction.planning`): images of equal preprocessed size share a forward pass (or, with
``batching="aspect"``, images of similar aspect ratio, resized to a common size). DataLoader workers decode
and stack whole batches; the main process only runs the network. Under a process group (torchrun, or
:func:`oxford_ir.extraction.distributed.init_from_environment`) every process embeds its share of the
batches and all processes receive every row, bit-identical to a single process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from oxford_ir.data.benchmark import Benchmark
from oxford_ir.data.cache import ImageCache, build_image_cache, cache_folder
from oxford_ir.data.datasets import ImageListDataset, rescale
from oxford_ir.data.images import upright_size
from oxford_ir.data.loading import benchmark_spec
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.distributed import all_failures, barrier, gather_rows, rank_and_world
from oxford_ir.extraction.planning import PlannedBatch, plan_batches, preprocessed_shape, shard

#: ``precision=`` values: float32, or bfloat16 autocast (Ampere GPUs and newer; CPUs with AVX512-BF16)
PRECISIONS = ("32", "bf16")
#: headers are read by this many threads when planning (file opening is I/O bound)
_PROBE_THREADS = 8


def embed_batch(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """Embeddings of a batch of equally sized images, combined over ``scales``.

    With several scales this is cnnimageretrieval's ``extract_ms``: ``v = (mean_s f(x_s) ** p) ** (1 / p)``,
    then L2-normalised, where ``x_s`` is the batch resized bilinearly by ``s`` and ``p`` is
    ``model.power`` (GeM's p; 1 when absent). A single scale is the network output itself.
    ``channels_last`` hands the network NHWC tensors (faster convolutions on GPUs with tensor cores).
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x)

    if len(scales) == 1:
        return forward(rescale(images, float(scales[0])))
    p = float(getattr(model, "power", 1.0))
    total = None
    for s in scales:
        v = forward(rescale(images, float(s))).float().pow(p)
        total = v if total is None else total + v
    return F.normalize((total / len(scales)).pow(1.0 / p), dim=1)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` ("32": none)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"extraction.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class PlannedBatches(Dataset):
    """Item k: the images of planned batch k, decoded and stacked by a DataLoader worker.

    Returns ``(groups, failures)``: ``groups`` is a list of ``(indices, B x 3 x H x W tensor)``, one per
    distinct shape (normally one: the plan predicted it), ``failures`` a list of ``(index, message)`` for
    images ``images[i]`` could not decode (a :class:`DataError`), which the caller raises or reports.
    ``images[i]`` must return ``(3 x H x W tensor, ...)``.
    """

    def __init__(self, images: Dataset, batches: Sequence[PlannedBatch]) -> None:
        self.images = images
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[int, str]]]:
        batch = self.batches[k]
        by_shape: dict[tuple[int, int], tuple[list[int], list[torch.Tensor]]] = {}
        failures: list[tuple[int, str]] = []
        for i in batch.indices:
            try:
                tensor = self.images[i][0]
            except DataError as error:
                failures.append((i, str(error)))
                continue
            if batch.resize_to is not None and tuple(tensor.shape[-2:]) != batch.resize_to:
                tensor = F.interpolate(
                    tensor.unsqueeze(0), size=batch.resize_to, mode="bilinear", align_corners=False, antialias=True
                ).squeeze(0)
            rows, tensors = by_shape.setdefault((int(tensor.shape[-2]), int(tensor.shape[-1])), ([], []))
            rows.append(i)
            tensors.append(tensor)
        groups = [(torch.tensor(rows), torch.stack(tensors)) for rows, tensors in by_shape.values()]
        return groups, failures


def plan_extraction(
    paths: Sequence[str | Path],
    image_size: int | None,
    batch_size: int,
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    batching: str = "shape",
    aspect_tolerance: float = 0.1,
) -> tuple[list[PlannedBatch], list[tuple[int, int] | None]]:
    """The batches of ``paths`` (see :func:`~oxford_ir.extraction.planning.plan_batches`) and each image's
    upright ``(width, height)`` read from its header (None when unreadable)."""
    if batching not in ("shape", "aspect"):
        raise ConfigError(f"extraction.batching={batching!r}: choose shape (exact) or aspect (faster, approximate)")
    with warnings.catch_warnings():  # Pillow warns about large images at open; decoding handles them
        warnings.simplefilter("ignore", Warning)
        if len(paths) > 256:
            with ThreadPoolExecutor(_PROBE_THREADS) as pool:
                sizes = list(pool.map(upright_size, paths, chunksize=64))
        else:
            sizes = [upright_size(p) for p in paths]
    shapes = [
        None if size is None else preprocessed_shape(size, image_size, None if bboxes is None else bboxes[i])
        for i, size in enumerate(sizes)
    ]
    return plan_batches(shapes, batch_size, batching=batching, aspect_tolerance=aspect_tolerance), sizes


def embed_planned(
    model: nn.Module,
    images: Dataset,
    batches: Sequence[PlannedBatch],
    *,
    scales: Sequence[float] = (1.0,),
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    precision: str = "32",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "embedding",
) -> Iterator[tuple[list[int], torch.Tensor | None, list[str]]]:
    """Yield ``(indices, float32 vectors on the CPU, [])`` per forward pass and ``(indices, None, messages)``
    for images that could not be decoded, running ``batches`` in order (the caller shards them).

    The model must already be on ``device`` and in eval mode; this runs under ``torch.inference_mode``.
    """
    loader = DataLoader(
        PlannedBatches(images, batches),
        batch_size=None,  # each item is a whole planned batch
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    total = sum(len(b.indices) for b in batches)
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="img", dynamic_ncols=True)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for groups, failures in loader:
                if failures:
                    bar.update(len(failures))
                    yield [i for i, _ in failures], None, [m for _, m in failures]
                for rows, batch in groups:
                    batch = batch.to(device, non_blocking=True)
                    vectors = embed_batch(model, batch, scales, channels_last=channels_last).float().cpu()
                    bar.update(len(rows))
                    yield rows.tolist(), vectors, []
    finally:
        bar.close()


def extract_embeddings(
    model: nn.Module,
    paths: Sequence[str | Path],
    image_size: int | None,
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    batching: str = "shape",
    aspect_tolerance: float = 0.1,
    precision: str = "32",
    channels_last: bool = False,
    images: Dataset | None = None,
) -> torch.Tensor:
    """N x D float32 L2-normalised embeddings of ``paths`` (row i is ``paths[i]``), on the CPU.

    ``bboxes[i]`` (or None) crops image i, as queries are. The model is moved to ``device`` and run in
    eval mode under ``torch.inference_mode`` (``precision="bf16"``: bfloat16 autocast; ``channels_last``:
    NHWC inputs); its training mode is restored afterwards. An image that cannot be read raises the
    :class:`~oxford_ir.errors.DataError` of ``load_image``, naming the file. ``images`` replaces the default
    ``ImageListDataset(paths, image_size, bboxes=bboxes)`` (e.g. one reading a preprocessed cache): it must
    give the same tensors.

    Inside an initialised ``torch.distributed`` process group each process embeds every ``world_size``-th
    planned batch and the rows are gathered: every process returns all N rows, equal to one process's.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    dataset = images if images is not None else ImageListDataset(paths, image_size, bboxes=bboxes)
    n = len(paths)
    if len(dataset) != n:
        raise ValueError(f"the image dataset has {len(dataset)} items for {n} paths")
    embedding_dim = int(getattr(model, "embedding_dim", 0) or 0)
    if n == 0:
        return torch.empty(0, embedding_dim)
    plan, _ = plan_extraction(
        paths, image_size, batch_size, bboxes=bboxes, batching=batching, aspect_tolerance=aspect_tolerance
    )
    rank, world = rank_and_world()
    out: torch.Tensor | None = torch.zeros(n, embedding_dim) if embedding_dim else None
    held = torch.zeros(n, dtype=torch.bool)
    was_training = model.training
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        stream = embed_planned(
            model,
            dataset,
            shard(plan, rank, world),
            scales=scales,
            num_workers=num_workers,
            device=device,
            precision=precision,
            channels_last=channels_last,
            progress=progress and rank == 0,
        )
        for rows, vectors, errors in gathered(stream, n, embedding_dim):
            if vectors is None:  # alone: at the first bad image; in a group: every process, together
                raise DataError(errors[0])
            if out is None:
                out = torch.zeros(n, vectors.shape[1])
            out[rows] = vectors
            held[rows] = True
    finally:
        model.train(was_training)
    if out is None or not bool(held.all()):
        raise RuntimeError(f"rows {torch.nonzero(~held).flatten()[:5].tolist()} were embedded by no process")
    return out


def gathered(
    stream: Iterator[tuple[list[int], torch.Tensor | None, list[str]]], n: int, dim: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list[str]]]:
    """``stream`` (of :func:`embed_planned`, over this process's share of ``n`` images) as is when alone; in a
    process group, this process's share is run first, then every process's results are yielded: all failures
    (the same on every process, so that all raise or skip together), then all rows (``dim`` wide)."""
    if rank_and_world()[1] == 1:
        yield from stream
        return
    positions: list[int] = []
    parts: list[torch.Tensor] = []
    failures: list[tuple[int, str]] = []
    for rows, vectors, info in stream:
        if vectors is None:
            failures += zip(rows, info, strict=True)
        else:
            positions += rows
            parts.append(vectors)
    failures = all_failures(failures)
    local = torch.cat(parts) if parts else torch.empty(0, dim)
    rows_all, held = gather_rows(torch.tensor(positions, dtype=torch.long), local, n)
    if failures:
        yield [i for i, _ in failures], None, [m for _, m in failures]
    done = torch.nonzero(held).flatten()
    if len(done):
        yield done.tolist(), rows_all[done], []


def extract_benchmark(
    model: nn.Module,
    benchmark: Benchmark,
    image_size: int | None,
    *,
    scales: Sequence[float] = (1.0,),
    cache: ImageCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(database n_db x D, queries n_q x D)`` embeddings; queries are cropped to their boxes.

    ``cache``: an evaluation :class:`~oxford_ir.data.cache.ImageCache` at ``image_size`` holding the database
    images and the cropped queries (:func:`benchmark_cache`): the same tensors, read instead of decoded.
    """
    db_images = queries_images = None
    if cache is not None:
        db_images = ImageListDataset(benchmark.db_paths, image_size, cache=cache)
        queries_images = ImageListDataset(benchmark.query_paths, image_size, bboxes=benchmark.query_bboxes, cache=cache)
    db = extract_embeddings(model, benchmark.db_paths, image_size, scales=scales, images=db_images, **kwargs)
    queries = extract_embeddings(
        model,
        benchmark.query_paths,
        image_size,
        bboxes=benchmark.query_bboxes,
        scales=scales,
        images=queries_images,
        **kwargs,
    )
    return db, queries


def benchmark_cache(
    benchmark: Benchmark, image_size: int | None, cache_dir: str | Path, *, num_workers: int = 0, progress: bool = True
) -> ImageCache:
    """The evaluation image cache of ``benchmark`` at ``image_size`` under ``cache_dir`` (the folder the
    datamodule uses too), built or updated by the first process of a group and opened by all."""
    paths = [*benchmark.db_paths, *benchmark.query_paths]
    boxes = [None] * benchmark.n_db + list(benchmark.query_bboxes)
    folder = cache_folder(cache_dir, "eval", benchmark_spec(benchmark.name).folder, image_size)

    def build() -> ImageCache:
        return build_image_cache(
            folder, paths, boxes=boxes, kind="eval", long_side=image_size, num_workers=num_workers, progress=progress
        )

    rank, world = rank_and_world()
    cache = build() if rank == 0 else None
    barrier()
    return cache if cache is not None else build()  # fresh by now: opened without writing
