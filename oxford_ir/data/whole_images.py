"""Whole training images (``data.train_images=whole``): each at its own aspect ratio, as cnnimageretrieval-pytorch
trains.

cirtorch's ``TuplesDataset`` gives every image of a tuple whole, its long side downscaled to ``--image-size``
(``imresize``, the test-time resize) and normalised with the ImageNet mean and std, with no augmentation, and its
training loop runs the network on one image at a time. Here an item is that image, by the one test-time
preprocessing (:func:`~oxford_ir.data.eval_pixels.eval_image`: decode, Lanczos downscale of the long side; then
:func:`~oxford_ir.data.datasets.pixels_to_tensor`). A batch is the list of its images
(:func:`collate_whole_images`), since their shapes differ; :mod:`oxford_ir.models.image_lists` pads it onto one
canvas and pools each image over its own cells (or, where the network cannot, runs each shape separately). With
BatchNorm frozen (``model.freeze_batchnorm``, as cirtorch's ``set_batchnorm_eval``) every image gets the embedding
it has alone.

What ``crop`` (the default) does instead: random resized square crops with the augmentation, one shape a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from oxford_ir.benchmarks.path_array import PathArray
from oxford_ir.data.datasets import pixels_to_tensor
from oxford_ir.data.eval_pixels import eval_image

#: ``data.train_images`` values: augmented square crops, or whole images at their own aspect ratio
TRAIN_IMAGES = ("crop", "whole")


class WholeImageDataset(Dataset):
    """``(normalised 3 x h x w tensor, label)`` of each training image, its long side at most ``image_size``.

    Indexed like :class:`~oxford_ir.data.datasets.TrainImageDataset`: by an index or an ``(index, seed)`` pair of a
    training sampler (the seed is not used: whole images are not augmented).
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int] | np.ndarray, image_size: int) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = PathArray.of(paths)  # compact: no Path object per image
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = int(item[0] if isinstance(item, tuple) else item)
        return pixels_to_tensor(eval_image(self.paths[index], self.image_size)), int(self.labels[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, image_size={self.image_size})"


def collate_whole_images(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch of whole images: ``(list of 3 x h_i x w_i tensors, labels)``, in the sampler's order."""
    return [image for image, _ in items], torch.tensor([label for _, label in items], dtype=torch.int64)
