"""Validation of the training module by the benchmarks' retrieval protocol: the loaders, the embeddings of each
pass, and their evaluation.

Validation embeds each of the datamodule's evaluation benchmarks through the one test-time path
(:mod:`oxford_ir.extraction`), exactly as ``oxford-ir-eval`` does: the datamodule's ``val_dataloader`` asks
:meth:`BenchmarkValidation.evaluation_loaders`, which plans the batches for this module's network (bucket shapes,
padding support) from the datamodule's ``eval_images()`` and ``eval_settings``. Loaders ``2k`` and ``2k + 1`` yield
the planned batches of the database and of the (cropped) queries of benchmark ``k`` (``data.eval_benchmark`` may
list several: SfM-120k's val part and Revisited Oxford at once); with a post-hoc whitening, the last loader yields
the training images it is learned from. Embeddings are gathered across processes, placed by benchmark index,
ranked and evaluated once per epoch with each benchmark's own protocol and logged as ``val/<benchmark>/<metric>``;
the FIRST benchmark's selection metric is ``val/mAP`` (what checkpoints, early stopping and sweeps select on).
The results are kept as :attr:`BenchmarkValidation.last_evaluations` (one :class:`Evaluation` per benchmark;
``last_evaluation`` is the first) for callbacks and the training report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.data.gpu_decode import GpuEvalDecoder
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.benchmark import benchmark_loaders, image_list_loader
from oxford_ir.extraction.distributed import all_failures, gather_rows
from oxford_ir.extraction.embedding import embed_loader_item
from oxford_ir.extraction.whitening import Whitening
from oxford_ir.extraction.whitening_source import WhiteningSample, check_disjoint, fit_whitening, split_sample
from oxford_ir.models.validation_loss import held_out_loss

#: the metric logged as ``val/mAP`` (what checkpoints and sweeps select on), per protocol
SELECTION_METRIC = {"original": "mAP", "revisited": "M/mAP"}


@dataclass(frozen=True, eq=False)  # arrays and tensors: compared by identity
class Evaluation:
    """One evaluated validation pass: what callbacks (retrieval grid, per-query table) and the report read."""

    #: the benchmark evaluated: the datamodule's, or its subset embedded by a deliberately shortened pass
    benchmark: Benchmark
    #: database indices ranked for each query, best first (n_db x n_queries)
    ranks: np.ndarray
    #: the protocol's metrics (``mAP``, ``mP@k``; ``E/``, ``M/``, ``H/`` for the revisited protocol)
    metrics: dict[str, float]
    #: per-query AP arrays (``AP``, or ``E/AP``, ``M/AP``, ``H/AP``)
    per_query: dict[str, np.ndarray]
    #: database and query embeddings (float32, on the CPU, usable outside the validation loop)
    db: torch.Tensor
    queries: torch.Tensor
    #: with a post-hoc whitening (which ``metrics`` include): the metrics of the network alone
    unwhitened: dict[str, float] | None = None


def assemble_by_index(indices: torch.Tensor, embeddings: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of every process placed at their benchmark index: ``(size x D float32 embeddings, bool mask of
    indices present)``, the same on every process (:func:`oxford_ir.extraction.distributed.gather_rows`).

    Processes may hold different numbers of rows. An index seen twice (a DistributedSampler pads the last batch with
    repeated images) is one image embedded twice; either copy is kept. An index outside the benchmark is a
    DataError on every process.
    """
    indices = indices.long().reshape(-1).cpu()
    outside = indices[(indices < 0) | (indices >= size)]
    # every process learns of a bad index, so that all raise together instead of waiting in the gather
    failures = all_failures([(int(outside[0]), "outside")] if outside.numel() else [])
    if failures:
        raise DataError(f"validation batch index {failures[0][0]} is outside the {size} images of the benchmark list")
    return gather_rows(indices, embeddings.cpu(), size)


def shortened_pass(trainer: pl.Trainer) -> str | None:
    """Why this validation pass deliberately left images out, or None for a full pass."""
    if trainer.sanity_checking:
        return f"the sanity check (num_sanity_val_steps={trainer.num_sanity_val_steps})"
    if trainer.fast_dev_run:
        return f"fast_dev_run={trainer.fast_dev_run}"
    if trainer.overfit_batches:
        return f"overfit_batches={trainer.overfit_batches}"
    limit = trainer.limit_val_batches
    if isinstance(limit, int) or limit < 1.0:
        return f"limit_val_batches={limit}"
    return None


def evaluation_benchmarks(datamodule: Any) -> list[Benchmark]:
    """The datamodule's evaluated benchmarks, the monitored one first: ``eval_benchmarks`` when it has several,
    else ``[eval_benchmark]``."""
    benchmarks = list(getattr(datamodule, "eval_benchmarks", None) or [datamodule.eval_benchmark])
    for benchmark in benchmarks:
        if not isinstance(benchmark, Benchmark):
            raise ConfigError(f"the datamodule's eval_benchmark is a {type(benchmark).__name__}, not a Benchmark")
    return benchmarks


class BenchmarkValidation:
    """The validation half of :class:`~oxford_ir.models.module.RetrievalModule` (a LightningModule mixin): it
    reads ``self.embedder``, ``self.hparams`` (``eval_scales``, ``kappas``, ``channels_last``, ``whitening``) and
    ``self._whitening_settings``."""

    def _init_validation(self) -> None:
        self._val_outputs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # set by evaluation_loaders: per benchmark the database and query plans; the device decoder (decode=gpu),
        # and the batch size that bucket batches are filled up to on a GPU (one cuDNN plan per bucket)
        self._eval_plans: tuple[Any, Any] | None = None
        self._all_eval_plans: list[tuple[Any, Any]] = []
        self._eval_decoder: GpuEvalDecoder | None = None
        self._eval_fill_to: int | None = None
        #: the last evaluation of each benchmark, for callbacks; empty when the last pass was not evaluated
        self.last_evaluations: list[Evaluation] = []
        #: with a whitening: the images it is learned from (set with the loaders), and the last one learned
        self._whitening_sample: WhiteningSample | None = None
        self._whitening_image_size: int | None = None
        self.last_whitening: Whitening | None = None

    @property
    def last_evaluation(self) -> Evaluation | None:
        """The last evaluation of the monitored (first) benchmark; None when the last pass was not evaluated."""
        return self.last_evaluations[0] if self.last_evaluations and self.last_evaluations[0] else None

    @property
    def _whitening_loader(self) -> int:
        """Index of the whitening's loader: after the two loaders of each benchmark."""
        return 2 * len(self._all_eval_plans)

    def evaluation_loaders(self, datamodule: Any) -> list[Any]:
        """``[database, queries]`` loaders of each evaluated benchmark (then, with a whitening, its training images),
        planned for this network: what the datamodule's ``val_dataloader`` returns.

        The datamodule holds the benchmarks, their images and settings; the plan needs the network (can it pool
        padded images?), so it is made here, with the extraction path of ``oxford-ir-eval``.
        """
        datamodule = self._eval_datamodule(datamodule)
        settings = dict(datamodule.eval_settings)
        benchmarks = evaluation_benchmarks(datamodule)
        loaders: list[Any] = []
        self._all_eval_plans = []
        for k, benchmark in enumerate(benchmarks):
            images = datamodule.eval_images() if k == 0 else datamodule.eval_images(k)
            pair, plans = benchmark_loaders(self.embedder, benchmark, images=images, **settings)
            loaders.extend(pair)
            self._all_eval_plans.append(plans)
        self._eval_plans = self._all_eval_plans[0]
        self._eval_decoder = GpuEvalDecoder(settings["image_size"]) if settings["gpu_decode"] else None
        bucketed = self._eval_plans[0].mode == "bucket"
        self._eval_fill_to = settings["batch_size"] if bucketed and self.device.type == "cuda" else None
        self._whitening_sample = None
        if self._whitening_settings is not None:
            self._whitening_sample = split_sample(datamodule.whitening_split, self._whitening_settings)
            what = f"the {self._whitening_settings.kind} whitening ({self._whitening_sample.description})"
            fix = (
                "The seed split trains on the evaluated queries' positives: use data.split=landmarks (or cross) to "
                "validate with a whitening, or whitening=none"
            )
            check_disjoint(self._whitening_sample.paths, benchmarks, what, fix)
            self._whitening_image_size = settings["image_size"]
            keys = ("batch_size", "batching", "max_shapes", "num_workers", "pin_memory", "persistent_workers")
            loader, _ = image_list_loader(
                self.embedder,
                self._whitening_sample.paths,
                image_size=settings["image_size"],
                gpu_decode=settings["gpu_decode"],
                worker_timeout=settings["worker_timeout"],
                **{key: settings[key] for key in keys},
            )
            loaders.append(loader)
        return loaders

    def on_validation_epoch_start(self) -> None:
        n_loaders = 2 * max(1, len(self._all_eval_plans))
        self._val_outputs = {loader: ([], []) for loader in range(n_loaders)}
        if self._whitening_sample is not None:
            self._val_outputs[self._whitening_loader] = ([], [])

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx not in self._val_outputs:
            raise ConfigError(
                f"validation dataloader {dataloader_idx}: the module expects database (2k) and queries (2k + 1) of "
                f"each of its {max(1, len(self._all_eval_plans))} benchmark(s) and, with a whitening, its training "
                "images (last)"
            )
        indices, vectors = embed_loader_item(
            self.embedder,
            batch,
            self.hparams.eval_scales,
            channels_last=bool(self.hparams.get("channels_last", False)),
            fill_to=self._eval_fill_to,
            decoder=self._eval_decoder,
        )
        indices_list, vectors_list = self._val_outputs[dataloader_idx]
        indices_list.append(indices.to(self.device).reshape(-1))
        vectors_list.append(vectors.to(self.device))

    def _local_rows(self, loader: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (indices, embeddings) of this loader."""
        indices_list, vectors_list = self._val_outputs.get(loader, ([], []))
        dim = int(getattr(self.embedder, "embedding_dim", 0) or (vectors_list[0].shape[1] if vectors_list else 0))
        indices = torch.cat(indices_list) if indices_list else torch.empty(0, dtype=torch.long, device=self.device)
        vectors = torch.cat(vectors_list) if vectors_list else torch.empty(0, dim, device=self.device)
        return indices, vectors

    def _eval_datamodule(self, datamodule: Any = None) -> Any:
        """``datamodule`` (default: the trainer's); it must have ``eval_benchmark``, ``eval_images()`` and
        ``eval_settings`` (and, to evaluate several benchmarks, ``eval_benchmarks`` and ``eval_images(k)``)."""
        if datamodule is None:
            datamodule = getattr(self.trainer, "datamodule", None)
        missing = [a for a in ("eval_benchmark", "eval_images", "eval_settings") if not hasattr(datamodule, a)]
        if datamodule is None or missing:
            raise ConfigError(
                "validation needs a datamodule with eval_benchmark (the Benchmark), eval_images() and eval_settings "
                f"(as RetrievalDataModule); got {type(datamodule).__name__ if datamodule is not None else 'none'}"
            )
        return datamodule

    def on_validation_epoch_end(self) -> None:
        """Gather, place by index, rank, evaluate each benchmark with its protocol once, log the whole table.

        Every process gathers the full set and computes the same numbers (ranking is one matrix product);
        they are logged with a max-reduction across processes, the identity on equal values, so Lightning
        treats them as synchronised and checkpointing agrees on every rank.
        """
        loss = held_out_loss(self, self._eval_datamodule())
        if loss is not None:
            self.log("val/loss", loss, sync_dist=True)
        benchmarks = evaluation_benchmarks(self._eval_datamodule())
        rows = [(self._local_rows(2 * k), self._local_rows(2 * k + 1)) for k in range(len(benchmarks))]
        whitening = self._validation_whitening(self._local_rows(2 * len(benchmarks)))
        self._val_outputs = {}
        logged: dict[str, float] = {}
        evaluations: list[Evaluation | None] = []
        for k, (benchmark, (db_rows, q_rows)) in enumerate(zip(benchmarks, rows, strict=True)):
            evaluation = self._evaluate_rows(benchmark, db_rows, q_rows, whitening)
            evaluations.append(evaluation)
            if evaluation is None:
                continue
            name, selection = evaluation.benchmark.name, SELECTION_METRIC[evaluation.benchmark.protocol]
            if evaluation.unwhitened is not None:  # val/ is the whitened model; val/unwhitened/ the network alone
                unwhitened = evaluation.unwhitened
                logged.update({f"val/unwhitened/{name}/{key}": float(value) for key, value in unwhitened.items()})
                if k == 0:
                    logged["val/unwhitened/mAP"] = float(unwhitened[selection])
            logged.update({f"val/{name}/{key}": float(value) for key, value in evaluation.metrics.items()})
            if k == 0:
                logged["val/mAP"] = float(evaluation.metrics[selection])
        if logged:
            self.log_dict(logged, sync_dist=True, reduce_fx="max")
        self.last_evaluations = evaluations if evaluations and evaluations[0] is not None else []

    def _evaluate_rows(
        self,
        benchmark: Benchmark,
        db_rows: tuple[torch.Tensor, torch.Tensor],
        q_rows: tuple[torch.Tensor, torch.Tensor],
        whitening: Whitening | None,
    ) -> Evaluation | None:
        """One benchmark's evaluation from this pass's rows (None: a shortened pass left no query with a positive)."""
        db, db_present = assemble_by_index(*db_rows, benchmark.n_db)
        queries, q_present = assemble_by_index(*q_rows, benchmark.n_queries)
        evaluated = benchmark
        if not (bool(db_present.all()) and bool(q_present.all())):
            subset = self._partial_benchmark(benchmark, db_present, q_present)
            if subset is None:
                return None
            evaluated, kept_queries = subset
            db = db[db_present]
            queries = queries[torch.as_tensor(kept_queries, device=queries.device)]
        with torch.inference_mode(False):  # plain tensors: callbacks may use them outside validation
            db, queries = db.float().cpu().clone(), queries.float().cpu().clone()
        ranks = rank_database(db, queries)
        metrics, per_query = evaluated.evaluate_detailed(ranks, self.hparams.kappas)
        unwhitened = None
        if whitening is not None:
            unwhitened = metrics
            with torch.inference_mode(False):
                db, queries = whitening.apply(db), whitening.apply(queries)
            ranks = rank_database(db, queries)
            metrics, per_query = evaluated.evaluate_detailed(ranks, self.hparams.kappas)
        return Evaluation(evaluated, ranks, metrics, per_query, db, queries, unwhitened)

    def _validation_whitening(self, rows: tuple[torch.Tensor, torch.Tensor]) -> Whitening | None:
        """The whitening learned from this pass's embeddings of the training images (None without one, or when a
        deliberately shortened pass embedded too few of them to learn it, with a warning)."""
        sample = self._whitening_sample
        if sample is None or self._whitening_settings is None:
            return None
        vectors, present = assemble_by_index(*rows, len(sample.paths))
        vectors = vectors.float().cpu()
        reason = shortened_pass(self.trainer)
        if not bool(present.all()) and reason is None:
            raise DataError(
                f"validation embedded {int(present.sum())}/{len(sample.paths)} of the whitening's training images; "
                f"the whitening loader ({self._whitening_loader}) must list each of them once"
            )
        if not bool(present.all()):  # a deliberately shortened pass: what it embedded
            kept = present.cpu().numpy()
            sample, vectors = sample.restrict(kept, "embedded by a shortened validation pass"), vectors[present.cpu()]
        try:
            whitening = fit_whitening(self._whitening_settings, vectors, sample)
        except DataError as error:
            if reason is None:
                raise
            if not self.trainer.sanity_checking:
                rank_zero_warn(f"{error} ({reason} shortens validation): val/ is unwhitened")
            return None
        scales = [float(s) for s in self.hparams.eval_scales]
        info = {"image_size": self._whitening_image_size, "scales": scales, "source": sample.source_info()}
        self.last_whitening = whitening = whitening.with_info(**info)
        return whitening

    def _partial_benchmark(
        self, benchmark: Benchmark, db_present: torch.Tensor, q_present: torch.Tensor
    ) -> tuple[Benchmark, np.ndarray] | None:
        """Images are missing: a DataError for a full pass; the embedded subset for a deliberately short one."""
        missing_db = (~db_present).nonzero().reshape(-1).tolist()
        missing_q = (~q_present).nonzero().reshape(-1).tolist()
        summary = (
            f"{benchmark.name}: validation embedded {int(db_present.sum())}/{benchmark.n_db} database images and "
            f"{int(q_present.sum())}/{benchmark.n_queries} queries"
        )
        reason = shortened_pass(self.trainer)
        if reason is None:
            raise DataError(
                f"{summary}; missing database indices {missing_db[:10]}, query indices {missing_q[:10]}. The "
                "validation dataloaders must list every image of the benchmark once (database = loader 2k, "
                "queries = loader 2k + 1, indices into imlist / qimlist); check their sampler and dataset"
            )
        restricted = benchmark.restrict(
            db_present.cpu().numpy(), q_present.cpu().numpy(), "embedded by a shortened validation pass"
        )
        if restricted is None:
            rank_zero_warn(f"{summary} ({reason} shortens validation); no embedded query has a positive: not evaluated")
            return None
        if not self.trainer.sanity_checking:
            rank_zero_warn(
                f"{summary} ({reason} shortens validation); val/ metrics use only those images and are not "
                "comparable with a full evaluation"
            )
        return restricted
