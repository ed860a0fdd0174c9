"""Training images/s: our pipeline, its pure-compute ceiling, and the original project's method.

- ``ours``: ``conf/train.yaml`` composed with the profile's overrides; the real ``RetrievalDataModule`` (class
  balanced P x K (+ distractors) batches decoded from the JPEG files by DataLoader workers, with whatever
  cache / decode / pinning switches the config has; colour jitter and normalisation of whole batches on the
  device, the next batches prepared on a side CUDA stream while a step runs) and ``RetrievalModule`` (one
  forward pass per batch, online mining, triplet loss), fitted by a Lightning ``Trainer`` built from
  ``cfg.trainer`` without validation, checkpoints or logger. Timed between the ends of the warm-up step and of
  the last step, so worker start-up, cache building and compilation are left out and waiting for data is
  counted.
- ``ceiling``: the same module (``compute_loss``: model, miner, loss), optimizer step and autocast, on one
  random batch of the same shape and labels already on the device: no data loading, no Lightning loop.
- ``original``: :mod:`experiments.bench.original` on the same training images and the same network (same
  precision and memory format as ours): random triplets opened per item with PIL, three forward passes per
  batch, ``TripletMarginLoss``; ``batch_size // 3`` triplets per step, so a step passes as many images
  through the network as ours does. Every image counts (3 per triplet).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import hydra
import lightning.pytorch as pl
import numpy as np
import torch

from experiments.bench import common
from experiments.bench.original import train_triplets, triplet_loader


class StepTimer(pl.Callback):
    """Wall time at the end of every training step (after the device finished it)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self.times: list[float] = []
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.times.append(common.now(module.device))
        self.sizes.append(self.batch_size)  # the loader drops incomplete batches


def throughput(times: list[float], sizes: list[int], warmup: int) -> dict[str, Any]:
    """Images/s over the steps after ``warmup``: images of steps warmup+1..n over the time since step warmup."""
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} steps ran; the benchmark needs more than the {warmup} warm-up steps")
    elapsed = times[-1] - times[warmup - 1] if warmup else times[-1] - times[0]
    images = sum(sizes[warmup:]) if warmup else sum(sizes[1:])
    steps = np.diff(times[max(warmup - 1, 0) :])
    return {
        "value": images / elapsed,
        "images": images,
        "seconds": elapsed,
        "steps": len(steps),
        "median_step_s": float(statistics.median(steps)),
        "step_seconds": [round(float(t), 4) for t in steps],
        "warmup_steps": warmup,
    }


def measure_ours(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    warmup, steps = int(settings["warmup_steps"]), int(settings["steps"])
    datamodule = hydra.utils.instantiate(cfg.data)
    module = common.instantiate_module(cfg)
    timer = StepTimer(datamodule.batch_size)
    with common.quiet_lightning():
        trainer: pl.Trainer = hydra.utils.instantiate(
            cfg.trainer,
            callbacks=[timer],
            logger=False,
            max_epochs=1,
            max_steps=warmup + steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
    result = throughput(timer.times, timer.sizes, warmup)
    result.update(
        batch_size=int(datamodule.batch_size),
        fit_seconds=time.perf_counter() - start,
        precision=str(cfg.trainer.precision),
        num_workers=int(cfg.data.num_workers),
        training_images=len(datamodule.train_split),
        overrides=[o for o in settings["overrides"] if not o.startswith(("paths.", "data.synthetic."))],
    )
    return result


def _batch_labels(classes: int, per_class: int, distractors: int) -> torch.Tensor:
    """Labels of a P x K (+ D distractors, one label each) batch, as the sampler lays them out."""
    landmarks = torch.arange(classes).repeat_interleave(per_class)
    return torch.cat([landmarks, classes + torch.arange(distractors)])


def measure_ceiling(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    torch.manual_seed(int(cfg.seed))
    device = torch.device(settings["device"])
    precision = str(cfg.trainer.precision)
    fmt = common.memory_format(bool(settings["channels_last"]))
    module = common.instantiate_module(cfg).to(device).to(memory_format=fmt).train()
    optimizer = module.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    labels = _batch_labels(cfg.data.classes_per_batch, cfg.data.images_per_class, cfg.data.distractors_per_batch)
    size = int(cfg.data.image_size)
    images = torch.randn(len(labels), 3, size, size, device=device).contiguous(memory_format=fmt)
    labels = labels.to(device)
    warmup, steps = int(settings["warmup_steps"]), int(settings["steps"])
    times: list[float] = []
    for _ in range(warmup + steps):
        with common.autocast(device, precision):
            loss, _ = module.compute_loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(common.now(device))
    result = throughput(times, [len(labels)] * len(times), warmup)
    result.update(batch_size=len(labels), precision=precision, channels_last=bool(settings["channels_last"]))
    return result


def measure_original(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    torch.manual_seed(int(cfg.seed))
    device = torch.device(settings["device"])
    precision = str(cfg.trainer.precision)
    channels_last = bool(settings["channels_last"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    split = datamodule.train_split
    model = common.instantiate_module(cfg).embedder.to(device).to(memory_format=common.memory_format(channels_last))
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model.parameters())
    triplets = max(1, int(datamodule.batch_size) // 3)
    warmup, steps = int(settings["warmup_steps"]), int(settings["steps"])
    workers = int(cfg.data.num_workers)
    loader = triplet_loader(
        split,
        int(cfg.data.image_size),
        int(datamodule.batch_size),
        warmup + steps,
        seed=int(cfg.seed),
        num_workers=workers,
        device=device,
    )
    times: list[float] = []
    sizes: list[int] = []

    def on_step(step: int, images: int) -> None:
        times.append(common.now(device))
        sizes.append(images)

    train_triplets(
        model,
        loader,
        optimizer,
        margin=float(cfg.loss.margin),
        device=device,
        autocast=functools.partial(common.autocast, device, precision),
        channels_last=channels_last,
        on_step=on_step,
    )
    result = throughput(times, sizes, warmup)
    result.update(
        triplets_per_batch=triplets,
        images_per_step=3 * triplets,
        forward_passes_per_step=3,
        precision=precision,
        num_workers=workers,
        margin=float(cfg.loss.margin),
    )
    return result
