"""The evaluation half of the DataModule: which benchmarks validation evaluates, their images and their settings.

``data.eval_benchmark`` (or the collection's own val/test rows) is evaluated and monitored (``val/mAP``);
``data.extra_eval_benchmarks`` lists more benchmarks evaluated at the same passes and logged as
``val/<benchmark>/<metric>`` (e.g. SfM-120k's val part monitored and Revisited Oxford/Paris reported beside it,
as cnnimageretrieval-pytorch's training reports both). The LightningModule, which knows its network, plans the
loaders (``RetrievalModule.evaluation_loaders``); this mixin holds the benchmarks, their images (read from the image
cache when it is enabled) and how they are batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.registry import check_benchmark_name
from oxford_ir.data.cache import build_image_cache
from oxford_ir.data.cache_format import ImageCache
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.fs import WORKER_TIMEOUT

_SHOWN = 5


def extra_benchmark_names(names: Any, monitored: str) -> list[str]:
    """``data.extra_eval_benchmarks`` checked: known benchmark names, none twice, not the monitored one."""
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(
            f"data.extra_eval_benchmarks={names!r}: a list of benchmark names, e.g. "
            "data.extra_eval_benchmarks=[roxford5k,rparis6k]"
        )
    names = [str(name) for name in names]
    for name in names:
        check_benchmark_name(name)
    repeated = sorted({name for name in names if names.count(name) > 1 or name == monitored})
    if repeated:
        raise ConfigError(
            f"data.extra_eval_benchmarks lists {', '.join(repeated)} twice or with data.eval_benchmark "
            f"({monitored}); list each evaluated benchmark once"
        )
    return names


class EvaluationData:
    """What validation evaluates: mixed into :class:`~oxford_ir.data.datamodule.RetrievalDataModule`, whose
    ``split`` holds the monitored benchmark and whose ``_load``, ``cache_folder`` and ``_cache_workers`` it uses."""

    def _init_evaluation_data(self, extra_eval_benchmarks: Any) -> None:
        self.extra_eval_names = extra_benchmark_names(extra_eval_benchmarks, self.eval_benchmark_name)
        self._extra_benchmarks: list[Benchmark] | None = None
        self._eval_caches: dict[str, ImageCache] = {}

    @property
    def eval_benchmark_names(self) -> list[str]:
        """The evaluated benchmarks' names as configured, the monitored one first."""
        return [self.eval_benchmark_name, *self.extra_eval_names]

    @property
    def eval_benchmark(self) -> Benchmark:
        """The benchmark evaluated and monitored (``val/mAP``) during validation and test."""
        return self.split.eval_benchmark

    @property
    def eval_benchmarks(self) -> list[Benchmark]:
        """Every evaluated benchmark, the monitored one first."""
        if self._extra_benchmarks is None:
            training = set(map(str, self.split.paths)) if self.extra_eval_names else set()  # once: a million paths
            self._extra_benchmarks = [self._extra_benchmark(name, training) for name in self.extra_eval_names]
        return [self.eval_benchmark, *self._extra_benchmarks]

    def _extra_benchmark(self, name: str, training: set[str]) -> Benchmark:
        """An extra benchmark, loaded; one that shares images with the training split (``training``: its paths) is
        refused (its numbers would measure memorisation)."""
        benchmark = self._load(name)
        shared = [p for p in (*benchmark.db_paths, *benchmark.query_paths) if str(p) in training]
        if shared:
            shown = ", ".join(str(p) for p in shared[:_SHOWN])
            raise DataError(
                f"data.extra_eval_benchmarks: {name} shares {len(shared)} images with the training split of "
                f"{self.hparams.benchmark} ({shown}); evaluate it as data.eval_benchmark with a split that holds "
                "it out (data.split=landmarks or cross), or remove it from extra_eval_benchmarks"
            )
        return benchmark

    # -- the image caches of the evaluated benchmarks ----------------------------------------------------
    def _open_eval_caches(self) -> None:
        """Build or update, and open, the evaluation cache of each evaluated benchmark."""
        for name, benchmark in zip(self.eval_benchmark_names, self.eval_benchmarks, strict=True):
            if name not in self._eval_caches:
                self._eval_caches[name] = self._open_eval_cache(name, benchmark)

    def _open_eval_cache(self, name: str, benchmark: Benchmark) -> ImageCache:
        paths = [*benchmark.db_paths, *benchmark.query_paths]
        boxes = [None] * benchmark.n_db + list(benchmark.query_bboxes)
        return build_image_cache(
            self.cache_folder("eval", name),
            paths,
            boxes=boxes,
            kind="eval",
            long_side=self.hparams.eval_image_size,
            num_workers=self._cache_workers(),
            progress=self.cache_config.progress,
        )

    # -- evaluation: the module plans the loaders (RetrievalModule.evaluation_loaders) ---------------------
    def val_dataloader(self) -> list[DataLoader]:
        """``[database, queries]`` of each evaluated benchmark: planned batches in benchmark order, made by the
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

    def eval_images(self, index: int = 0) -> tuple[Dataset, Dataset] | None:
        """``(database, queries)`` test-time datasets of evaluated benchmark ``index`` (0: the monitored one; queries
        cropped to their boxes), reading the image cache when it is enabled; None with ``decode=gpu`` (the loaders
        then read the files' bytes and the device decodes them)."""
        if self._gpu_decode:
            return None
        benchmark = self.eval_benchmarks[index]
        cache = self._eval_caches.get(self.eval_benchmark_names[index])
        size = self.hparams.eval_image_size
        database = ImageListDataset(benchmark.db_paths, size, cache=cache)
        queries = ImageListDataset(benchmark.query_paths, size, bboxes=benchmark.query_bboxes, cache=cache)
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
