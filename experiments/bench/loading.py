"""Data loading images/s: the training input pipeline alone (no network), on full-size (1024 px) JPEGs.

The issue's claim is that decoding full-size JPEGs, not the network, is what starves a GPU; the training
row of the CPU profile uses small images, where the network dominates. Here batches are drawn from a
DataLoader and thrown away: what is timed is what the pipeline can deliver, whatever consumes it.

- ``ours``: the real ``RetrievalDataModule.train_dataloader(device)`` (class-balanced P x K + distractors; the
  workers crop, resize and flip each image with PIL, the device jitters and normalises the whole batch) with
  ``data.cache.enabled=true``: ``prepare_data`` builds the image cache first, timed apart
  (``cache_build_seconds``), then batches come from the cache's raw pixels. On CUDA the loader prepares the
  next batches on a side stream in a background thread (:mod:`oxford_ir.data.prefetch`), as in training; on
  the CPU the workers finish their batches.
- ``no_cache``: the same loader with the cache off: every draw decodes its JPEG with PIL in a worker (in
  draft mode when the JPEG is at least twice the training long side).
- ``no_jitter``: ``ours`` without colour jitter (crop, resize, flip): the same per-image work as the original,
  which does not augment, so that the comparison is of pipelines, not of augmentations.
- ``gpu_decode`` (CUDA only): ``data.decode=gpu``: workers only read the files; each batch is decoded and
  augmented on the device (one ``decode_jpeg`` call, batched crop, resize, flip and jitter), prefetched the
  same way.
- ``original``: :class:`~experiments.bench.original.RandomTripletDataset` (every image of a triplet opened,
  decoded and resized with PIL per item, no augmentation) through a DataLoader with the same workers,
  ``batch_size // 3`` triplets per batch, 3 images per triplet counted.

Every batch is handed over by ``datamodule.on_after_batch_transfer`` (as Lightning does before a step) and the
device synchronised before its arrival time is taken. Each is timed from the arrival of batch
``warmup_batches`` (workers started, first round of batches in) to that of the last, over ``batches``
batches; with as many warm-up batches as workers and a multiple of the workers timed, whole rounds of the
workers are measured.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import hydra
import torch

from experiments.bench import common
from experiments.bench.original import triplet_loader
from experiments.bench.training import throughput


def time_batches(
    batches: Iterable[Any],
    count: Callable[[Any], int],
    warmup: int,
    limit: int,
    device: torch.device,
    handle: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Images/s of the first ``limit`` batches of ``batches`` after ``warmup`` of them (see ``throughput``).

    ``handle(batch)`` (if any) runs on each batch before its arrival time is taken, after the device has
    finished; ``count(batch)`` is its number of images.
    """
    times: list[float] = []
    sizes: list[int] = []
    for batch in batches:
        if handle is not None:
            batch = handle(batch)
        times.append(common.now(device))
        sizes.append(count(batch))
        if len(times) == limit:
            break
    result = throughput(times, sizes, warmup)
    result["batches"] = len(times)
    return result


def _datamodule(settings: dict[str, Any]) -> tuple[Any, Any]:
    """The composed config and its ``RetrievalDataModule`` (batches and crops are seeded by ``data.seed``)."""
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    return cfg, hydra.utils.instantiate(cfg.data)


def _mean_kib(paths: Iterable[str | Path]) -> float:
    """Mean file size in KiB: what a JPEG costs to decode grows with it (photos are larger than synthetic ones)."""
    sizes = [Path(p).stat().st_size for p in paths]
    return sum(sizes) / 1024 / max(1, len(sizes))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure_loader(settings: dict[str, Any], *, decode_on_device: bool = False) -> dict[str, Any]:
    """Images/s of ``train_dataloader(settings["device"])`` of the composed config, after ``prepare_data`` (which
    builds the cache when it is on, timed as ``prepare_seconds``). Every batch goes through
    ``on_after_batch_transfer`` on the device, which finishes it (jitter, normalisation; decoding with
    ``data.decode=gpu``, on a CPU the same code runs there); ``decode_on_device`` says that the config decodes
    on the device (``data.decode=gpu``), recorded with the row."""
    common.set_threads(settings)
    device = torch.device(settings["device"])
    cfg, datamodule = _datamodule(settings)
    start = time.perf_counter()
    datamodule.prepare_data()  # with the cache on: builds it (training and evaluation images)
    datamodule.setup("fit")
    prepare = time.perf_counter() - start
    loader = datamodule.train_dataloader(device)
    warmup, batches = int(settings["warmup_batches"]), int(settings["batches"])

    def finish(batch: Any) -> Any:
        if hasattr(batch, "to"):  # raw batches; a ReadyBatch stays where it was prepared
            batch = batch.to(device, non_blocking=True)
        return datamodule.on_after_batch_transfer(batch, 0)

    shapes: set[tuple[int, ...]] = set()

    def count(batch: Any) -> int:
        shapes.add(tuple(batch[0].shape))
        return len(batch[1])

    result = time_batches(loader, count, warmup, warmup + batches, device, finish)
    pin_memory, persistent = bool(loader.pin_memory), bool(loader.persistent_workers)
    prefetching = bool(getattr(loader, "prefetches", False))
    if hasattr(loader, "close"):
        loader.close()
    del loader  # with the iterator persistent workers keep in it: the workers exit and are joined now,
    gc.collect()  # so that their peak memory is among the finished children's when the measurement returns
    cached = bool(cfg.data.cache.enabled)
    result.update(
        batch_size=int(datamodule.batch_size),
        image_size=int(cfg.data.image_size),
        train_long_side=int(datamodule.train_long_side),
        num_workers=int(cfg.data.num_workers),
        training_images=len(datamodule.train_split),
        jpeg_kib_mean=_mean_kib(datamodule.train_split.paths),
        cache=cached,
        decode=str(cfg.data.get("decode", "cpu")),
        pin_memory=pin_memory,
        persistent_workers=persistent,
        prefetch=prefetching,
        decode_on_device=bool(decode_on_device),
        batch_finished=(
            f"on {device}, prefetched on a side stream"
            if prefetching
            else ("in the workers" if device.type == "cpu" and not decode_on_device else f"on {device}")
        ),
        prepare_seconds=prepare,
        batch_shapes=sorted(shapes),
    )
    if cached:
        folder = datamodule.cache_folder("train", str(cfg.data.benchmark))
        result.update(cache_build_seconds=prepare, train_cache_bytes=_folder_bytes(folder))
    return result


def measure_ours(settings: dict[str, Any]) -> dict[str, Any]:
    """With the profile's knobs (the image cache among them): build the cache, then time the loader."""
    return measure_loader(settings)


def measure_no_cache(settings: dict[str, Any]) -> dict[str, Any]:
    """The same loader without the cache: PIL decodes in the workers."""
    return measure_loader(settings)


def measure_no_jitter(settings: dict[str, Any]) -> dict[str, Any]:
    """The loader without colour jitter (its settings say so): the original's per-image work, from our pipeline."""
    return measure_loader(settings)


def measure_gpu_decode(settings: dict[str, Any]) -> dict[str, Any]:
    """``data.decode=gpu``: workers read bytes; decoding and augmentation of whole batches on the device."""
    if torch.device(settings["device"]).type != "cuda":
        raise common.Skipped("data.decode=gpu decodes on a CUDA device (this run has none)")
    return measure_loader(settings, decode_on_device=True)


def measure_original(settings: dict[str, Any]) -> dict[str, Any]:
    """Random triplets opened and resized with PIL per item, through a DataLoader with the same workers."""
    common.set_threads(settings)
    device = torch.device(settings["device"])
    cfg, datamodule = _datamodule(settings)
    datamodule.prepare_data()
    datamodule.setup("fit")
    split = datamodule.train_split
    triplets = max(1, int(datamodule.batch_size) // 3)
    warmup, batches = int(settings["warmup_batches"]), int(settings["batches"])
    workers = int(cfg.data.num_workers)
    loader = triplet_loader(
        split,
        int(cfg.data.image_size),
        int(datamodule.batch_size),
        warmup + batches,
        seed=int(cfg.seed),
        num_workers=workers,
        device=device,
    )
    shapes: set[tuple[int, ...]] = set()

    def count(batch: Any) -> int:
        shapes.update(tuple(images.shape) for images in batch)
        return sum(len(images) for images in batch)  # anchors, positives, negatives

    result = time_batches(loader, count, warmup, warmup + batches, device)
    del loader  # with the iterator persistent workers keep in it: the workers exit and are joined now,
    gc.collect()  # so that their peak memory is among the finished children's when the measurement returns
    result.update(
        triplets_per_batch=triplets,
        images_per_batch=3 * triplets,
        batch_shapes=sorted(shapes),
        image_size=int(cfg.data.image_size),
        num_workers=workers,
        training_images=len(split),
    )
    return result
