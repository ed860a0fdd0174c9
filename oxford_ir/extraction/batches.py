"""Planned batches turned into network inputs: decoded by DataLoader workers, or by the GPU.

A :class:`~oxford_ir.extraction.planning.PlannedBatch` becomes one or more :class:`ImageBatch` (normally one:
the plan predicted the sizes): the images preprocessed by the one test-time function
(:func:`~oxford_ir.data.datasets.eval_image` on the CPU, or its device counterpart
:meth:`~oxford_ir.data.gpu_decode.GpuEvalDecoder.preprocess`), then padded to the batch's bucket (bucket
mode), resized to its shape (aspect mode) or stacked as they are (shape mode), with each image's own size.

Two ways to decode:

- :class:`PlannedBatches`: DataLoader workers decode, crop, resize and stack whole batches; the main process
  only runs the network.
- :class:`EncodedPlannedBatches` (``decode="gpu"``): workers only read the file bytes; :func:`decode_on_device`
  decodes the batch with one ``torchvision.io.decode_jpeg(..., device="cuda")`` call and finishes it there
  (non-JPEG and undecodable files fall back to PIL in the worker, as in training). Pixels differ slightly from
  the CPU path (nvJPEG's IDCT, antialiased bicubic instead of Lanczos): report publication numbers from the CPU.

An image that cannot be decoded is a ``(index, message)`` failure beside the batches, never an exception in a
worker: the caller raises it (evaluation) or skips and reports the file (the index). Anything else that goes wrong
in a worker, including handing the batch over through shared memory, comes back as a
:class:`~oxford_ir.fs.WorkerFault` naming the worker and the batch (:func:`~oxford_ir.fs.worker_call`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from oxford_ir.data.gpu_decode import EncodedBatch, EncodedEvalDataset, GpuEvalDecoder, collate_encoded
from oxford_ir.errors import DataError
from oxford_ir.extraction.planning import PlannedBatch
from oxford_ir.fs import worker_call

#: ``(image index, message)`` of an image that could not be decoded
Failure = tuple[int, str]
#: what a user can do when a DataLoader worker of the extraction fails
WORKER_HINT = "rerun with fewer workers (extraction.num_workers), or 0 to read the images in the main process"
#: image names shown per batch in a message
_SHOWN = 3


class ImageBatch(NamedTuple):
    """One forward pass: ``images`` (B x 3 x H x W, normalised; zeros where padded), each image's own
    ``sizes`` (B x 2: height, width at the top left), and its ``indices`` in the image list. Sizes and indices
    stay on the CPU where the images go to a GPU: the host reads them without waiting for the device."""

    images: torch.Tensor
    sizes: torch.Tensor
    indices: torch.Tensor
    #: whether any image is smaller than the batch shape (the network must then pool over ``sizes``)
    padded: bool


class EncodedPlannedBatch(NamedTuple):
    """A planned batch as workers send it for decoding on the device (``batch`` None: every image failed)."""

    batch: EncodedBatch | None
    pad_to: tuple[int, int] | None
    resize_to: tuple[int, int] | None
    failures: list[Failure]


def assemble(items: Sequence[tuple[int, torch.Tensor]], planned: PlannedBatch) -> list[ImageBatch]:
    """Preprocessed ``(index, 3 x h x w tensor)`` pairs -> the batches of ``planned``.

    Bucket batches pad every image into ``pad_to`` (an image that does not fit, because its header lied, gets
    a batch of its own shape); aspect batches resize to ``resize_to`` (bilinear, antialiased); exact batches
    stack equal shapes. Works on any device.
    """
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for index, tensor in items:
        shape = (int(tensor.shape[-2]), int(tensor.shape[-1]))
        if planned.resize_to is not None and shape != planned.resize_to:
            tensor = F.interpolate(
                tensor.unsqueeze(0), size=planned.resize_to, mode="bilinear", align_corners=False, antialias=True
            ).squeeze(0)
            shape = planned.resize_to
        target = planned.pad_to
        fits = target is not None and shape[0] <= target[0] and shape[1] <= target[1]
        groups.setdefault(target if fits else shape, []).append((index, tensor))
    out = []
    for (height, width), members in groups.items():
        images = members[0][1].new_zeros(len(members), 3, height, width)
        sizes = torch.empty(len(members), 2, dtype=torch.long)
        for row, (_, tensor) in enumerate(members):
            h, w = tensor.shape[-2:]
            images[row, :, :h, :w] = tensor
            sizes[row, 0], sizes[row, 1] = h, w
        padded = bool((sizes[:, 0] < height).any() or (sizes[:, 1] < width).any())
        indices = torch.tensor([i for i, _ in members], dtype=torch.long)
        out.append(ImageBatch(images, sizes, indices, padded))
    return out


class PlannedBatches(Dataset):
    """Item k: ``(batches, failures)`` of planned batch k, decoded and assembled by a DataLoader worker.

    ``images[i]`` must return ``(3 x H x W tensor, ...)`` (an :class:`~oxford_ir.data.datasets.ImageListDataset`,
    possibly reading the image cache) and raise :class:`DataError` for an image it cannot read.
    """

    def __init__(self, images: Dataset, batches: Sequence[PlannedBatch]) -> None:
        self.images = images
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[list[ImageBatch], list[Failure]]:
        return worker_call(lambda: self.describe(k), lambda: self._batch(k), WORKER_HINT, share=True)

    def _batch(self, k: int) -> tuple[list[ImageBatch], list[Failure]]:
        planned = self.batches[k]
        items, failures = [], []
        for i in planned.indices:
            try:
                items.append((i, self.images[i][0]))
            except DataError as error:
                failures.append((i, str(error)))
        return (assemble(items, planned) if items else []), failures

    def describe(self, k: int) -> str:
        """Batch ``k`` and its first images, for messages."""
        return describe_batch(self.images, self.batches, k)


class EncodedPlannedBatches(Dataset):
    """Item k: planned batch k as an :class:`EncodedPlannedBatch` for :func:`decode_on_device`: JPEG bytes, or
    pixels PIL decoded in the worker for files the device decoder cannot be trusted with (``images`` is an
    :class:`~oxford_ir.data.gpu_decode.EncodedEvalDataset`)."""

    def __init__(self, images: EncodedEvalDataset, batches: Sequence[PlannedBatch]) -> None:
        self.images = images
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> EncodedPlannedBatch:
        return worker_call(lambda: self.describe(k), lambda: self._batch(k), WORKER_HINT, share=True)

    def describe(self, k: int) -> str:
        """Batch ``k`` and its first images, for messages."""
        return describe_batch(self.images, self.batches, k)

    def _batch(self, k: int) -> EncodedPlannedBatch:
        planned = self.batches[k]
        items, failures = [], []
        for i in planned.indices:
            try:
                items.append(self.images[i])
            except DataError as error:
                failures.append((i, str(error)))
        batch = collate_encoded(items) if items else None
        return EncodedPlannedBatch(batch, planned.pad_to, planned.resize_to, failures)


def describe_batch(images: Dataset, batches: Sequence[PlannedBatch], k: int) -> str:
    """``batch k of n (first image, second image, ... and m more)``: the files a worker was reading."""
    indices = list(batches[k].indices) if 0 <= k < len(batches) else []
    names = [image_name(images, i) for i in indices[:_SHOWN]]
    more = f" and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else ""
    return f"batch {k + 1} of {len(batches)} ({', '.join(names)}{more})"


def image_name(images: Dataset, i: int) -> str:
    """The file (or label) of image ``i`` of a test-time dataset, for messages."""
    labels = getattr(images, "labels", None)
    if labels is not None:
        return str(labels[i])
    paths = getattr(images, "paths", None)
    if paths is None:
        return f"image {i}"
    path = paths[i]
    return str(path) if isinstance(path, str | Path) else f"image {i}"


def decode_on_device(item: EncodedPlannedBatch, decoder: GpuEvalDecoder) -> tuple[list[ImageBatch], list[Failure]]:
    """Decode an :class:`EncodedPlannedBatch` on its device (``item.batch.to(device)`` first) and assemble it.

    All JPEGs of the batch go to one ``decode_jpeg`` call (``decoder``); if a file breaks it, the images are
    decoded one by one and the broken ones become failures (the message of PIL's attempt, naming the file).
    """
    batch = item.batch
    failures = list(item.failures)
    if batch is None:
        return [], failures
    indices = batch.indices.tolist()
    try:
        images, _ = decoder(batch)
        items = list(zip(indices, images, strict=True))
    except DataError:
        items = []
        for row, index in enumerate(indices):
            try:
                (image,), _ = decoder(_one(batch, row))
                items.append((index, image))
            except DataError as error:
                failures.append((index, str(error)))
    # the loader's collation turns tuples into lists
    resize_to = None if item.resize_to is None else (int(item.resize_to[0]), int(item.resize_to[1]))
    pad_to = None if item.pad_to is None else (int(item.pad_to[0]), int(item.pad_to[1]))
    planned = PlannedBatch(tuple(i for i, _ in items), resize_to=resize_to, pad_to=pad_to)
    return (assemble(items, planned) if items else []), failures


def _one(batch: EncodedBatch, row: int) -> EncodedBatch:
    return EncodedBatch(
        data=[batch.data[row]],
        decoded=[batch.decoded[row]],
        orientations=[batch.orientations[row]],
        paths=[batch.paths[row]],
        indices=batch.indices[row : row + 1],
        bboxes=None if batch.bboxes is None else [batch.bboxes[row]],
    )
