"""The LightningDataModule of retrieval training: class-balanced P x K batches, and the benchmark to evaluate.

Training batches hold ``classes_per_batch`` (P) landmarks x ``images_per_class`` (K) augmented crops, plus
``distractors_per_batch`` distractor images with labels of their own (extra negatives), drawn by
:class:`ClassBalancedSampler`. Validation (and test) is the whole evaluation benchmark, embedded through the one
test-time path of :mod:`oxford_ir.extraction` like ``oxford-ir-eval``: this module holds the benchmark, its
images (:meth:`RetrievalDataModule.eval_images`, reading the image cache when enabled) and their settings
(:attr:`RetrievalDataModule.eval_settings`); the LightningModule, which knows its network, plans the
batches (bucket shapes, the network's stride) and builds the two loaders ``[database, queries]``
(``RetrievalModule.val_dataloader``), then evaluates with the published protocol.

Image sizes: ``image_size`` is the side of the square training crops and ``eval_image_size`` the long side
of evaluation images. cnnimageretrieval-pytorch trains at 362 and tests at 1024 (published numbers);
smaller values here are for speed.

Image cache (``cache.enabled``, :mod:`oxford_ir.data.cache`): training images are decoded once to a long side
of ``cache.train_long_side`` (default ``ceil(image_size / sqrt(augmentation.scale[0]))``: the smallest random
crop is not upscaled) and augmented from there; evaluation images (queries cropped) once at
``eval_image_size``, bit-identical to the uncached ones. ``prepare_data`` (local rank 0) builds or updates
the caches under ``cache.dir`` (default ``<data_dir>/cache``), ``setup`` (every process) opens them. Without
the cache, training JPEGs are still decoded in draft mode when at least twice that long side.

Under DDP, each process draws its own share of the training batches (see :class:`ClassBalancedSampler`);
Lightning gives the two evaluation loaders a ``DistributedSampler`` over their planned batches (it pads with
repeated batches), and the index of each image lets the module gather the embeddings and drop the repeats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.registry import benchmark_spec, load_benchmark
from oxford_ir.benchmarks.splits import SPLIT_KINDS, TrainSplit, build_split, full_ground_truth
from oxford_ir.data.augmentation import Augmentation, SeededCrop
from oxford_ir.data.batch_augment import BatchAugmentation, CropBatch, CropCollate, CropItem
from oxford_ir.data.cache import ImageCache, build_image_cache, cache_folder, default_train_long_side
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.data.gpu_decode import (
    EncodedBatch,
    EncodedTrainDataset,
    GpuTrainDecoder,
    check_decode,
    collate_encoded,
)
from oxford_ir.data.prefetch import DevicePrefetchLoader, ReadyBatch
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.fs import WORKER_TIMEOUT
from oxford_ir.images import load_image

_SHOWN = 5
#: ``data.eval_batching`` values (:mod:`oxford_ir.extraction.planning` implements them)
EVAL_BATCHINGS = ("bucket", "shape", "aspect")


class _Cycle:
    """Endless draws without replacement: items come in shuffled rounds, and no draw repeats an item."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items, dtype=np.int64)
        self.rng = rng
        self.queue = self.items[:0]

    def take(self, n: int) -> np.ndarray:
        if len(self.queue) >= n:
            out, self.queue = self.queue[:n], self.queue[n:]
            return out
        head = self.queue
        fresh = self.rng.permutation(self.items)
        # what is left of the last round goes first; its items go to the end of the new round, not into this draw
        taken = np.isin(fresh, head)
        fresh = np.concatenate([fresh[~taken], fresh[taken]])
        need = n - len(head)
        self.queue = fresh[need:]
        return np.concatenate([head, fresh[:need]])


class ClassBalancedSampler(DistributedSampler):
    """Indices whose consecutive chunks of ``batch_size`` are class-balanced batches, P classes x K images + D.

    Each batch holds ``classes_per_batch`` distinct classes of ``classes`` with ``images_per_class`` distinct
    images each (classes grouped, in draw order), then ``distractors_per_batch`` distinct indices of
    ``distractors``. Classes, the images of each class and distractors are each drawn in shuffled rounds
    without replacement, so over an epoch every class and image comes up about equally often. Use it as a
    DataLoader's ``sampler`` with ``batch_size=sampler.batch_size, drop_last=True``
    (as pytorch-metric-learning's ``MPerClassSampler``).

    Reproducible: the batches of an epoch are a function of ``(seed, epoch)`` only (``set_epoch``), so a
    resumed run draws exactly what an uninterrupted one would.

    Distributed: every process computes the same ``num_batches x num_replicas`` batches of the epoch and
    keeps those at positions ``rank, rank + num_replicas, ...``: ``num_batches`` per process (steps per
    epoch do not depend on the number of processes), disjoint across processes. ``num_replicas`` and
    ``rank`` default to those of ``torch.distributed`` when it is initialised, read when iterating. It
    subclasses ``DistributedSampler`` because that is how Lightning (``use_distributed_sampler=True``)
    recognises a sampler that already shards itself: it then neither wraps nor replaces it, and calls
    ``set_epoch`` at every epoch. ``DistributedSampler.__init__`` is deliberately not called (it requires an
    initialised process group and a dataset).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[int] | np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        num_batches: int,
        *,
        distractors: Sequence[int] | np.ndarray = (),
        distractors_per_batch: int = 0,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.unique(np.asarray(classes, dtype=np.int64))
        self.classes_per_batch = _positive_int(classes_per_batch, "classes_per_batch")
        self.images_per_class = _positive_int(images_per_class, "images_per_class")
        self.num_batches = _positive_int(num_batches, "batches_per_epoch")
        self.distractors = np.asarray(distractors, dtype=np.int64)
        self.distractors_per_batch = _non_negative_int(distractors_per_batch, "distractors_per_batch")
        self.seed = _non_negative_int(seed, "seed")
        self.members = {int(c): np.flatnonzero(labels == c) for c in self.classes}
        if len(self.classes) < self.classes_per_batch:
            raise ConfigError(
                f"classes_per_batch={self.classes_per_batch} but only {len(self.classes)} classes to draw from; "
                f"lower classes_per_batch to at most {len(self.classes)}"
            )
        small = {c: len(m) for c, m in self.members.items() if len(m) < self.images_per_class}
        if small:
            shown = ", ".join(f"label {c}: {n}" for c, n in list(small.items())[:_SHOWN])
            raise ConfigError(
                f"images_per_class={self.images_per_class} but {len(small)} classes have fewer images ({shown}); "
                "lower images_per_class or leave those classes out"
            )
        if len(np.unique(self.distractors)) < self.distractors_per_batch:
            raise ConfigError(
                f"distractors_per_batch={self.distractors_per_batch} but only {len(np.unique(self.distractors))} "
                "distractor images; lower distractors_per_batch (0 disables them) or use_distractors=true"
            )
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        # attributes DistributedSampler users may read
        self.shuffle = True
        self.drop_last = True
        self.dataset = None

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class + self.distractors_per_batch

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return int(self._num_replicas)
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return int(self._rank)
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self, epoch: int) -> np.ndarray:
        """All ``num_batches * num_replicas`` batches of ``epoch`` (every process computes the same)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        class_cycle = _Cycle(self.classes, rng)
        image_cycles = {c: _Cycle(m, rng) for c, m in self.members.items()}
        distractor_cycle = _Cycle(np.unique(self.distractors), rng) if self.distractors_per_batch else None
        batches = np.empty((self.num_batches * self.num_replicas, self.batch_size), dtype=np.int64)
        for b in range(len(batches)):
            parts = [image_cycles[int(c)].take(self.images_per_class) for c in class_cycle.take(self.classes_per_batch)]
            if distractor_cycle is not None:
                parts.append(distractor_cycle.take(self.distractors_per_batch))
            batches[b] = np.concatenate(parts)
        return batches

    def batches(self, epoch: int | None = None) -> np.ndarray:
        """This process's ``num_batches x batch_size`` indices of ``epoch`` (default: the current one)."""
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas})")
        return self.global_batches(self.epoch if epoch is None else epoch)[self.rank :: self.num_replicas]

    def draw_seeds(self, epoch: int | None = None) -> np.ndarray:
        """A seed per drawn image, aligned with :meth:`batches`: the augmentation of each draw.

        Augmentations seeded by (seed, epoch, position) make training a pure function of the
        epoch, so a run resumed from ``last.ckpt`` sees exactly the crops an uninterrupted one
        sees, whatever the global random state or the number of workers.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        seeds = rng.integers(0, 2**62, size=(self.num_batches * self.num_replicas, self.batch_size), dtype=np.int64)
        return seeds[self.rank :: self.num_replicas]

    def __iter__(self):
        """``(image index, augmentation seed)`` pairs, batch after batch."""
        return iter(zip(self.batches().ravel().tolist(), self.draw_seeds().ravel().tolist(), strict=True))

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.classes_per_batch} of {len(self.classes)} classes, "
            f"K={self.images_per_class}, distractors={self.distractors_per_batch} of {len(self.distractors)}, "
            f"{self.num_batches} batches, seed={self.seed})"
        )


@dataclass(frozen=True)
class CacheConfig:
    """``data.cache``: the preprocessed image cache of training and evaluation images (see the module doc)."""

    #: read training and evaluation images from the cache (built in ``prepare_data``)
    enabled: bool = False
    #: folder of the caches; None: ``<data_dir>/cache``
    dir: str | None = None
    #: long side of cached training images; None: ``ceil(image_size / sqrt(augmentation.scale[0]))``
    train_long_side: int | None = None
    #: processes decoding while building; None: ``data.num_workers``
    num_workers: int | None = None
    #: progress bar while building
    progress: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> CacheConfig:
        """Validate ``data.cache`` (a mapping or None); a bad value raises ConfigError naming the key."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise ConfigError(f"data.cache must be a mapping such as {{enabled: true}}, got {config!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown data.cache key(s) {unknown}; known: {sorted(known)}")
        values = dict(config)
        for name in ("enabled", "progress"):
            if name in values and not isinstance(values[name], bool):
                raise ConfigError(f"data.cache.{name} must be true or false, got {values[name]!r}")
        if values.get("dir") is not None:
            if not isinstance(values["dir"], (str, Path)) or not str(values["dir"]).strip():
                raise ConfigError(f"data.cache.dir must be a folder path or null, got {values['dir']!r}")
            values["dir"] = str(values["dir"])
        if values.get("train_long_side") is not None:
            _positive_int(values["train_long_side"], "cache.train_long_side")
        if values.get("num_workers") is not None:
            _non_negative_int(values["num_workers"], "cache.num_workers")
        return cls(**values)


class TrainImageDataset(Dataset):
    """:class:`~oxford_ir.data.batch_augment.CropItem` (uint8 crop, label, draw) for each training image.

    ``crop``: a :class:`~oxford_ir.data.augmentation.SeededCrop`, the per-image part of the augmentation (random
    resized crop and flip with PIL); its colour jitter and normalisation run on the whole batch
    (:class:`~oxford_ir.data.batch_augment.BatchAugmentation`). ``draft_size``: the long side the image is needed
    at (JPEGs at least twice that are decoded in draft mode, see :func:`~oxford_ir.images.decode_image`);
    None decodes in full. ``cache``: an opened training :class:`~oxford_ir.data.cache.ImageCache` holding every
    path; the augmentation then runs on its pixels.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        crop: SeededCrop,
        *,
        draft_size: int | None = None,
        cache: ImageCache | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.crop = crop
        self.draft_size = draft_size
        self.cache = cache
        self.rows: np.ndarray | None = None
        if cache is not None:
            if cache.kind != "train":
                raise ValueError(f"the image cache {cache.folder} holds {cache.kind} images, not training images")
            self.rows = cache.rows(self.paths)

    def _image(self, index: int):
        if self.cache is not None:
            return self.cache.image(int(self.rows[index]))
        return load_image(self.paths[index], draft_size=self.draft_size, always_draft=self.draft_size is not None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> CropItem:
        """``item`` is an index, or ``(index, seed)`` from :class:`ClassBalancedSampler` (seeded augmentation); a
        plain index gets a seed from torch's global generator (random)."""
        index, seed = item if isinstance(item, tuple) else (item, int(torch.randint(0, 2**62, ()).item()))
        crop, draw = self.crop(self._image(index), int(seed))
        return CropItem(crop, int(self.labels[index]), draw)


class RetrievalDataModule(pl.LightningDataModule):
    """Training and evaluation data of one benchmark and split (see the module doc and ``conf/data``).

    Args:
        data_dir: folder holding the dataset folders (``oxford5k/``, ``paris6k/``, ``synthetic/``), or a
            dataset folder itself.
        benchmark: the training benchmark (oxford5k, roxford5k, paris6k, rparis6k, synthetic, rsynthetic).
        split: ``seed``, ``landmarks`` or ``cross`` (:mod:`oxford_ir.benchmarks.splits`).
        eval_benchmark: the benchmark evaluated; default ``benchmark``; required (and different) for ``cross``.
        held_out_landmarks / n_held_out: the held-out landmarks of the ``landmarks`` split.
        image_size: side of the square training crops.
        eval_image_size: long side of evaluation images (only downscaled; None keeps the original size).
        eval_scales: scales of multi-scale evaluation, for whoever embeds (the loaders give scale 1; the
            module has its own ``model.eval_scales``, which conf/data mirrors here).
        classes_per_batch / images_per_class: P and K of the training batches.
        batches_per_epoch: training batches per epoch and process; None: enough to show each
            landmark image about once.
        use_distractors / distractors_per_batch: add distractor images, each its own label, to every batch.
        eval_batch_size: images per evaluation batch.
        eval_batching / eval_max_shapes: how evaluation images are batched (``bucket``: padded to at most
            ``eval_max_shapes`` input shapes; ``shape``: exact; ``aspect``), as ``extraction.batching`` of
            ``oxford-ir-eval`` (:mod:`oxford_ir.extraction.planning`).
        num_workers / pin_memory / persistent_workers: of every loader (pinning only with an accelerator,
            persistent workers only with ``num_workers > 0``).
        worker_timeout: seconds a loader's worker may take to deliver a batch before the run stops with an error
            naming the cause (a hung or silently failed worker would otherwise stall it forever); None: no limit.
        cache: ``data.cache`` (:class:`CacheConfig`): the preprocessed image cache.
        allow_missing_images: train and evaluate on the images present (a subset) instead of failing.
        download: fetch a missing real dataset in ``prepare_data`` (needs internet).
        seed: of the held-out draw and of the batches.
        augmentation: overrides of :class:`~oxford_ir.data.augmentation.Augmentation`.
        synthetic: parameters of ``write_synthetic_benchmark`` (``seed``, ``n_landmarks``, ...).
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        benchmark: str = "synthetic",
        split: str = "seed",
        eval_benchmark: str | None = None,
        held_out_landmarks: Sequence[str] | None = None,
        n_held_out: int | None = None,
        image_size: int = 224,
        eval_image_size: int | None = 362,
        eval_scales: Sequence[float] = (1.0,),
        classes_per_batch: int = 8,
        images_per_class: int = 4,
        batches_per_epoch: int | None = None,
        use_distractors: bool = True,
        distractors_per_batch: int = 0,
        eval_batch_size: int = 8,
        eval_batching: str = "bucket",
        eval_max_shapes: int = 16,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        worker_timeout: float | None = WORKER_TIMEOUT,
        allow_missing_images: bool = False,
        download: bool = False,
        seed: int = 0,
        augmentation: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        cache: Mapping[str, Any] | None = None,
        decode: str = "cpu",
    ) -> None:
        super().__init__()
        data_dir = str(data_dir)
        held_out_landmarks = None if held_out_landmarks is None else [str(n) for n in _plain(held_out_landmarks)]
        eval_scales = [float(s) for s in _plain(eval_scales)]
        augmentation = dict(_plain(augmentation) or {})
        synthetic = dict(_plain(synthetic) or {})
        cache_config = CacheConfig.from_config(_plain(cache))
        cache = asdict(cache_config)
        # not logged: the run's config is, and Lightning refuses to log a key (seed, eval_scales) that the
        # module's hyperparameters hold with another value
        self.save_hyperparameters(logger=False)

        if split not in SPLIT_KINDS:
            raise ConfigError(f"data.split={split!r} is unknown; choose one of {', '.join(SPLIT_KINDS)}")
        benchmark_spec(benchmark)
        if eval_benchmark is not None:
            benchmark_spec(eval_benchmark)
        if split == "cross" and (eval_benchmark is None or eval_benchmark == benchmark):
            raise ConfigError(
                f"data.split=cross trains on {benchmark} and evaluates on another dataset: set data.eval_benchmark "
                "(e.g. benchmark=paris6k eval_benchmark=roxford5k)"
            )
        for name, value in (("image_size", image_size), ("classes_per_batch", classes_per_batch)):
            _positive_int(value, name)
        _positive_int(images_per_class, "images_per_class")
        _positive_int(eval_batch_size, "eval_batch_size")
        _positive_int(eval_max_shapes, "eval_max_shapes")
        if eval_batching not in EVAL_BATCHINGS:
            raise ConfigError(
                f"data.eval_batching={eval_batching!r}: choose bucket (few input shapes), shape (exact) or aspect"
            )
        _non_negative_int(num_workers, "num_workers")
        if worker_timeout is not None and (isinstance(worker_timeout, bool) or not float(worker_timeout) > 0):
            raise ConfigError(f"data.worker_timeout={worker_timeout!r}: seconds (e.g. 300), or null for no limit")
        _non_negative_int(distractors_per_batch, "distractors_per_batch")
        _non_negative_int(seed, "seed")
        if eval_image_size is not None:
            _positive_int(eval_image_size, "eval_image_size")
        if batches_per_epoch is not None:
            _positive_int(batches_per_epoch, "batches_per_epoch")
        if not eval_scales or not all(s > 0 and math.isfinite(s) for s in eval_scales):
            raise ConfigError(f"data.eval_scales must be a non-empty list of positive numbers, got {eval_scales}")
        if distractors_per_batch and not use_distractors:
            raise ConfigError(
                f"data.distractors_per_batch={distractors_per_batch} needs data.use_distractors=true "
                "(or set distractors_per_batch=0)"
            )
        for name, value in (("pin_memory", pin_memory), ("persistent_workers", persistent_workers)):
            if not isinstance(value, bool):
                raise ConfigError(f"data.{name} must be true or false, got {value!r}")
        self.augmentation = Augmentation.from_config(augmentation)
        self.cache_config = cache_config
        self._gpu_decode = check_decode(decode)
        if self._gpu_decode and cache_config.enabled:
            raise ConfigError(
                "data.decode=gpu and data.cache.enabled=true exclude each other: the cache already holds decoded, "
                "resized pixels; choose one"
            )
        # the device half of training augmentation (colour jitter, normalisation; crops too with decode=gpu)
        self._batch_augmentation = BatchAugmentation(image_size, self.augmentation)
        self._train_decoder = GpuTrainDecoder(image_size, self.augmentation) if self._gpu_decode else None
        self.data_dir = Path(data_dir).expanduser()
        self.eval_benchmark_name = eval_benchmark or benchmark
        self.eval_scales = tuple(eval_scales)
        self._split: TrainSplit | None = None
        self._train_split: TrainSplit | None = None
        self._train_classes: np.ndarray | None = None
        self._train_cache: ImageCache | None = None
        self._eval_cache: ImageCache | None = None

    # -- preparing and loading ------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the synthetic benchmark, or download a real dataset when ``download`` and it is incomplete.

        With ``cache.enabled``, then build or update the image caches: the evaluation one always, the training
        one unless the attached Trainer only validates or tests. Lightning runs this on local rank 0 only, and
        nothing here is kept on ``self``: ``setup`` opens what was built.
        """
        for name in dict.fromkeys([self.hparams.benchmark, self.eval_benchmark_name]):
            folder = benchmark_spec(name).folder
            target = self.data_dir if self.data_dir.name == folder else self.data_dir / folder
            if folder == "synthetic":
                from oxford_ir.benchmarks.synthetic import write_synthetic_benchmark

                write_synthetic_benchmark(target, **self.hparams.synthetic)
            elif self.hparams.download:
                from oxford_ir.benchmarks.download import download_dataset, is_complete

                if not is_complete(target):
                    download_dataset(folder, target.parent)
        if self.cache_config.enabled:
            split = self._split if self._split is not None else self._make_split()
            self._open_eval_cache(split.eval_benchmark)
            if self._fitting():
                self._open_train_cache(self._available(split))

    def setup(self, stage: str | None = None) -> None:
        """Load the benchmarks and build the split (once); for fitting, check the training images.

        With ``cache.enabled``, open the image caches (building them here when ``prepare_data`` did not).
        """
        if self._split is None:
            self._split = self._make_split()
        if stage in (None, "fit") and self._train_split is None:
            self._train_split = self._available(self._split)
            self._train_classes = self._train_split.classes_for_batches(
                self.hparams.classes_per_batch, self.hparams.images_per_class
            )
            if self.hparams.distractors_per_batch > self._train_split.num_distractors:
                raise ConfigError(
                    f"data.distractors_per_batch={self.hparams.distractors_per_batch} but the {self._split.kind} "
                    f"split of {self.hparams.benchmark} has {self._train_split.num_distractors} distractor images; "
                    "lower distractors_per_batch (0 disables them)"
                )
        if self.cache_config.enabled:
            if self._eval_cache is None:
                self._eval_cache = self._open_eval_cache(self._split.eval_benchmark)
            if stage in (None, "fit") and self._train_cache is None:
                self._train_cache = self._open_train_cache(self._train_split)

    def _make_split(self) -> TrainSplit:
        hp = self.hparams
        train_loaded = self._load(hp.benchmark)
        eval_loaded = train_loaded if self.eval_benchmark_name == hp.benchmark else self._load(self.eval_benchmark_name)
        return build_split(
            hp.split,
            full_ground_truth(train_loaded),
            eval_loaded,
            # the held-out settings mean nothing to the other splits: ignored, so that data.split=seed
            # can be set on top of a config made for the landmarks split
            held_out_landmarks=hp.held_out_landmarks if hp.split == "landmarks" else None,
            n_held_out=hp.n_held_out if hp.split == "landmarks" else None,
            seed=hp.seed,
            use_distractors=hp.use_distractors,
        )

    def _fitting(self) -> bool:
        """False only when an attached Trainer validates, tests or predicts (no training cache needed)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return True
        from lightning.pytorch.trainer.states import TrainerFn

        return trainer.state.fn in (None, TrainerFn.FITTING)

    # -- the image caches -------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        """Folder of the image caches: ``cache.dir``, or ``<data_dir>/cache``."""
        configured = self.cache_config.dir
        return Path(configured).expanduser() if configured is not None else self.data_dir / "cache"

    @property
    def train_long_side(self) -> int:
        """Long side of training images as decoded (draft mode) and cached: ``cache.train_long_side`` or
        ``ceil(image_size / sqrt(augmentation.scale[0]))``."""
        configured = self.cache_config.train_long_side
        if configured is not None:
            return configured
        return default_train_long_side(self.hparams.image_size, self.augmentation.scale[0])

    def cache_folder(self, kind: str, benchmark: str) -> Path:
        """The cache folder of ``kind`` ("train" or "eval") for ``benchmark`` (see :func:`cache_folder`)."""
        size = self.train_long_side if kind == "train" else self.hparams.eval_image_size
        return cache_folder(self.cache_dir, kind, benchmark_spec(benchmark).folder, size)

    def _cache_workers(self) -> int:
        configured = self.cache_config.num_workers
        return self.hparams.num_workers if configured is None else configured

    def _open_eval_cache(self, benchmark: Benchmark) -> ImageCache:
        paths = [*benchmark.db_paths, *benchmark.query_paths]
        boxes = [None] * benchmark.n_db + list(benchmark.query_bboxes)
        return build_image_cache(
            self.cache_folder("eval", benchmark.name),
            paths,
            boxes=boxes,
            kind="eval",
            long_side=self.hparams.eval_image_size,
            num_workers=self._cache_workers(),
            progress=self.cache_config.progress,
        )

    def _open_train_cache(self, split: TrainSplit) -> ImageCache:
        return build_image_cache(
            self.cache_folder("train", split.train_benchmark),
            split.paths,
            kind="train",
            long_side=self.train_long_side,
            num_workers=self._cache_workers(),
            progress=self.cache_config.progress,
        )

    def _load(self, name: str) -> Benchmark:
        return load_benchmark(name, self.data_dir, allow_missing_images=self.hparams.allow_missing_images)

    def _available(self, split: TrainSplit) -> TrainSplit:
        missing = split.missing_images()
        if not missing:
            return split
        if not self.hparams.allow_missing_images:
            shown = ", ".join(str(p) for p in missing[:_SHOWN])
            raise DataError(
                f"{len(missing)} of {len(split)} training images of {split.train_benchmark} are missing ({shown}); "
                "download the dataset (data.download=true) or set data.allow_missing_images=true to train on the "
                "images present"
            )
        return split.restrict_to_available()

    # -- what the module and callbacks read -----------------------------------------------------
    @property
    def split(self) -> TrainSplit:
        """The split with its full ground truth (before missing images are dropped)."""
        return self._require(self._split)

    @property
    def train_split(self) -> TrainSplit:
        """The split as trained on: images present on disk only."""
        return self._require(self._train_split, "fit")

    @property
    def eval_benchmark(self) -> Benchmark:
        """The benchmark evaluated during validation and test."""
        return self.split.eval_benchmark

    @property
    def train_labels(self) -> np.ndarray:
        """Label of each training image (landmark classes first, then one label per distractor)."""
        return self.train_split.labels

    @property
    def num_classes(self) -> int:
        """Number of distinct training labels: landmark classes plus one per distractor."""
        return self.train_split.num_classes

    @property
    def train_classes(self) -> np.ndarray:
        """The landmark labels the sampler draws from (classes with at least K images present)."""
        self._require(self._train_split, "fit")
        return self._train_classes

    @property
    def batch_size(self) -> int:
        """Images per training batch: P x K + distractors."""
        hp = self.hparams
        return hp.classes_per_batch * hp.images_per_class + hp.distractors_per_batch

    def _require(self, value, stage: str | None = None):
        if value is None:
            call = f"setup({stage!r})" if stage else "setup()"
            raise RuntimeError(f"{type(self).__name__}: call {call} first (the Trainer does it before using the data)")
        return value

    # -- loaders ----------------------------------------------------------------------------------
    def train_sampler(self) -> ClassBalancedSampler:
        hp = self.hparams
        split = self.train_split
        classes = self.train_classes
        if hp.batches_per_epoch is not None:
            num_batches = hp.batches_per_epoch
        else:
            n_images = int(np.isin(split.labels, classes).sum())
            num_batches = max(1, math.ceil(n_images / (hp.classes_per_batch * hp.images_per_class)))
        return ClassBalancedSampler(
            split.labels,
            classes,
            hp.classes_per_batch,
            hp.images_per_class,
            num_batches,
            distractors=np.flatnonzero(split.is_distractor) if hp.distractors_per_batch else (),
            distractors_per_batch=hp.distractors_per_batch,
            seed=hp.seed,
        )

    def train_dataloader(self, device: torch.device | str | None = None) -> DevicePrefetchLoader:
        """Training batches of B = P x K + distractors images, S x S = ``image_size``, for ``device`` (default: the
        attached trainer's, else the CPU).

        The workers crop, resize and flip each image (``decode=cpu``, :class:`TrainImageDataset`) or only read its
        file (``decode=gpu``); colour jitter and normalisation run on whole batches
        (:class:`~oxford_ir.data.batch_augment.BatchAugmentation`). On the CPU the workers finish their batches:
        ``(images B x 3 x S x S normalised float32, labels B)``. On a CUDA device a background thread finishes the
        next batches there on a side stream while the current step runs
        (:class:`~oxford_ir.data.prefetch.DevicePrefetchLoader`): they come out as
        :class:`~oxford_ir.data.prefetch.ReadyBatch`, which :meth:`on_after_batch_transfer` hands over as
        ``(images, labels)``. On other devices the hook finishes the raw batches."""
        hp = self.hparams
        split = self.train_split
        sampler = self.train_sampler()
        sampler.set_epoch(self._resumed_epoch())
        device = self._training_device(device)
        if self._gpu_decode:  # workers only read the files; the device decodes and augments
            dataset, collate = EncodedTrainDataset(split.paths, split.labels), collate_encoded
            prepare = self._train_decoder.prepare
        else:  # workers crop, resize and flip; the device jitters and normalises the whole batch
            dataset = TrainImageDataset(
                split.paths,
                split.labels,
                SeededCrop(hp.image_size, self.augmentation),
                draft_size=self.train_long_side,
                cache=self._train_cache,
            )
            collate = CropCollate(self._batch_augmentation if device.type == "cpu" else None)
            prepare = self._batch_augmentation.prepare
        return DevicePrefetchLoader(
            dataset,
            batch_size=sampler.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            timeout=float(hp.worker_timeout or 0) if hp.num_workers > 0 else 0,
            prepare=prepare if device.type == "cuda" else None,
            device=device,
        )

    def _resumed_epoch(self) -> int:
        """The epoch the attached trainer's fit loop is about to run (0 without a trainer).

        Lightning creates the training iterator (and with workers, starts drawing the sampler's indices) before it
        calls ``set_epoch`` for the epoch; in a fresh run that is epoch 0 either way, but a run resumed from the
        checkpoint of epoch ``e`` would train epoch ``e + 1`` on the batches of epoch 0. Starting the sampler at
        the fit loop's epoch makes a resumed run draw exactly the batches of an uninterrupted one.
        """
        fit_loop = getattr(getattr(self, "trainer", None), "fit_loop", None)
        progress = getattr(getattr(fit_loop, "epoch_progress", None), "current", None)
        return int(progress.processed) if progress is not None else 0

    def _training_device(self, device: torch.device | str | None) -> torch.device:
        """``device``, else the attached trainer's root device, else the CPU."""
        if device is not None:
            return torch.device(device)
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        root = getattr(strategy, "root_device", None)
        return torch.device(root) if root is not None else torch.device("cpu")

    # -- evaluation: the module plans the loaders (RetrievalModule.evaluation_loaders) ---------------------
    def val_dataloader(self) -> list[DataLoader]:
        """``[database, queries]`` of the evaluation benchmark: planned batches in benchmark order, made by the
        trainer's LightningModule (``evaluation_loaders(self)``), which knows the network they are planned for
        (the datamodule only holds the images and the settings)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        make = getattr(module, "evaluation_loaders", None)
        if make is None:
            raise ConfigError(
                "validation loaders are planned by the LightningModule (evaluation_loaders(datamodule), as "
                f"RetrievalModule); got {type(module).__name__ if module is not None else 'no module'}"
            )
        return make(self)

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def eval_images(self) -> tuple[Dataset, Dataset] | None:
        """``(database, queries)`` test-time datasets of the evaluation benchmark (queries cropped to their
        boxes), reading the image cache when it is enabled; None with ``decode=gpu`` (the loaders then read the
        files' bytes and the device decodes them)."""
        if self._gpu_decode:
            return None
        benchmark = self.eval_benchmark
        size = self.hparams.eval_image_size
        database = ImageListDataset(benchmark.db_paths, size, cache=self._eval_cache)
        queries = ImageListDataset(benchmark.query_paths, size, bboxes=benchmark.query_bboxes, cache=self._eval_cache)
        return database, queries

    @property
    def eval_settings(self) -> dict[str, Any]:
        """How evaluation images are batched and loaded: ``image_size``, ``batch_size``, ``batching``,
        ``max_shapes``, ``num_workers``, ``pin_memory``, ``persistent_workers``, ``worker_timeout``, ``gpu_decode``."""
        hp = self.hparams
        return {
            "image_size": hp.eval_image_size,
            "batch_size": hp.eval_batch_size,
            "batching": hp.get("eval_batching", "bucket"),
            "max_shapes": hp.get("eval_max_shapes", 16),
            "num_workers": hp.num_workers,
            "pin_memory": hp.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            "persistent_workers": hp.persistent_workers and hp.num_workers > 0,
            "worker_timeout": hp.get("worker_timeout", WORKER_TIMEOUT),
            "gpu_decode": self._gpu_decode,
        }

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches are finished on their device and reach the module as ``(images, labels)``: a
        :class:`~oxford_ir.data.prefetch.ReadyBatch` (prepared ahead on a side stream) is handed to the current
        stream, a :class:`~oxford_ir.data.batch_augment.CropBatch` is jittered and normalised, and with
        ``decode=gpu`` the JPEG bytes are decoded and augmented. Evaluation batches pass through (the module
        decodes them with the extraction path)."""
        if isinstance(batch, ReadyBatch):
            batch = batch.wait()
        elif isinstance(batch, CropBatch):
            batch = self._batch_augmentation.prepare(batch)
        elif self._gpu_decode and isinstance(batch, EncodedBatch) and batch.is_train:
            batch = self._train_decoder(batch)
        else:
            return batch
        # Lightning converted the batch for the precision plugin before this hook, when it held no images yet
        trainer = getattr(self, "trainer", None)
        return trainer.precision_plugin.convert_input(batch) if trainer is not None else batch

    def __repr__(self) -> str:
        description = self._split.description if self._split is not None else "not set up"
        return f"{type(self).__name__}({description})"


def _plain(value: Any) -> Any:
    """A Hydra/OmegaConf container as plain Python (lists, dicts), anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
    return int(value)


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"data.{name} must be a non-negative integer, got {value!r}")
    return int(value)
