"""Batching evaluation images, which keep their aspect ratio and so differ in size."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_variable_size(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[(C x H_i x W_i tensor, index), ...]`` -> ``(list of the tensors, LongTensor of the indices)``.

    The default collate would try to stack images of different sizes and fail; padding them would
    change the descriptors (pooling would see the padding). The consumer groups equal sizes itself.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images, indices = [], []
    for position, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"batch item {position} must be an (image tensor, index) pair, got {type(item).__name__}")
        image, index = item
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise TypeError(f"batch item {position}: expected a C x H x W tensor, got {shape}")
        images.append(image)
        indices.append(int(index))
    return images, torch.tensor(indices, dtype=torch.long)
