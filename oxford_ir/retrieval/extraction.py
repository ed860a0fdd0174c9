"""Embedding image lists and benchmarks: batched, single- or multi-scale, in the order of the paths.

Preprocessing follows cnnimageretrieval-pytorch (long side downscaled to ``image_size``, queries cropped
to their boxes at full-image scale). Images are decoded one by one (in worker processes when
``num_workers > 0``) and grouped by their resized shape, so each forward pass sees a batch of equally
sized images without padding or extra resizing; results are written back to each image's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from oxford_ir.data.benchmark import Benchmark
from oxford_ir.data.datasets import ImageListDataset, rescale

#: images held back waiting for same-sized companions, in multiples of ``batch_size``
_BUFFERED_BATCHES = 4


def embed_batch(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Embeddings of a batch of equally sized images, combined over ``scales``.

    With several scales this is cnnimageretrieval's ``extract_ms``: ``v = (mean_s f(x_s) ** p) ** (1 / p)``,
    then L2-normalised, where ``x_s`` is the batch resized bilinearly by ``s`` and ``p`` is
    ``model.power`` (GeM's p; 1 when absent). A single scale is the network output itself.
    """
    if len(scales) == 1:
        return model(rescale(images, float(scales[0])))
    p = float(getattr(model, "power", 1.0))
    total = None
    for s in scales:
        v = model(rescale(images, float(s))).pow(p)
        total = v if total is None else total + v
    return F.normalize((total / len(scales)).pow(1.0 / p), dim=1)


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
) -> torch.Tensor:
    """N x D float32 L2-normalised embeddings of ``paths`` (row i is ``paths[i]``), on the CPU.

    ``bboxes[i]`` (or None) crops image i, as queries are. The model is moved to ``device`` and run in
    eval mode under ``torch.inference_mode``; its training mode is restored afterwards. An image that
    cannot be read raises the :class:`~oxford_ir.errors.DataError` of ``load_image``, naming the file.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    dataset = ImageListDataset(paths, image_size, bboxes=bboxes)
    n = len(dataset)
    embedding_dim = getattr(model, "embedding_dim", None)
    if n == 0:
        return torch.empty(0, int(embedding_dim or 0))
    loader = DataLoader(
        dataset,
        batch_size=None,  # one image at a time: sizes differ, batches are formed below by shape
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    out: torch.Tensor | None = None
    buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    held = 0
    limit = batch_size * _BUFFERED_BATCHES

    def flush(shape: tuple[int, int]) -> None:
        nonlocal out, held
        items = buckets.pop(shape)
        held -= len(items)
        batch = torch.stack([t for _, t in items]).to(device, non_blocking=True)
        vectors = embed_batch(model, batch, scales).float().cpu()
        if out is None:
            out = torch.empty(n, vectors.shape[1])
        out[torch.tensor([i for i, _ in items])] = vectors

    was_training = model.training
    model.to(device)
    model.eval()
    try:
        with torch.inference_mode():
            for tensor, index in tqdm(loader, total=n, disable=not progress, desc="embedding", unit="img"):
                shape = (tensor.shape[-2], tensor.shape[-1])
                buckets.setdefault(shape, []).append((int(index), tensor))
                held += 1
                if len(buckets[shape]) >= batch_size:
                    flush(shape)
                elif held >= limit:  # many distinct sizes: run the fullest group rather than hoard images
                    flush(max(buckets, key=lambda s: len(buckets[s])))
            while buckets:
                flush(next(iter(buckets)))
    finally:
        model.train(was_training)
    assert out is not None
    return out.clone()  # a normal tensor: inference tensors refuse later in-place updates and autograd


def extract_benchmark(
    model: nn.Module,
    benchmark: Benchmark,
    image_size: int | None,
    *,
    scales: Sequence[float] = (1.0,),
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(database n_db x D, queries n_q x D)`` embeddings; queries are cropped to their boxes."""
    db = extract_embeddings(model, benchmark.db_paths, image_size, scales=scales, **kwargs)
    queries = extract_embeddings(
        model, benchmark.query_paths, image_size, bboxes=benchmark.query_bboxes, scales=scales, **kwargs
    )
    return db, queries
