"""What a whitening is learned from: the settings, the sample of training images and pairs, the protocol guard.

A whitening is learned from the **training split** (:class:`~oxford_ir.benchmarks.splits.TrainSplit`): pairs of
images of the same training landmark are its matching pairs (``learned``), its images its sample (``pca``). Never
from an evaluated query, its positives or its junk: :func:`check_disjoint` refuses a whitening whose images overlap
what a benchmark evaluates, as it would overlap in a seed split or when the evaluated dataset is the training one.

The sample is drawn before anything is embedded (``max_pairs`` pairs, with ``seed``), so validation embeds the
same images every epoch and ``oxford-ir-eval`` the same ones as validation did.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oxford_ir.benchmarks.benchmark import INDEX_KEYS, Benchmark
from oxford_ir.benchmarks.splits import TrainSplit
from oxford_ir.config import to_plain
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.extraction.whitening import WHITENING_KINDS, Whitening, fit_learned, fit_pca

#: the keys of a ``whitening`` config node besides ``kind``
SETTING_KEYS = ("source", "dim", "shrinkage", "max_pairs", "seed", "file")


@dataclass(frozen=True)
class WhiteningSettings:
    """A checked ``whitening`` config node (``kind`` learned or pca; ``none`` is no settings at all)."""

    kind: str
    dim: int | None = None
    shrinkage: float = 0.1
    max_pairs: int = 5000
    seed: int = 0

    @classmethod
    def from_config(cls, node: Any) -> WhiteningSettings | None:
        """From ``cfg.whitening`` (a mapping with ``kind``, or None); None for no whitening."""
        node = to_plain(node)
        if node is None:
            return None
        if isinstance(node, str):
            node = {"kind": node}
        if not isinstance(node, Mapping):
            raise ConfigError(f"whitening={node!r}: choose a whitening config: whitening=none|learned|pca")
        kind = node.get("kind", "none")
        if kind not in WHITENING_KINDS:
            raise ConfigError(f"whitening.kind={kind!r}: choose one of {', '.join(WHITENING_KINDS)}")
        unknown = sorted(set(node) - {"kind", *SETTING_KEYS})
        if unknown:
            raise ConfigError(f"whitening.{unknown[0]}: unknown key; the keys are kind, {', '.join(SETTING_KEYS)}")
        if kind == "none":
            return None
        dim, max_pairs, seed = node.get("dim"), node.get("max_pairs", 5000), node.get("seed", 0)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ConfigError(f"whitening.dim={dim!r}: a whole number of output dimensions >= 1, or null for all")
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
            raise ConfigError(f"whitening.max_pairs={max_pairs!r}: a whole number >= 1 (pairs drawn to learn from)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"whitening.seed={seed!r}: a whole number >= 0")
        shrinkage = node.get("shrinkage", 0.1)
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, int | float) or not 0 <= shrinkage <= 1:
            raise ConfigError(f"whitening.shrinkage={shrinkage!r}: a fraction in [0, 1] (0: the published estimate)")
        return cls(kind, dim, float(shrinkage), max_pairs, seed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WhiteningSample:
    """The images to embed (``paths``), the matching pairs among them (``queries[i]``, ``positives[i]``: indices
    into ``paths``; empty for PCA), and what they are (``description``, ``images_sha256`` over their names)."""

    paths: list[Path]
    queries: np.ndarray
    positives: np.ndarray
    description: str

    @property
    def images_sha256(self) -> str:
        """Identifies the sample by its image names (not folders), so moving the dataset keeps it."""
        return hashlib.sha256("\n".join(p.name for p in self.paths).encode()).hexdigest()

    def restrict(self, kept: np.ndarray, why: str) -> WhiteningSample:
        """The sample of the images where ``kept`` (a boolean mask over ``paths``) and of the pairs of two of them."""
        kept = np.asarray(kept, dtype=bool)
        position = np.cumsum(kept) - 1
        pairs = kept[self.queries] & kept[self.positives]
        return WhiteningSample(
            [p for p, k in zip(self.paths, kept, strict=True) if k],
            position[self.queries[pairs]],
            position[self.positives[pairs]],
            f"{self.description} ({why})",
        )

    def source_info(self) -> dict[str, Any]:
        """What a whitening file records about its images: enough to reuse it, and to refuse it on a benchmark
        that evaluates any of them."""
        return {
            "description": self.description,
            "n_images": len(self.paths),
            "n_pairs": len(self.queries),
            "images_sha256": self.images_sha256,
            "images": [str(p) for p in self.paths],
        }


def whitening_sample(
    paths: Sequence[str | Path],
    labels: Sequence[int] | np.ndarray,
    num_landmark_classes: int,
    settings: WhiteningSettings,
    description: str,
) -> WhiteningSample:
    """The sample of a training split (``paths`` with ``labels``; labels below ``num_landmark_classes`` are landmarks,
    the rest distractors) for ``settings``.

    ``learned``: every pair of two images of one landmark, or ``max_pairs`` of them drawn uniformly with ``seed``;
    the images are those of the pairs. ``pca``: every image of the split (distractors too: no label is used), or
    ``2 * max_pairs`` of them drawn with ``seed``.
    """
    paths = [Path(p) for p in paths]
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(settings.seed)
    if settings.kind == "pca":
        chosen = np.arange(len(paths))
        if len(chosen) > 2 * settings.max_pairs:
            chosen = np.sort(rng.choice(len(paths), 2 * settings.max_pairs, replace=False))
        if len(chosen) < 2:
            raise DataError(f"PCA whitening: {description} has {len(chosen)} images; it needs at least 2")
        empty = np.empty(0, dtype=np.int64)
        return WhiteningSample([paths[i] for i in chosen], empty, empty, description)
    firsts, seconds = [], []
    for label in range(num_landmark_classes):
        members = np.flatnonzero(labels == label)
        i, j = np.triu_indices(len(members), k=1)
        firsts.append(members[i])
        seconds.append(members[j])
    first = np.concatenate(firsts) if firsts else np.empty(0, dtype=np.int64)
    second = np.concatenate(seconds) if seconds else np.empty(0, dtype=np.int64)
    if len(first) == 0:
        raise DataError(
            f"learned whitening: {description} has no two images of one landmark (no matching pair); use "
            "whitening=pca, or a training split with landmark images"
        )
    if len(first) > settings.max_pairs:
        kept = np.sort(rng.choice(len(first), settings.max_pairs, replace=False))
        first, second = first[kept], second[kept]
    images = np.unique(np.concatenate([first, second]))
    position = {int(image): k for k, image in enumerate(images)}
    queries = np.array([position[int(i)] for i in first], dtype=np.int64)
    positives = np.array([position[int(i)] for i in second], dtype=np.int64)
    return WhiteningSample([paths[i] for i in images], queries, positives, description)


def split_sample(split: TrainSplit, settings: WhiteningSettings) -> WhiteningSample:
    """:func:`whitening_sample` of a training split (as trained on: images present on disk)."""
    held_out = f", {', '.join(split.held_out_landmarks)} held out" if split.held_out_landmarks else ""
    description = f"training images of the {split.kind} split of {split.train_benchmark}{held_out}"
    return whitening_sample(split.paths, split.labels, split.num_landmark_classes, settings, description)


def fit_whitening(settings: WhiteningSettings, vectors: torch.Tensor, sample: WhiteningSample) -> Whitening:
    """The whitening of ``settings.kind`` fitted to ``vectors`` (row i: ``sample.paths[i]``)."""
    if vectors.shape[0] != len(sample.paths):
        raise ValueError(f"{vectors.shape[0]} embeddings for the {len(sample.paths)} images of the whitening sample")
    if settings.kind == "learned":
        whitening = fit_learned(
            vectors,
            torch.as_tensor(sample.queries),
            torch.as_tensor(sample.positives),
            shrinkage=settings.shrinkage,
            dim=settings.dim,
        )
    else:
        whitening = fit_pca(vectors, shrinkage=settings.shrinkage, dim=settings.dim)
    return whitening.with_info(settings=settings.as_dict())


def learn_whitening(
    model: nn.Module,
    sample: WhiteningSample,
    settings: WhiteningSettings,
    *,
    image_size: int | None,
    scales: Sequence[float] = (1.0,),
    **extract_kwargs: Any,
) -> Whitening:
    """Embed ``sample`` with ``model`` through the test-time path (whole images at ``image_size`` and ``scales``, as
    the evaluation embeds its database) and fit the whitening to the embeddings."""
    vectors = extract_embeddings(model, sample.paths, image_size, scales=scales, **extract_kwargs)
    whitening = fit_whitening(settings, vectors, sample)
    return whitening.with_info(image_size=image_size, scales=[float(s) for s in scales], source=sample.source_info())


def evaluated_images(benchmark: Benchmark) -> set[str]:
    """Real paths of what ``benchmark`` evaluates: its queries and every database image of their ground truth
    (positives and junk)."""
    db = benchmark.db_paths
    named = [*benchmark.query_paths]
    for entry in benchmark.gnd:
        for key in INDEX_KEYS[benchmark.protocol]:
            named.extend(db[int(i)] for i in np.asarray(entry.get(key, ()), dtype=np.int64).reshape(-1))
    return {os.path.realpath(p) for p in named}


#: how to learn a whitening that does not overlap the evaluation, for oxford-ir-eval and search
EVAL_FIX = (
    "Learn it from a split that keeps them out (whitening.source={split: landmarks, held_out_landmarks: [...]}, or a "
    "training dataset other than the evaluated one), or evaluate another benchmark"
)


def check_disjoint(
    source_images: Iterable[str | Path], benchmarks: Iterable[Benchmark], what: str, fix: str = EVAL_FIX
) -> None:
    """A :class:`ConfigError` when a whitening learned from ``source_images`` would be evaluated on a benchmark
    that evaluates any of them (its queries, their positives or junk): the whitening would have seen the test."""
    source = {os.path.realpath(p) for p in source_images}
    for benchmark in benchmarks:
        shared = sorted(source & evaluated_images(benchmark))
        if shared:
            raise ConfigError(
                f"{what} was learned from {len(shared)} images that {benchmark.name} evaluates (queries, their "
                f"positives or junk; e.g. {Path(shared[0]).name}): its numbers would have seen the test. {fix}"
            )
