"""The LightningDataModule of retrieval training: class-balanced P x K batches, and the benchmark to evaluate.

Training batches hold ``classes_per_batch`` (P) landmarks x ``images_per_class`` (K) augmented crops, plus
``distractors_per_batch`` distractor images with labels of their own (extra negatives), drawn by
:class:`~oxford_ir.data.sampler.ClassBalancedSampler` from :class:`~oxford_ir.data.datasets.TrainImageDataset`
(``sampler=random``: P x K images shuffled without regard to class,
:class:`~oxford_ir.data.random_sampler.RandomBatchSampler`, for losses with a weight per class).
Validation (and test) is the whole evaluation benchmark, embedded through the one test-time path of
:mod:`oxford_ir.extraction` like ``oxford-ir-eval``: this module holds the benchmark, its images
(:meth:`RetrievalDataModule.eval_images`, reading the image cache when enabled) and their settings
(:attr:`RetrievalDataModule.eval_settings`); the LightningModule, which knows its network, plans the
batches (bucket shapes, the network's stride) and builds the two loaders ``[database, queries]``
(``RetrievalModule.val_dataloader``), then evaluates with the published protocol. Both benchmarks are prepared
(written, downloaded) as ``oxford-ir-eval`` prepares them (:mod:`oxford_ir.benchmarks.prepare`).

Image sizes: ``image_size`` is the side of the square training crops and ``eval_image_size`` the long side
of evaluation images. cnnimageretrieval-pytorch trains at 362 and tests at 1024 (published numbers);
smaller values here are for speed.

Image cache (``cache.enabled``, :mod:`oxford_ir.data.cache`, :class:`~oxford_ir.data.cache.CacheConfig`):
training images are decoded once to a long side of ``cache.train_long_side`` (default
``ceil(image_size / sqrt(augmentation.scale[0]))``: the smallest random crop is not upscaled) and augmented from
there; evaluation images (queries cropped) once at ``eval_image_size``, bit-identical to the uncached ones.
``prepare_data`` (local rank 0) builds or updates the caches under ``cache.dir`` (default ``<data_dir>/cache``),
``setup`` (every process) opens them. Without the cache, training JPEGs are still decoded in draft mode when at
least twice that long side.

Under DDP, each process draws its own share of the training batches (see
:class:`~oxford_ir.data.sampler.ClassBalancedSampler`); Lightning gives the two evaluation loaders a
``DistributedSampler`` over their planned batches (it pads with repeated batches), and the index of each image
lets the module gather the embeddings and drop the repeats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.collection_split import check_split_settings, collection_split
from oxford_ir.benchmarks.prepare import prepare_benchmark
from oxford_ir.benchmarks.registry import dataset_folder, load_benchmark, read_collection
from oxford_ir.benchmarks.splits import TrainSplit, build_split, full_ground_truth
from oxford_ir.config import to_plain
from oxford_ir.data.augmentation import Augmentation, SeededCrop
from oxford_ir.data.batch_augment import BatchAugmentation, CropBatch, CropCollate
from oxford_ir.data.cache import CacheConfig, build_image_cache, cache_folder, default_train_long_side
from oxford_ir.data.cache_format import ImageCache
from oxford_ir.data.config_values import non_negative_int, positive_int
from oxford_ir.data.datasets import TrainImageDataset
from oxford_ir.data.eval_data import EvaluationData
from oxford_ir.data.gpu_decode import (
    EncodedBatch,
    EncodedTrainDataset,
    GpuTrainDecoder,
    check_decode,
    collate_encoded,
)
from oxford_ir.data.held_out import validation_batches
from oxford_ir.data.overlap_exclusion import OverlapGuard
from oxford_ir.data.prefetch import DevicePrefetchLoader, ReadyBatch
from oxford_ir.data.random_sampler import RandomBatchSampler
from oxford_ir.data.sampler import ClassBalancedSampler
from oxford_ir.data.tuple_batches import TupleSampler, pool_sampler
from oxford_ir.data.tuple_mining import PoolSettings
from oxford_ir.data.whole_images import TRAIN_IMAGES, WholeImageDataset, collate_whole_images
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.fs import WORKER_TIMEOUT, share_tensors_by_name

log = logging.getLogger(__name__)

_SHOWN = 5
#: ``data.sampler`` values: P x K class-balanced batches, or plain shuffled ones
SAMPLERS = ("balanced", "random")
#: ``data.eval_batching`` values (:mod:`oxford_ir.extraction.planning` implements them)
EVAL_BATCHINGS = ("bucket", "shape", "aspect")


class RetrievalDataModule(EvaluationData, pl.LightningDataModule):
    """Training and evaluation data of one benchmark and split (see the module doc and ``conf/data``).

    Args:
        data_dir: folder holding the dataset folders (``oxford5k/``, ``paris6k/``, ``synthetic/``), or a
            dataset folder itself.
        benchmark: the training benchmark (oxford5k, roxford5k, paris6k, rparis6k, synthetic, rsynthetic), or
            ``collection:<folder or manifest>`` (``split=collection``: :mod:`oxford_ir.benchmarks.collection_split`).
        split: ``seed``, ``landmarks`` or ``cross`` (:mod:`oxford_ir.benchmarks.splits`), or ``collection``.
        eval_benchmark: the benchmark evaluated and monitored (``val/mAP``); default ``benchmark``; required (and
            different) for ``cross``.
        extra_eval_benchmarks: more benchmarks evaluated at each validation, logged as ``val/<name>/<metric>``
            (:mod:`oxford_ir.data.eval_data`).
        held_out_landmarks / n_held_out: the held-out landmarks of the ``landmarks`` split.
        image_size: side of the square training crops; with ``train_images=whole``, the long side of the images.
        train_images: ``crop`` (augmented square crops) or ``whole`` (each image whole at its own aspect ratio,
            not augmented, as cnnimageretrieval-pytorch trains: :mod:`oxford_ir.data.whole_images`).
        eval_image_size: long side of evaluation images (only downscaled; None keeps the original size).
        eval_scales: deprecated and ignored (a warning is logged): the scales of multi-scale evaluation are the
            module's ``model.eval_scales``.
        classes_per_batch / images_per_class: P and K of the training batches.
        batches_per_epoch: training batches per epoch and process; None: enough to show each
            landmark image about once.
        val_loss_batches: P x K batches of the evaluated landmarks' images for ``val/loss`` (0: none; held_out).
        use_distractors / distractors_per_batch: add distractor images, each its own label, to every batch.
        sampler: ``balanced`` (P classes x K images + distractors a batch) or ``random``: P x K images drawn
            uniformly, without replacement within an epoch (:mod:`oxford_ir.data.random_sampler`; distractors are
            drawn with the rest when ``distractors_per_batch`` > 0), for losses with a weight per class.
        eval_batch_size: images per evaluation batch.
        eval_batching / eval_max_shapes: how evaluation images are batched (``bucket``: padded to at most
            ``eval_max_shapes`` input shapes; ``shape``: exact; ``aspect``), as ``extraction.batching`` of
            ``oxford-ir-eval`` (:mod:`oxford_ir.extraction.planning`).
        num_workers / pin_memory / persistent_workers: of every loader (pinning only with an accelerator,
            persistent workers only with ``num_workers > 0``).
        worker_timeout: seconds a loader's worker may take to deliver a batch before the run stops with an error
            naming the cause (a hung or silently failed worker would otherwise stall it forever); None: no limit.
        cache: ``data.cache`` (:class:`~oxford_ir.data.cache.CacheConfig`): the preprocessed image cache.
        allow_missing_images: train and evaluate on the images present (a subset) instead of failing.
        download: fetch a missing real dataset in ``prepare_data`` (needs internet).
        download_parts: the GLDv2 TARs that ``download`` fetches for ``gldv2[:options]`` (``"0-19"``; None: all).
        seed: of the held-out draw and of the batches.
        augmentation: overrides of :class:`~oxford_ir.data.augmentation.Augmentation`.
        synthetic: the synthetic benchmark: a ``preset`` (default ``default``) and parameters of
            ``write_synthetic_benchmark`` on top of it (``seed``, ``n_landmarks``, ...).
        exclude_overlap / overlap: the train/test overlap guard (:mod:`oxford_ir.data.overlap_exclusion`).
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        benchmark: str = "synthetic",
        split: str = "seed",
        eval_benchmark: str | None = None,
        extra_eval_benchmarks: Sequence[str] | None = None,
        held_out_landmarks: Sequence[str] | None = None,
        n_held_out: int | None = None,
        image_size: int = 224,
        eval_image_size: int | None = 362,
        eval_scales: Any = None,
        classes_per_batch: int = 8,
        images_per_class: int = 4,
        batches_per_epoch: int | None = None,
        val_loss_batches: int = 4,
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
        download_parts: str | None = None,
        seed: int = 0,
        augmentation: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        cache: Mapping[str, Any] | None = None,
        decode: str = "cpu",
        exclude_overlap: bool | str = False,
        overlap: Mapping[str, Any] | None = None,
        mining: str = "batch",
        pool: Mapping[str, Any] | None = None,
        sampler: str = "balanced",
        train_images: str = "crop",
    ) -> None:
        super().__init__()
        data_dir = str(data_dir)
        held_out_landmarks = None if held_out_landmarks is None else [str(n) for n in to_plain(held_out_landmarks)]
        augmentation = dict(to_plain(augmentation) or {})
        synthetic = dict(to_plain(synthetic) or {})
        cache_config = CacheConfig.from_config(to_plain(cache))
        cache = asdict(cache_config)
        if eval_scales is not None:
            log.warning(
                "data.eval_scales=%s is deprecated and ignored: the scales of multi-scale evaluation are the model's; "
                "set model.eval_scales instead (e.g. model.eval_scales=[1.0,0.7071]) and remove data.eval_scales",
                to_plain(eval_scales),
            )
        # not logged: the run's config is, and Lightning refuses to log a key (seed) that the module's
        # hyperparameters hold with another value
        self.save_hyperparameters(ignore=["eval_scales"], logger=False)

        check_split_settings(split, benchmark, eval_benchmark)
        for name, value in (("image_size", image_size), ("classes_per_batch", classes_per_batch)):
            positive_int(value, name)
        positive_int(images_per_class, "images_per_class")
        positive_int(eval_batch_size, "eval_batch_size")
        positive_int(eval_max_shapes, "eval_max_shapes")
        if eval_batching not in EVAL_BATCHINGS:
            raise ConfigError(
                f"data.eval_batching={eval_batching!r}: choose bucket (few input shapes), shape (exact) or aspect"
            )
        non_negative_int(num_workers, "num_workers")
        if worker_timeout is not None and (isinstance(worker_timeout, bool) or not float(worker_timeout) > 0):
            raise ConfigError(f"data.worker_timeout={worker_timeout!r}: seconds (e.g. 300), or null for no limit")
        non_negative_int(distractors_per_batch, "distractors_per_batch")
        non_negative_int(val_loss_batches, "val_loss_batches")
        non_negative_int(seed, "seed")
        if sampler not in SAMPLERS:
            raise ConfigError(f"data.sampler={sampler!r}: choose {' or '.join(SAMPLERS)}")
        if eval_image_size is not None:
            positive_int(eval_image_size, "eval_image_size")
        if batches_per_epoch is not None:
            positive_int(batches_per_epoch, "batches_per_epoch")
        if distractors_per_batch and not use_distractors:
            raise ConfigError(
                f"data.distractors_per_batch={distractors_per_batch} needs data.use_distractors=true "
                "(or set distractors_per_batch=0)"
            )
        for name, value in (("pin_memory", pin_memory), ("persistent_workers", persistent_workers)):
            if not isinstance(value, bool):
                raise ConfigError(f"data.{name} must be true or false, got {value!r}")
        if train_images not in TRAIN_IMAGES:
            raise ConfigError(f"data.train_images={train_images!r}: choose crop (augmented squares) or whole images")
        if mining not in ("batch", "pool"):
            raise ConfigError(f"data.mining={mining!r}: choose batch (P x K batches, mined within) or pool (tuples)")
        if mining == "pool" and sampler == "random":
            raise ConfigError("data.sampler=random and data.mining=pool exclude each other (pool mining draws batches)")
        #: data.mining=pool: cnnimageretrieval-pytorch's tuples (oxford_ir/data/tuple_batches.py); None: P x K batches
        self.pool_settings = PoolSettings.from_config(to_plain(pool)) if mining == "pool" else None
        self.augmentation = Augmentation.from_config(augmentation)
        self.cache_config = cache_config
        self._gpu_decode = check_decode(decode)
        if train_images == "whole" and (self._gpu_decode or cache_config.enabled):
            raise ConfigError("data.train_images=whole decodes each image whole in the workers: set "
                              "data.decode=cpu and data.cache.enabled=false (they serve square crops)")  # fmt: skip
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
        self._init_evaluation_data(to_plain(extra_eval_benchmarks))
        self._split: TrainSplit | None = None
        self._train_split: TrainSplit | None = None
        self._whitening_split: TrainSplit | None = None
        #: the validation loss's images and sampler, or why there are none (None: not looked at yet)
        self._val_loss: tuple[TrainSplit, ClassBalancedSampler] | str | None = None
        self._train_classes: np.ndarray | None = None
        self._train_cache: ImageCache | None = None
        self.overlap_guard = OverlapGuard(exclude_overlap, to_plain(overlap))  # its finder: attached by oxford-ir-train

    # -- preparing and loading ------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Make sure the training and evaluation benchmarks are under ``data_dir``
        (:func:`~oxford_ir.benchmarks.prepare.prepare_benchmark`): write the synthetic benchmark (``synthetic``), or
        download a real dataset when ``download`` and it is incomplete; a missing one is an error naming the fix.

        With ``cache.enabled``, then build or update the image caches: the evaluation one always, the training
        one unless the attached Trainer only validates or tests. Lightning runs this on local rank 0 only, and
        nothing here is kept on ``self``: ``setup`` opens what was built.
        """
        for name in dict.fromkeys([self.hparams.benchmark, *self.eval_benchmark_names]):
            prepare_benchmark(
                name,
                self.data_dir,
                download=self.hparams.download,
                download_parts=self.hparams.get("download_parts"),
                synthetic=self.hparams.synthetic,
                key="data.synthetic",
            )
        if self.cache_config.enabled:
            split = self._split if self._split is not None else self._make_split()
            self._open_eval_cache(self.eval_benchmark_name, split.eval_benchmark)
            for name in self.extra_eval_names:
                self._open_eval_cache(name, self._load(name))
            if self._fitting():
                self._open_train_cache(self._available(split))

    def setup(self, stage: str | None = None) -> None:
        """Load the benchmarks and build the split (once); for fitting, check the training images.

        With ``cache.enabled``, open the image caches (building them here when ``prepare_data`` did not).
        """
        if self._split is None:
            self._split = self._make_split()
        if stage in (None, "fit") and self._train_split is None:
            self._train_split = self.overlap_guard.apply(self._available(self._split), self.eval_benchmarks[1:])
            if self.pool_settings is None:  # P x K batches need P classes of K images
                self._train_classes = self._train_split.classes_for_batches(
                    self.hparams.classes_per_batch, self.hparams.images_per_class
                )
            else:  # pool mining draws its own tuples (any class with a positive pair)
                labels = self._train_split.labels[~self._train_split.is_distractor]
                self._train_classes = np.unique(labels)
            if self.hparams.distractors_per_batch > self._train_split.num_distractors:
                raise ConfigError(
                    f"data.distractors_per_batch={self.hparams.distractors_per_batch} but the {self._split.kind} "
                    f"split of {self.hparams.benchmark} has {self._train_split.num_distractors} distractor images; "
                    "lower distractors_per_batch (0 disables them)"
                )
        if self.cache_config.enabled:
            self._open_eval_caches()
            if stage in (None, "fit") and self._train_cache is None:
                self._train_cache = self._open_train_cache(self._train_split)

    def _make_split(self) -> TrainSplit:
        hp = self.hparams
        if hp.split == "collection":  # oxford_ir/benchmarks/collection_split.py
            keys = ("held_out_landmarks", "n_held_out", "seed", "allow_missing_images")
            other = None if self.eval_benchmark_name == hp.benchmark else self._load(self.eval_benchmark_name)
            collection = read_collection(hp.benchmark, self.data_dir)  # gldv2[:options] lies under data_dir
            return collection_split(collection, other, name=hp.benchmark, **{key: hp[key] for key in keys})
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
        """The cache folder of ``kind`` ("train" or "eval") for ``benchmark``
        (see :func:`~oxford_ir.data.cache.cache_folder`)."""
        size = self.train_long_side if kind == "train" else self.hparams.eval_image_size
        return cache_folder(self.cache_dir, kind, dataset_folder(benchmark), size)

    def _cache_workers(self) -> int:
        configured = self.cache_config.num_workers
        return self.hparams.num_workers if configured is None else configured

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
    def whitening_split(self) -> TrainSplit:
        """The training split a post-hoc whitening is learned from: as trained on (images present on disk), also
        when this datamodule was only set up to validate or test."""
        if self._train_split is not None:
            return self._train_split
        if self._whitening_split is None:
            self._whitening_split = self._available(self.split)
        return self._whitening_split

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
        """Images per training batch: P x K + distractors (``sampler=random``: P x K)."""
        hp = self.hparams
        distractors = 0 if hp.get("sampler") == "random" else hp.distractors_per_batch
        return hp.classes_per_batch * hp.images_per_class + distractors

    def _require(self, value, stage: str | None = None):
        if value is None:
            call = f"setup({stage!r})" if stage else "setup()"
            raise RuntimeError(f"{type(self).__name__}: call {call} first (the Trainer does it before using the data)")
        return value

    @property
    def tuple_layout(self) -> PoolSettings | None:
        """With ``mining=pool``: the tuples of a batch (``tuples_per_batch``, ``nnum``) the module's loss reads."""
        return self.pool_settings

    # -- loaders ----------------------------------------------------------------------------------
    def train_sampler(self) -> TupleSampler | ClassBalancedSampler:
        hp = self.hparams
        split = self.train_split
        classes = self.train_classes
        if self.pool_settings is not None:  # data.mining=pool
            embed = self._embed_for_mining
            return pool_sampler(split, hp.benchmark, self.data_dir, self.pool_settings, hp.seed, embed)
        if hp.get("sampler") == "random":  # every landmark image, and the distractors when batches take them
            pool = np.flatnonzero(~split.is_distractor | (split.is_distractor & bool(hp.distractors_per_batch)))
            size = self.batch_size
            num_batches = hp.batches_per_epoch or max(1, len(pool) // size)
            return RandomBatchSampler(pool, size, num_batches, seed=hp.seed)
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

        The workers crop, resize and flip each image (``decode=cpu``,
        :class:`~oxford_ir.data.datasets.TrainImageDataset`) or only read its file (``decode=gpu``); colour jitter
        and normalisation run on whole batches (:class:`~oxford_ir.data.batch_augment.BatchAugmentation`). On the
        CPU the workers finish their batches: ``(images B x 3 x S x S normalised float32, labels B)``. On a CUDA
        device a background thread finishes the next batches there on a side stream while the current step runs
        (:class:`~oxford_ir.data.prefetch.DevicePrefetchLoader`): they come out as
        :class:`~oxford_ir.data.prefetch.ReadyBatch`, which :meth:`on_after_batch_transfer` hands over as
        ``(images, labels)``. On other devices the hook finishes the raw batches."""
        sampler = self.train_sampler()
        sampler.set_epoch(self._resumed_epoch())
        return self._balanced_loader(self.train_split, sampler, device, self._train_cache, self.hparams.num_workers)

    def val_loss_dataloader(self, device: torch.device | str | None = None) -> DevicePrefetchLoader | None:
        """The batches of ``val/loss`` (:func:`~oxford_ir.data.held_out.validation_batches`) as training batches
        for ``device``, in this process; the global random state is left alone (a resume stays exact). None, the
        reason logged once, when the split holds no such images."""
        hp = self.hparams
        if self._val_loss is None:
            self._val_loss = validation_batches(
                self.split, hp.classes_per_batch, hp.images_per_class, hp.get("val_loss_batches", 0), hp.seed
            )
            if isinstance(self._val_loss, str):
                log.info("val/loss is not logged: %s", self._val_loss)
        if isinstance(self._val_loss, str):
            return None
        held, sampler = self._val_loss
        generator = torch.Generator().manual_seed(int(hp.seed))  # the loader's base seed: not the global RNG
        return self._balanced_loader(held, sampler, device, None, 0, generator=generator)

    def _balanced_loader(self, split: TrainSplit, sampler: ClassBalancedSampler, device: Any, cache: ImageCache | None,
                         num_workers: int, **loader: Any) -> DevicePrefetchLoader:  # fmt: skip
        """Batches of ``sampler`` over ``split``'s images, augmented as training batches, for ``device``."""
        hp = self.hparams
        device = self._training_device(device)
        if hp.get("train_images", "crop") == "whole":  # decoded whole in the workers, batches of different shapes
            dataset, collate = WholeImageDataset(split.paths, split.labels, hp.image_size), collate_whole_images
            prepare = None
        elif self._gpu_decode:  # workers only read the files; the device decodes and augments
            dataset, collate = EncodedTrainDataset(split.paths, split.labels), collate_encoded
            prepare = self._train_decoder.prepare
        else:  # workers crop, resize and flip; the device jitters and normalises the whole batch
            dataset = TrainImageDataset(
                split.paths,
                split.labels,
                SeededCrop(hp.image_size, self.augmentation),
                draft_size=self.train_long_side,
                cache=cache,
            )
            collate = CropCollate(self._batch_augmentation if device.type == "cpu" else None)
            prepare = self._batch_augmentation.prepare
        if num_workers > 0:
            share_tensors_by_name()  # a stopped worker cannot block the handover of a batch past the timeout
        return DevicePrefetchLoader(
            dataset,
            batch_size=sampler.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            persistent_workers=hp.persistent_workers and num_workers > 0,
            timeout=float(hp.worker_timeout or 0) if num_workers > 0 else 0,
            prepare=prepare if device.type == "cuda" else None,
            device=device,
            **loader,
        )

    def _embed_for_mining(self, paths: Sequence[Path]) -> torch.Tensor:
        """Whole training images embedded by the trainer's module as it is now (its ``embed_images``), for mining."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if not hasattr(module, "embed_images"):
            raise ConfigError("data.mining=pool embeds images with the trainer's module (RetrievalModule.embed_images)")
        keys = ("batch_size", "batching", "max_shapes", "num_workers", "worker_timeout")
        settings = {key: self.eval_settings[key] for key in keys}
        decode = "gpu" if self._gpu_decode else "cpu"
        return module.embed_images(paths, image_size=self.hparams.image_size, decode=decode, **settings)

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
