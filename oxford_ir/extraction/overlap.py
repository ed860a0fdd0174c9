"""The train/test overlap guard: training images that are evaluated images, byte for byte or nearly.

Google Landmarks v2-clean holds 36 of Revisited Oxford's 70 landmarks and 38 of Revisited Paris's, some through the
very same photos (Song et al., CVPR 2024, "On Train-Test Class Overlap and Detection for Image Retrieval"); removing
them changed the ranking of published methods. :func:`find_overlap` compares every training image with every
evaluated image (database and queries of each evaluated benchmark, queries uncropped) in two ways:

- **exact**: the same file. Only training files whose size equals some evaluated file's size are hashed (sha256,
  :mod:`oxford_ir.hashing`), so a million training images cost a million ``stat`` calls and a handful of hashes.
- **near**: cosine similarity of embeddings at least ``threshold``: the same photo re-encoded, resized, lightly
  recompressed. Embeddings go through the one test-time path
  (:func:`~oxford_ir.extraction.embedding.extract_embeddings`), similarities are a matrix product in row blocks
  of at most ``block_bytes`` (:func:`similar_pairs`: 1M x 10k stays within tens of MB), never a loop over pairs.

The default model is :class:`Thumbnail`, not the network being trained: the guard must run before training, when
that network is untrained (a scratch one embeds noise) or knows nothing of near copies (ImageNet features put two
photos of one facade as close as two encodings of one photo, which is landmark overlap, not image overlap); and it
must be cheap enough for a million images on CPUs. A zero-mean colour thumbnail (``grid`` x ``grid`` cell means
of the image at a long side of ``image_size``) is the classic near-duplicate signature: recompression and
resizing move it by a few hundredths, different photos, even of the same building, far more. It does not see
through crops, rotations or strong edits; pass ``model=`` a learned embedder for those (its threshold then needs
choosing on its own similarities).

The :class:`OverlapReport` holds the pairs (training image, evaluated image, similarity, exact or near), counts
them per evaluated landmark and gives the mask of overlapping training images that
:mod:`oxford_ir.data.overlap_exclusion` (``data.exclude_overlap``) drops before training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.data.overlap_exclusion import OverlapSettings
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.hashing import file_sha256

#: the landmark of an evaluated image that no query names (a distractor)
NO_LANDMARK = "(no landmark)"


class Thumbnail(nn.Module):
    """A zero-mean colour thumbnail as an embedding: the means of ``grid`` x ``grid`` cells of each image (its own
    region of a padded batch: ``sizes``), minus each channel's mean, L2-normalised (3 x grid x grid values).

    Cells are averaged by sampling each image's region at 4 x 4 points per cell (one ``grid_sample`` for the
    whole batch) and pooling them, so padded bucket batches need no loop over images.
    """

    supports_padding = True

    def __init__(self, grid: int = 16) -> None:
        super().__init__()
        self.grid = int(grid)
        self.embedding_dim = 3 * self.grid * self.grid

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        b, _, height, width = images.shape
        images = images.float()
        if sizes is None:
            cells = F.adaptive_avg_pool2d(images, self.grid)
        else:
            scale = sizes.to(images.device, torch.float32) / images.new_tensor([height, width])
            theta = images.new_zeros(b, 2, 3)
            theta[:, 0, 0], theta[:, 0, 2] = scale[:, 1], scale[:, 1] - 1  # x: [-1, 1] -> the image's own columns
            theta[:, 1, 1], theta[:, 1, 2] = scale[:, 0], scale[:, 0] - 1
            side = 4 * self.grid
            grid = F.affine_grid(theta, [b, 3, side, side], align_corners=False)
            sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
            cells = F.avg_pool2d(sampled, 4)
        cells = cells - cells.mean(dim=(2, 3), keepdim=True)
        return F.normalize(cells.flatten(1), dim=1)


@dataclass(frozen=True)
class EvaluatedImages:
    """The images an evaluation scores, once each: database and query files of every evaluated benchmark, with
    the landmarks each belongs to (a query's own; a database image's: those of the queries that list it as a
    positive or junk; none for a distractor) and a name for reports (``<benchmark>/<image>``)."""

    paths: list[Path]
    names: list[str]
    landmarks: list[tuple[str, ...]]

    @classmethod
    def of(cls, benchmarks: Sequence[Benchmark]) -> EvaluatedImages:
        index: dict[Path, int] = {}
        names: list[str] = []
        landmarks: list[set[str]] = []

        def add(path: Path, name: str) -> int:
            row = index.get(path)
            if row is None:
                row = index[path] = len(names)
                names.append(name)
                landmarks.append(set())
            return row

        for benchmark in benchmarks:
            db_rows = [
                add(p, f"{benchmark.name}/{n}") for p, n in zip(benchmark.db_paths, benchmark.imlist, strict=True)
            ]
            query_names = benchmark.query_landmarks if len(benchmark.query_landmarks) == benchmark.n_queries else []
            for q, (path, name) in enumerate(zip(benchmark.query_paths, benchmark.qimlist, strict=True)):
                landmark = query_names[q] if query_names and query_names[q] else f"{benchmark.name} query {name}"
                landmarks[add(path, f"{benchmark.name}/{name}")].add(landmark)
                listed = np.concatenate([benchmark.positives(q), np.asarray(benchmark.gnd[q].get("junk", ()), int)])
                for i in listed.tolist():
                    landmarks[db_rows[i]].add(landmark)
        return cls(list(index), names, [tuple(sorted(s)) for s in landmarks])


def exact_copies(train_paths: Sequence[str | os.PathLike], evaluated_paths: Sequence[Path]) -> tuple[np.ndarray, ...]:
    """``(train rows, evaluated rows)`` of every pair of byte-identical files. A training file is hashed only when
    its size is the size of some evaluated file; a missing file is no copy."""
    by_size: dict[int, list[int]] = {}
    for row, path in enumerate(evaluated_paths):
        by_size.setdefault(os.stat(path).st_size, []).append(row)
    evaluated_hash: dict[int, str] = {}
    by_hash: dict[str, list[int]] = {}
    train_rows: list[int] = []
    eval_rows: list[int] = []
    for row, path in enumerate(train_paths):
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        candidates = by_size.get(size)
        if not candidates:
            continue
        for e in candidates:
            if e not in evaluated_hash:
                evaluated_hash[e] = file_sha256(evaluated_paths[e])
                by_hash.setdefault(evaluated_hash[e], []).append(e)
        for e in by_hash.get(file_sha256(path), ()):
            train_rows.append(row)
            eval_rows.append(e)
    return np.asarray(train_rows, dtype=np.int64), np.asarray(eval_rows, dtype=np.int64)


def similar_pairs(
    train: torch.Tensor, evaluated: torch.Tensor, threshold: float, *, block_bytes: int = 64 << 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train rows, evaluated rows, similarities)`` of every pair with ``train[i] @ evaluated[j] >= threshold``
    (L2-normalised rows: cosine similarity), in order of train row then evaluated row.

    The N x M matrix is computed in blocks of rows of ``train`` holding at most ``block_bytes`` of similarities,
    so memory stays bounded whatever N (1M x 10k: blocks of 1600 rows at 64 MB).
    """
    n, m = train.shape[0], evaluated.shape[0]
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if n == 0 or m == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    rows = max(1, block_bytes // (4 * m))
    evaluated_t = evaluated.float().T.contiguous()
    for start in range(0, n, rows):
        block = train[start : start + rows].float() @ evaluated_t
        i, j = torch.nonzero(block >= threshold, as_tuple=True)
        found.append(((i + start).numpy(), j.numpy(), block[i, j].numpy()))
    ti, ej, sims = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return ti.astype(np.int64), ej.astype(np.int64), sims.astype(np.float32)


@dataclass(frozen=True)
class OverlapReport:
    """What :func:`find_overlap` found: one entry per pair (``train``, ``evaluated`` rows, ``similarity``,
    ``exact``), the evaluated images, the number of training images and the settings."""

    train: np.ndarray
    evaluated: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray
    images: EvaluatedImages
    n_train: int
    settings: OverlapSettings
    train_names: Sequence[Any] = field(default_factory=list)

    @property
    def overlapping(self) -> np.ndarray:
        """Boolean mask over the training images: the image is (nearly) an evaluated image."""
        mask = np.zeros(self.n_train, dtype=bool)
        mask[self.train] = True
        return mask

    def per_landmark(self) -> dict[str, dict[str, int]]:
        """Per evaluated landmark: how many training images are exact copies of one of its images, and how many
        (not exact copies of any evaluated image) are near copies. Landmarks without overlap are left out."""
        exact_train = set(self.train[self.exact].tolist())
        counts: dict[str, dict[str, set[int]]] = {}
        for t, e, is_exact in zip(self.train.tolist(), self.evaluated.tolist(), self.exact.tolist(), strict=True):
            if not is_exact and t in exact_train:
                continue
            for landmark in self.images.landmarks[e] or (NO_LANDMARK,):
                kinds = counts.setdefault(landmark, {"exact": set(), "near": set()})
                kinds["exact" if is_exact else "near"].add(t)
        return {k: {kind: len(v) for kind, v in kinds.items()} for k, kinds in sorted(counts.items())}

    def summary(self) -> dict[str, Any]:
        """The report as JSON: totals, counts per landmark, the settings and the first ``max_pairs`` pairs (most
        similar first)."""
        order = np.lexsort((-self.similarity, ~self.exact))[: self.settings.max_pairs]
        name = (lambda t: str(self.train_names[t])) if len(self.train_names) else str
        exact_train = np.unique(self.train[self.exact])
        return {
            "training_images": self.n_train,
            "overlapping": int(self.overlapping.sum()),
            "exact": len(exact_train),
            "near": int(len(np.setdiff1d(np.unique(self.train), exact_train))),
            "per_landmark": self.per_landmark(),
            "settings": asdict(self.settings),
            "pairs": [
                {
                    "train": name(int(self.train[p])),
                    "evaluated": self.images.names[int(self.evaluated[p])],
                    "similarity": round(float(self.similarity[p]), 4),
                    "exact": bool(self.exact[p]),
                }
                for p in order.tolist()
            ],
        }


def find_overlap(
    train_paths: Sequence[str | os.PathLike],
    benchmarks: Sequence[Benchmark],
    settings: OverlapSettings | Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> OverlapReport:
    """Training images that are exact or near copies of an image evaluated in ``benchmarks`` (module docstring).

    ``model``: the embedder of near copies (default :class:`Thumbnail`); ``device``: where it runs. An exact copy
    is reported once, as exact, even when it is also near.
    """
    if not isinstance(settings, OverlapSettings):
        settings = OverlapSettings.from_config(settings)
    images = EvaluatedImages.of(benchmarks)
    ti, ej = exact_copies(train_paths, images.paths)
    sims = np.ones(len(ti), dtype=np.float32)
    exact = np.ones(len(ti), dtype=bool)
    if settings.near and len(train_paths) and images.paths:
        model = model if model is not None else Thumbnail(settings.grid)
        extract = {"batch_size": settings.batch_size, "num_workers": settings.num_workers, "device": device}
        train = extract_embeddings(model, list(train_paths), settings.image_size, **extract)
        evaluated = extract_embeddings(model, images.paths, settings.image_size, **extract)
        nt, ne, ns = similar_pairs(train, evaluated, settings.threshold, block_bytes=settings.block_bytes)
        known = set(zip(ti.tolist(), ej.tolist(), strict=True))
        near = np.array([(t, e) not in known for t, e in zip(nt.tolist(), ne.tolist(), strict=True)], dtype=bool)
        ti, ej = np.concatenate([ti, nt[near]]), np.concatenate([ej, ne[near]])
        sims = np.concatenate([sims, ns[near]])
        exact = np.concatenate([exact, np.zeros(int(near.sum()), dtype=bool)])
    return OverlapReport(ti, ej, sims, exact, images, len(train_paths), settings, train_names=train_paths)
