"""Embedding image lists: planned batches, single- or multi-scale, in the order of the images.

Preprocessing follows cnnimageretrieval-pytorch (long side downscaled to ``image_size``, queries cropped to
their boxes at full-image scale) through the one test-time function
(:func:`~oxford_ir.data.datasets.eval_image`). The batches are planned from the image headers before decoding
(:mod:`oxford_ir.extraction.planning`): by default every image is padded to one of at most ``max_shapes``
bucket shapes and pooled over its own feature cells, so the network sees a small, fixed set of input shapes.
DataLoader workers decode and stack whole batches, or only read the bytes for the GPU to decode
(``decode="gpu"``, the default on CUDA with ``decode="auto"``); the main process runs the network while the
next batch is moved (and decoded) on a side CUDA stream, and reads results back one batch late, so that the
GPU never waits for the host. Under a process group (torchrun, or
:func:`oxford_ir.extraction.distributed.init_from_environment`) every process embeds its share of the batches
and all processes receive every row, bit-identical to a single process.

The same per-batch function, :func:`embed_image_batch`, embeds validation batches during training
(:func:`embed_loader_item`); a benchmark's database and queries are planned together in
:mod:`oxford_ir.extraction.benchmark`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from oxford_ir.data.datasets import ImageListDataset, rescale
from oxford_ir.data.gpu_decode import EncodedEvalDataset, GpuEvalDecoder
from oxford_ir.errors import ConfigError, DataError, ResourceError
from oxford_ir.extraction.batches import (
    WORKER_HINT,
    EncodedPlannedBatch,
    EncodedPlannedBatches,
    Failure,
    ImageBatch,
    PlannedBatches,
    decode_on_device,
)
from oxford_ir.extraction.buckets import MAX_SHAPES
from oxford_ir.extraction.distributed import all_failures, gather_rows, rank_and_world
from oxford_ir.extraction.planning import ExtractionPlan, plan_extraction, shard
from oxford_ir.extraction.whitening import Whitened
from oxford_ir.fs import WORKER_TIMEOUT, WorkerFault, WorkerTraceback, worker_items

#: ``precision=`` values: float32, or bfloat16 autocast (Ampere GPUs and newer; CPUs with AVX512-BF16)
PRECISIONS = ("32", "bf16")
#: ``decode=`` values: PIL in DataLoader workers, torchvision's decode_jpeg on the device, or gpu on CUDA
DECODES = ("cpu", "gpu", "auto")

ImageSource = str | Path | Image.Image


def embed_batch(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    *,
    channels_last: bool = False,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embeddings of a batch of equally shaped images, combined over ``scales``.

    ``sizes`` (B x 2): each image's own height and width when the batch is padded; the model then pools
    over its own cells only (``model(x, sizes)``). With several scales this is cnnimageretrieval's
    ``extract_ms``: ``v = (mean_s f(x_s) ** p) ** (1 / p)``, then L2-normalised, where ``x_s`` is the batch
    resized bilinearly by ``s`` (a padded image's own size becomes ``floor(size * s)``) and ``p`` is
    ``model.power`` (GeM's p; 1 when absent). A single scale is the network output itself. ``channels_last``
    hands the network NHWC tensors (faster convolutions on GPUs with tensor cores). A
    :class:`~oxford_ir.extraction.whitening.Whitened` model whitens the vector its network gives for all scales
    together (whitened vectors can be negative: they never go through the power).
    """
    if isinstance(model, Whitened):
        return model.whiten(embed_batch(model.network, images, scales, channels_last=channels_last, sizes=sizes))

    def forward(s: float) -> torch.Tensor:
        x = rescale(images, s)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if sizes is None:
            return model(x)
        return model(x, sizes if s == 1.0 else torch.floor(sizes * s).long().clamp_(min=1))

    if len(scales) == 1:
        return forward(float(scales[0]))
    p = float(getattr(model, "power", 1.0))
    total = None
    for s in scales:
        v = forward(float(s)).float().pow(p)
        total = v if total is None else total + v
    return F.normalize((total / len(scales)).pow(1.0 / p), dim=1)


def embed_image_batch(
    model: nn.Module,
    batch: ImageBatch,
    scales: Sequence[float] = (1.0,),
    *,
    channels_last: bool = False,
    fill_to: int | None = None,
) -> torch.Tensor:
    """Embeddings (B x D) of one :class:`~oxford_ir.extraction.batches.ImageBatch` on the model's device.

    ``fill_to``: run the network on at least this many images, blank ones added after the real ones, so that
    every batch of a bucket has one shape (on a GPU a new batch size costs a new cuDNN plan, a second or more;
    a few blank images cost milliseconds). The model must be in eval mode (BatchNorm then treats every image
    alone), so the blank images change nothing.
    """
    images, sizes = batch.images, batch.sizes if batch.padded else None
    n = images.shape[0]
    if fill_to is not None and n < fill_to:
        images = torch.cat([images, images.new_zeros(fill_to - n, *images.shape[1:])])
        if sizes is not None:
            full = torch.tensor([images.shape[-2], images.shape[-1]], device=sizes.device)
            sizes = torch.cat([sizes, full.expand(fill_to - n, 2)])
    return embed_batch(model, images, scales, channels_last=channels_last, sizes=sizes)[:n]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` ("32": none)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"extraction.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def supports_padding(model: nn.Module) -> bool:
    """Whether ``model(images, sizes)`` pools padded images over their own cells (bucket batching)."""
    return bool(getattr(model, "supports_padding", False))


def resolve_decode(decode: str, device: torch.device) -> bool:
    """True when JPEGs are decoded on the device: ``gpu``, or ``auto`` on a CUDA device."""
    if decode not in DECODES:
        raise ConfigError(f"extraction.decode={decode!r}: choose one of {', '.join(DECODES)}")
    return decode == "gpu" or (decode == "auto" and device.type == "cuda")


def plan_for_model(
    model: nn.Module,
    sources: Sequence[ImageSource],
    image_size: int | None,
    batch_size: int,
    *,
    batching: str = "bucket",
    **kwargs: Any,
) -> ExtractionPlan:
    """:func:`~oxford_ir.extraction.planning.plan_extraction`, falling back from ``bucket`` to exact ``shape``
    batches for a model that cannot pool padded images (said in the plan's note)."""
    if batching == "bucket" and not supports_padding(model):
        kwargs.pop("buckets", None)
        plan = plan_extraction(sources, image_size, batch_size, batching="shape", **kwargs)
        note = getattr(model, "padding_note", None) or (
            f"{type(model).__name__} cannot pool over padded images: exact shape batches instead of buckets"
        )
        return ExtractionPlan(plan.batches, plan.sizes, plan.shapes, plan.mode, note=note)
    return plan_extraction(sources, image_size, batch_size, batching=batching, **kwargs)


class _DeviceFeed:
    """Moves (and, for encoded batches, decodes) each loader item on a side CUDA stream, so that the copy and
    the decoding of batch n + 1 overlap the network's work on batch n; on the CPU it is a plain pass-through."""

    def __init__(self, device: torch.device, decoder: GpuEvalDecoder | None) -> None:
        self.device = device
        self.decoder = decoder
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, item: Any) -> tuple[list[ImageBatch], list[Failure]]:
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            if isinstance(item, EncodedPlannedBatch):
                batch = None if item.batch is None else item.batch.to(self.device, non_blocking=True)
                moved = item._replace(batch=batch)
                groups, failures = decode_on_device(moved, self.decoder)
            else:
                groups, failures = item
                groups = [_to(batch, self.device) for batch in groups]
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for batch in groups:  # allocated on the side stream, used on the current one
                batch.images.record_stream(current)
        return groups, failures


def _to(batch: ImageBatch, device: torch.device) -> ImageBatch:
    return batch._replace(images=batch.images.to(device, non_blocking=True))  # sizes and indices stay on the CPU


def embed_planned(
    model: nn.Module,
    images: Dataset,
    batches: Sequence[Any],
    *,
    scales: Sequence[float] = (1.0,),
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    precision: str = "32",
    channels_last: bool = False,
    fill_to: int | None = None,
    decoder: GpuEvalDecoder | None = None,
    progress: bool = False,
    desc: str = "embedding",
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[str]]]:
    """Yield ``(indices, float32 vectors on the CPU, [])`` per forward pass and ``(indices, None, messages)``
    for images that could not be decoded, running ``batches`` in order (the caller shards them).

    ``images`` is a :class:`~oxford_ir.extraction.batches.PlannedBatches` or, for decoding on the device (with
    ``decoder``), an :class:`~oxford_ir.extraction.batches.EncodedPlannedBatches`. The model must already be
    on ``device`` and in eval mode; this runs under ``torch.inference_mode``.

    A DataLoader worker that dies, raises, cannot hand its batch over (shared memory full) or delivers nothing
    for ``worker_timeout`` seconds (None: no limit) raises a one-line
    :class:`~oxford_ir.errors.ResourceError` naming it and its images (:func:`~oxford_ir.fs.worker_items`).
    """
    loader = worker_items(
        images,
        num_workers=num_workers,
        timeout=worker_timeout,
        describe=getattr(images, "describe", lambda k: f"batch {k + 1} of {len(batches)}"),
        hint=WORKER_HINT,
        batch_size=None,  # each item is a whole planned batch
        shuffle=False,
        pin_memory=device.type == "cuda",
    )
    feed = _DeviceFeed(device, decoder)
    total = sum(len(b.indices) for b in batches)
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="img", dynamic_ncols=True)
    # on a GPU, results are read one batch late: the host queues the next batch before waiting for this one
    lag = 1 if device.type == "cuda" else 0
    pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()

    def ready(keep: int) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        while len(pending) > keep:
            rows, vectors = pending.popleft()
            bar.update(len(rows))
            yield rows.tolist(), vectors.float().cpu(), []

    try:
        with torch.inference_mode(), autocast(device, precision):
            for item in loader:
                groups, failures = feed(item)
                if failures:
                    bar.update(len(failures))
                    yield [i for i, _ in failures], None, [m for _, m in failures]
                for batch in groups:
                    vectors = embed_image_batch(model, batch, scales, channels_last=channels_last, fill_to=fill_to)
                    pending.append((batch.indices, vectors))
                yield from ready(lag)
            yield from ready(0)
    except BaseException:
        yield from ready(0)  # what was computed before an interruption still reaches the caller (the index keeps it)
        raise
    finally:
        loader.close()  # an early end stops the workers now, not when the traceback is freed
        bar.close()


def planned_dataset(
    sources: Sequence[ImageSource],
    image_size: int | None,
    batches: Sequence[Any],
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    labels: Sequence[str] | None = None,
    images: Dataset | None = None,
    on_device: bool = False,
) -> Dataset:
    """The dataset of planned ``batches`` of ``sources``, one item a batch: decoded by DataLoader workers
    (``images``, default an ``ImageListDataset``), or with ``on_device`` only read, for the device to decode
    (:func:`~oxford_ir.extraction.batches.decode_on_device` with a ``GpuEvalDecoder(image_size)``)."""
    if on_device:
        return EncodedPlannedBatches(EncodedEvalDataset(sources, bboxes, labels), batches)
    source = images if images is not None else ImageListDataset(sources, image_size, bboxes=bboxes, labels=labels)
    return PlannedBatches(source, batches)


def embed_shard(
    model: nn.Module,
    sources: Sequence[ImageSource],
    image_size: int | None,
    plan: ExtractionPlan,
    batches: Sequence[Any],
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    labels: Sequence[str] | None = None,
    images: Dataset | None = None,
    on_device: bool = False,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    precision: str = "32",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "embedding",
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[str]]]:
    """:func:`embed_planned` over ``batches`` (this process's share of ``plan``) of ``sources``: workers decode
    them (``images``, default an ``ImageListDataset``), or only read their bytes for the device to decode
    (``on_device``); on CUDA, bucket batches are filled up to ``batch_size``."""
    dataset = planned_dataset(
        sources, image_size, batches, bboxes=bboxes, labels=labels, images=images, on_device=on_device
    )
    decoder = GpuEvalDecoder(image_size) if on_device else None
    return embed_planned(
        model,
        dataset,
        batches,
        scales=scales,
        num_workers=num_workers,
        device=device,
        precision=precision,
        channels_last=channels_last,
        fill_to=batch_size if plan.mode == "bucket" and device.type == "cuda" else None,
        decoder=decoder,
        progress=progress,
        desc=desc,
        worker_timeout=worker_timeout,
    )


def extract_embeddings(
    model: nn.Module,
    paths: Sequence[ImageSource],
    image_size: int | None,
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    scales: Sequence[float] = (1.0,),
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    buckets: Sequence[tuple[int, int]] | None = None,
    aspect_tolerance: float = 0.1,
    precision: str = "32",
    channels_last: bool = False,
    decode: str = "cpu",
    images: Dataset | None = None,
    labels: Sequence[str] | None = None,
    plan: ExtractionPlan | None = None,
    worker_timeout: float | None = WORKER_TIMEOUT,
) -> torch.Tensor:
    """N x D float32 L2-normalised embeddings of ``paths`` (row i is ``paths[i]``), on the CPU.

    ``paths`` are files or decoded PIL images (uploads, named by ``labels`` in messages); ``bboxes[i]`` (or
    None) crops image i, as queries are. ``batching``, ``max_shapes``, ``buckets``, ``aspect_tolerance``: see
    :mod:`~oxford_ir.extraction.planning` (or pass a ready ``plan``). The model is moved to ``device`` and run
    in eval mode under ``torch.inference_mode`` (``precision="bf16"``: bfloat16 autocast; ``channels_last``:
    NHWC inputs); its training mode is restored afterwards. ``decode``: ``cpu`` (PIL in DataLoader workers),
    ``gpu`` (workers read bytes; torchvision decodes on ``device``) or ``auto`` (gpu on CUDA). An image that
    cannot be read raises the :class:`~oxford_ir.errors.DataError` naming the file. ``images`` replaces the
    default ``ImageListDataset(paths, image_size, bboxes=bboxes)`` (e.g. one reading a preprocessed cache): it
    must give the same tensors. A DataLoader worker that fails or delivers nothing for ``worker_timeout``
    seconds raises a one-line :class:`~oxford_ir.errors.ResourceError` naming it and its images.

    Inside an initialised ``torch.distributed`` process group each process embeds every ``world_size``-th
    planned batch and the rows are gathered: every process returns all N rows, equal to one process's.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    on_device = resolve_decode(decode, device) and images is None
    n = len(paths)
    embedding_dim = int(getattr(model, "embedding_dim", 0) or 0)
    if n == 0:
        return torch.empty(0, embedding_dim)
    if plan is None:
        plan = plan_for_model(
            model,
            paths,
            image_size,
            batch_size,
            bboxes=bboxes,
            batching=batching,
            max_shapes=max_shapes,
            buckets=buckets,
            aspect_tolerance=aspect_tolerance,
        )
    elif len(plan.shapes) != n:
        raise ValueError(f"the extraction plan covers {len(plan.shapes)} images, not the {n} given")
    if images is not None and len(images) != n:
        raise ValueError(f"the image dataset has {len(images)} items for {n} paths")
    rank, world = rank_and_world()
    out: torch.Tensor | None = torch.zeros(n, embedding_dim) if embedding_dim else None
    held = torch.zeros(n, dtype=torch.bool)
    was_training = model.training
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    try:
        stream = embed_shard(
            model,
            paths,
            image_size,
            plan,
            shard(plan.batches, rank, world),
            bboxes=bboxes,
            labels=labels,
            images=images,
            on_device=on_device,
            scales=scales,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            channels_last=channels_last,
            progress=progress and rank == 0,
            worker_timeout=worker_timeout,
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


def embed_loader_item(
    model: nn.Module,
    item: Any,
    scales: Sequence[float] = (1.0,),
    *,
    channels_last: bool = False,
    fill_to: int | None = None,
    decoder: GpuEvalDecoder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, embeddings)`` of one item of a :func:`~oxford_ir.extraction.benchmark.benchmark_loaders`
    loader already on the model's device (encoded items are decoded there by ``decoder``); an image that could
    not be read raises its DataError."""
    if isinstance(item, WorkerFault):
        raise ResourceError(item.message) from WorkerTraceback(item.traceback)
    if isinstance(item, EncodedPlannedBatch):
        if decoder is None:
            raise ValueError("an encoded batch needs a decoder (GpuEvalDecoder) to be decoded on the device")
        groups, failures = decode_on_device(item, decoder)
    else:
        groups, failures = item
    if failures:
        raise DataError(failures[0][1])
    indices, vectors = [], []
    for batch in groups:
        indices.append(batch.indices.long())
        vectors.append(embed_image_batch(model, batch, scales, channels_last=channels_last, fill_to=fill_to))
    if not vectors:
        dim = int(getattr(model, "embedding_dim", 0) or 0)
        return torch.empty(0, dtype=torch.long), torch.empty(0, dim)
    return torch.cat(indices), torch.cat(vectors)
