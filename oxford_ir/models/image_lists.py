"""Embedding a training batch of images of different shapes (``data.train_images=whole``).

Each image must get the embedding it has alone, as cnnimageretrieval-pytorch's loop gives it (one image at a
time, BatchNorm frozen). Two ways, both exact up to the order of floating-point sums:

- **one canvas**: every image zero-padded at the bottom and the right onto one square canvas (the batch's longest
  side: the training ``image_size``, so every full batch has the same input shape, one cuDNN plan on a GPU), run
  once with each image's size, so that the network zeroes the padding before every convolution and pools over the
  image's own cells (:mod:`oxford_ir.models.valid_region`, the extraction path's bucket batching). This needs a
  network that can pool padded images and BatchNorm out of training mode (in training mode the padding would
  enter its batch statistics);
- **one pass per shape**, otherwise: the images of each shape stacked and run together (BatchNorm in training mode
  then takes its statistics from those few images, often one, which is why ``model.freeze_batchnorm`` goes with
  whole images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def can_pad(embedder: nn.Module) -> bool:
    """Whether padded images embed exactly as alone: the network pools over each image's own cells, and no
    BatchNorm layer is in training mode."""
    if not getattr(embedder, "supports_padding", False):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in embedder.modules())


def embed_image_list(
    embedder: nn.Module, images: Sequence[torch.Tensor], forward: Callable[..., torch.Tensor], *, pad: bool
) -> torch.Tensor:
    """N x D embeddings of ``images`` (each 3 x h x w), in their order. ``forward(batch)`` or ``forward(batch,
    sizes)`` runs the network (the module's, in its memory format); ``pad``: one canvas (:func:`can_pad` must
    hold), else one pass per shape."""
    if pad:
        side = max(max(int(image.shape[-2]), int(image.shape[-1])) for image in images)
        canvas = images[0].new_zeros(len(images), images[0].shape[0], side, side)
        sizes = torch.empty(len(images), 2, dtype=torch.long)
        for row, image in enumerate(images):
            canvas[row, :, : image.shape[-2], : image.shape[-1]] = image
            sizes[row, 0], sizes[row, 1] = int(image.shape[-2]), int(image.shape[-1])
        return forward(canvas, sizes)  # sizes on the CPU, as the extraction path passes them
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    rows: list[torch.Tensor | None] = [None] * len(images)
    for members in groups.values():
        for i, row in zip(members, forward(torch.stack([images[i] for i in members])), strict=True):
            rows[i] = row
    return torch.stack(rows)  # type: ignore[arg-type]
