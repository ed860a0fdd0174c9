"""The original project's method, reimplemented for the benchmark only (never used by the package).

Training: each item of the dataset is a random triplet (an anchor, a positive of the same landmark, a
negative of another label), its three images opened with PIL, resized and transformed inside the Dataset on
every access (no cache); a batch of triplets goes through the network in THREE separate forward passes
(anchors, positives, negatives) and ``torch.nn.TripletMarginLoss`` (Euclidean distance) is applied.

Evaluation: every (query, database image) pair is its own item: both images are opened and preprocessed,
both go through the network, and their Euclidean distance is the pair's score; the database is ranked per
query by increasing distance. Nothing is cached between pairs, so a benchmark of Nq queries and Ndb images
costs 2 Nq Ndb network passes instead of Nq + Ndb.

The model and preprocessing of the evaluation are those of ``oxford_ir`` (``ImageListDataset``: long side
downscaled, queries cropped to their box), so that on the same model and images the pairwise ranking
equals the matrix-product one; only the method differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD


# -- training --------------------------------------------------------------------------------------------------
class RandomTripletDataset(Dataset):
    """``length`` random triplets ``(anchor, positive, negative)`` of ``image_size`` x ``image_size`` tensors.

    Item ``i`` is drawn with a generator seeded by ``(seed, i)``: a landmark with at least two images, two
    distinct images of it (anchor, positive) and an image of any other label (negative; distractors count,
    each is its own label). Every image is opened from disk with PIL on every access.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        image_size: int,
        length: int,
        seed: int = 0,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        classes, counts = np.unique(self.labels, return_counts=True)
        self.classes = classes[counts >= 2]
        if len(self.classes) == 0 or len(classes) < 2:
            raise ValueError("random triplets need a label with two images and at least one other label")
        self.members = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}
        self.length = int(length)
        self.seed = int(seed)
        self.transform = transforms.Compose(
            [
                transforms.Resize((image_size, image_size)),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return self.length

    def triplet(self, item: int) -> tuple[int, int, int]:
        """Indices ``(anchor, positive, negative)`` of item ``item``."""
        rng = np.random.default_rng([self.seed, int(item)])
        label = int(rng.choice(self.classes))
        anchor, positive = rng.choice(self.members[label], size=2, replace=False)
        negative = rng.choice(np.flatnonzero(self.labels != label))
        return int(anchor), int(positive), int(negative)

    def open(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        anchor, positive, negative = self.triplet(item)
        return self.open(anchor), self.open(positive), self.open(negative)


def triplet_loader(
    split: Any, image_size: int, batch_size: int, batches: int, *, seed: int, num_workers: int, device: torch.device
) -> DataLoader:
    """``batches`` batches of ``batch_size // 3`` random triplets of the training ``split`` (paths, labels), opened
    per item by DataLoader workers as the original did."""
    triplets = max(1, int(batch_size) // 3)
    dataset = RandomTripletDataset(split.paths, split.labels, int(image_size), length=triplets * batches, seed=seed)
    return DataLoader(
        dataset,
        batch_size=triplets,
        shuffle=False,  # the triplets are random already
        drop_last=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def train_triplets(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    margin: float,
    device: torch.device,
    autocast: Callable[[], object] | None = None,
    channels_last: bool = False,
    max_steps: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> int:
    """The original training loop: per batch of triplets, three forward passes, triplet margin loss, one step.

    ``on_step(step, images)`` is called after each optimizer step with the number of images that went
    through the network (3 per triplet). Returns the number of steps taken.
    """
    loss_fn = nn.TripletMarginLoss(margin=margin, p=2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.train()
    step = 0
    for anchors, positives, negatives in loader:
        if max_steps is not None and step >= max_steps:
            break
        anchors, positives, negatives = (
            x.to(device, non_blocking=True).contiguous(memory_format=fmt) for x in (anchors, positives, negatives)
        )
        with autocast() if autocast is not None else contextlib.nullcontext():
            anchor_embeddings = model(anchors)
            positive_embeddings = model(positives)
            negative_embeddings = model(negatives)
            loss = loss_fn(anchor_embeddings.float(), positive_embeddings.float(), negative_embeddings.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if on_step is not None:
            on_step(step, 3 * anchors.shape[0])
    return step


# -- evaluation ------------------------------------------------------------------------------------------------
class PairDataset(Dataset):
    """``(query index, database index, query tensor, database tensor)`` for each pair, both images opened
    and preprocessed on every access (the query cropped to its box), as ``ImageListDataset`` does."""

    def __init__(self, benchmark: Benchmark, image_size: int | None, pairs: np.ndarray) -> None:
        self.queries = ImageListDataset(benchmark.query_paths, image_size, bboxes=benchmark.query_bboxes)
        self.database = ImageListDataset(benchmark.db_paths, image_size)
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        query, image = (int(v) for v in self.pairs[item])
        return query, image, self.queries[query][0], self.database[image][0]


def all_pairs(n_queries: int, n_db: int) -> np.ndarray:
    """Every (query, database image) pair, query-major."""
    q, d = np.meshgrid(np.arange(n_queries), np.arange(n_db), indexing="ij")
    return np.stack([q.ravel(), d.ravel()], axis=1)


def pairwise_distances(
    model: nn.Module,
    benchmark: Benchmark,
    image_size: int | None,
    pairs: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast: Callable[[], object] | None = None,
    channels_last: bool = False,
    on_pair: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The distance of each pair in ``pairs`` (P x 2 of query, database indices): one pass of the query and one
    of the database image through the network per pair, nothing reused; ``on_pair(n)`` after each pair."""
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    loader = DataLoader(
        PairDataset(benchmark, image_size, pairs),
        batch_size=None,  # one pair at a time: the two images have their own sizes
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    distances = np.empty(len(pairs), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for n, (_, _, query, image) in enumerate(loader):
                query = query.unsqueeze(0).to(device, non_blocking=True).contiguous(memory_format=fmt)
                image = image.unsqueeze(0).to(device, non_blocking=True).contiguous(memory_format=fmt)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    query_embedding = model(query)
                    image_embedding = model(image)
                distances[n] = float(F.pairwise_distance(query_embedding.float(), image_embedding.float()))
                if on_pair is not None:
                    on_pair(n + 1)
    finally:
        model.train(was_training)
    return distances


def pairwise_ranks(distances: np.ndarray) -> np.ndarray:
    """(n_db, n_queries) database indices by increasing distance (ties in database order), from an
    n_queries x n_db distance matrix: the layout of the evaluation protocol."""
    return np.argsort(np.asarray(distances), axis=1, kind="stable").T


def evaluate_pairwise(
    model: nn.Module,
    benchmark: Benchmark,
    image_size: int | None,
    *,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """The benchmark's metrics by the original method: every pair through the network, ranked by distance."""
    pairs = all_pairs(benchmark.n_queries, benchmark.n_db)
    distances = pairwise_distances(model, benchmark, image_size, pairs, device=device, num_workers=num_workers)
    return benchmark.evaluate(pairwise_ranks(distances.reshape(benchmark.n_queries, benchmark.n_db)))
