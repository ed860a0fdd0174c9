"""The training LightningModule: one shared-weight embedder, online mining, a metric-learning loss, and the
Oxford / Paris evaluation protocol as its validation.

Everything swappable arrives as a config with ``_target_`` (embedder, distance, loss, miner, optimizer and
scheduler with ``_partial_: true``) and is built here, so ``save_hyperparameters()`` records plain
containers and ``RetrievalModule.load_from_checkpoint(path)`` rebuilds the model with nothing else. Each part is
built by :func:`oxford_ir.config.instantiate`, which checks its values against the target's signature and turns
what the target refuses into one ConfigError naming the key as typed (``optimizer.lr='abc': expected a number``);
the optimizer and scheduler, completed only when training starts, are also built once here on a stand-in
parameter, so that ``optimizer.lr=-1`` fails at construction and not minutes later inside ``Trainer.fit``. One
distance object is built and handed to both the miner and the loss, so they always agree on what "close"
means (STYLE.md rule 6).

Validation embeds the datamodule's ``eval_benchmark`` through the one test-time path
(:mod:`oxford_ir.extraction`), exactly as ``oxford-ir-eval`` does: the datamodule's ``val_dataloader`` asks
:meth:`RetrievalModule.evaluation_loaders`, which plans the batches for this module's network (bucket shapes,
padding support) from the datamodule's ``eval_images()`` and ``eval_settings``; loader 0 yields the database's
planned batches, loader 1 the (cropped) queries'. Embeddings
are gathered across processes, placed by benchmark index, ranked and evaluated once per epoch with the
benchmark's own protocol; the result is kept as :attr:`RetrievalModule.last_evaluation` (an :class:`Evaluation`)
for callbacks and the training report. Validation also logs ``val/loss`` (:mod:`oxford_ir.models.validation_loss`);
training ``train/loss`` every step and its epoch mean ``train/loss_epoch``.

The checks of the settings live in :mod:`oxford_ir.models.settings`; loading a checkpoint with a clear error in
:mod:`oxford_ir.models.checkpoint`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.metrics import DEFAULT_KAPPAS
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.config import call, instantiate, to_plain
from oxford_ir.data.gpu_decode import GpuEvalDecoder
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.benchmark import benchmark_loaders, image_list_loader
from oxford_ir.extraction.distributed import all_failures, gather_rows
from oxford_ir.extraction.embedding import embed_loader_item
from oxford_ir.extraction.whitening import Whitening
from oxford_ir.extraction.whitening_source import (
    WhiteningSample,
    WhiteningSettings,
    check_disjoint,
    fit_whitening,
    split_sample,
)
from oxford_ir.models.cross_batch import (
    CHECKPOINT_KEY,
    CrossBatchMining,
    build_cross_batch_memory,
    memory_statistics,
    split_loss_config,
)
from oxford_ir.models.settings import (
    check_loss_margins,
    check_parts,
    check_training_length,
    check_values,
    describe_config,
    part_config,
    probe_parameters,
    scheduler_parts,
)
from oxford_ir.models.tuple_stats import SUPPORTED_LOSSES, TupleStatistics, tuple_statistics
from oxford_ir.models.validation_loss import held_out_loss
from oxford_ir.trusted_targets import check_trusted

log = logging.getLogger(__name__)

#: validation dataloader indices (the third, with a post-hoc whitening: the training images it is learned from)
DB_LOADER, QUERY_LOADER, WHITENING_LOADER = 0, 1, 2
#: the metric logged as ``val/mAP`` (what checkpoints and sweeps select on), per protocol
SELECTION_METRIC = {"original": "mAP", "revisited": "M/mAP"}


# -- evaluation ---------------------------------------------------------------------------------
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


def _shortened_pass(trainer: pl.Trainer) -> str | None:
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


class RetrievalModule(pl.LightningModule):
    """Siamese (one shared network) metric learning with online mining, validated by the retrieval protocol.

    Args:
        embedder: config of the embedding network (``oxford_ir.models.embedder.Embedder``).
        loss: config of a pytorch-metric-learning loss, without ``distance``; its optional key
            ``cross_batch_memory: {memory_size: N}`` wraps it in a cross-batch memory that the miner mines
            against (:mod:`oxford_ir.models.cross_batch`; per-process memory under DDP, saved in checkpoints).
        distance: config of the one distance object that the miner and the loss share.
        optimizer: config with ``_partial_: true``; its ``lr`` is the head's learning rate.
        miner: config of a pytorch-metric-learning miner (without ``distance``), or None: the loss then
            uses every valid tuple of the batch.
        scheduler: None, a scheduler config with ``_partial_: true``, or ``{scheduler: <that>, interval:
            epoch|step, frequency: 1, monitor: val/mAP}`` (Lightning's settings; ``epoch`` by default).
        backbone_lr: learning rate of the backbone's parameters; None = the optimizer's ``lr``. The head
            (pooling, e.g. GeM's p, projection, and any loss parameters) always uses the optimizer's ``lr``.
        freeze_backbone_epochs: freeze the backbone for the first N epochs (0 = never), then unfreeze it
            (a backbone configured as permanently frozen keeps those stages frozen).
        frozen_stages: how many leading backbone stages those epochs freeze; None = the whole backbone.
        eval_scales: validation image scales; several are combined by the generalised mean of
            ``embedder.power`` as cnnimageretrieval's multi-scale extraction.
        kappas: k of the mean precision at k reported next to mAP.
        compile: ``torch.compile`` the embedder (in place: checkpoint keys do not change).
        channels_last: NHWC weights and inputs (faster convolutions with bf16 on tensor-core GPUs; the
            checkpoint is unchanged).
        whitening: the ``whitening`` config (kind none, learned or pca; :mod:`oxford_ir.extraction.whitening`):
            every validation pass learns it from the training split's images embedded by the current network and
            evaluates with it (``val/...``; ``val/unwhitened/...`` without); the last one is
            :attr:`last_whitening`.
    """

    def __init__(
        self,
        embedder: Mapping,
        loss: Mapping,
        distance: Mapping,
        optimizer: Mapping,
        miner: Mapping | None = None,
        scheduler: Mapping | None = None,
        backbone_lr: float | None = None,
        freeze_backbone_epochs: int = 0,
        frozen_stages: int | None = None,
        eval_scales: Sequence[float] = (1.0,),
        kappas: Sequence[int] = DEFAULT_KAPPAS,
        compile: bool = False,
        channels_last: bool = False,
        whitening: Mapping | None = None,
    ) -> None:
        super().__init__()
        # plain containers, so that the checkpoint's hyper_parameters load with nothing but this class
        embedder = part_config(embedder, "embedder")
        loss = part_config(loss, "loss")
        distance = part_config(distance, "distance")
        optimizer = part_config(optimizer, "optimizer")
        miner = part_config(miner, "miner", required=False)
        scheduler = part_config(scheduler, "scheduler", required=False)
        eval_scales = [float(s) for s in to_plain(eval_scales)]
        kappas = [int(k) for k in to_plain(kappas)]
        backbone_lr = None if backbone_lr is None else float(backbone_lr)
        freeze_backbone_epochs = int(freeze_backbone_epochs)
        frozen_stages = None if frozen_stages is None else int(frozen_stages)
        compile = bool(compile)
        channels_last = bool(channels_last)
        whitening = to_plain(whitening)
        self.save_hyperparameters()
        self._whitening_settings = WhiteningSettings.from_config(whitening)
        if self._whitening_settings is not None and whitening.get("source") is not None:
            raise ConfigError(
                f"whitening.source={whitening['source']}: training learns the whitening from its own training split "
                "(whitening.source=null); a source applies to oxford-ir-eval"
            )

        check_parts(embedder, loss, distance, optimizer, miner)
        check_values(eval_scales, kappas, backbone_lr, freeze_backbone_epochs)
        scheduler_cfg, self._scheduler_settings = scheduler_parts(scheduler)

        # each part built by config.instantiate: values checked against the target's signature, construction
        # errors a ConfigError naming the key (optimizer.lr); project errors pass through
        self.embedder: torch.nn.Module = instantiate(embedder, "embedder")
        self.distance = instantiate(distance, "distance")
        loss, memory_settings = split_loss_config(loss)
        self.loss_fn = instantiate(loss, "loss", distance=self.distance)
        self.miner = None if miner is None else instantiate(miner, "miner", distance=self.distance)
        # the memory is kept out of the registered modules (DDP would broadcast rank 0's queue as a buffer):
        # checkpointed by on_save_checkpoint / on_load_checkpoint
        memory = None
        if memory_settings is not None:
            dim = int(getattr(self.embedder, "embedding_dim", 0) or 0)
            memory = build_cross_batch_memory(memory_settings, self.loss_fn, self.miner, dim)
        self.__dict__["cross_batch_memory"] = memory
        self._optimizer_factory = instantiate(optimizer, "optimizer")
        # the key a user overrides: scheduler.<name> for a bare scheduler config, else scheduler.scheduler.<name>
        flat = scheduler is not None and "_target_" in scheduler
        self._scheduler_key = "scheduler" if flat else "scheduler.scheduler"
        self._scheduler_factory = None if scheduler_cfg is None else instantiate(scheduler_cfg, self._scheduler_key)
        # the optimizer and scheduler are completed when training starts: build them once now on a stand-in
        # parameter, so that values torch refuses (lr=-1, betas=[0.9, 2]) fail here, naming their key
        probe = call(self._optimizer_factory, "optimizer", probe_parameters())
        if self._scheduler_factory is not None:
            call(self._scheduler_factory, self._scheduler_key, probe)
        check_loss_margins(self.loss_fn, self.distance)
        if not isinstance(self.loss_fn, SUPPORTED_LOSSES):
            rank_zero_warn(
                f"train/active_fraction is not defined for {type(self.loss_fn).__name__} and is not logged "
                f"(defined for {', '.join(c.__name__ for c in SUPPORTED_LOSSES)})"
            )

        backbone = getattr(self.embedder, "backbone", None)
        if freeze_backbone_epochs and not hasattr(backbone, "freeze"):
            raise ConfigError(
                f"model.freeze_backbone_epochs={freeze_backbone_epochs}: the embedder's backbone "
                f"({type(backbone).__name__}) has no freeze(); use 0"
            )
        if freeze_backbone_epochs and frozen_stages is not None:
            n_stages = backbone.num_stages
            if not 0 <= frozen_stages <= n_stages:
                raise ConfigError(
                    f"model.frozen_stages={frozen_stages}: the backbone has {n_stages} stages; use 0..{n_stages} "
                    "or null for all"
                )
        # stages the backbone config freezes for good; unfreezing after the warm-up leaves them frozen
        self._permanent_frozen_stages = int(getattr(backbone, "frozen_stages", 0) or 0)
        self._warmup_frozen = False
        if channels_last:
            self.embedder.to(memory_format=torch.channels_last)
        if compile:
            self.embedder.compile()

        self._val_outputs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # set by evaluation_loaders: the database and query plans, the device decoder (decode=gpu), and the batch
        # size that bucket batches are filled up to on a GPU (one cuDNN plan per bucket)
        self._eval_plans: tuple[Any, Any] | None = None
        self._eval_decoder: GpuEvalDecoder | None = None
        self._eval_fill_to: int | None = None
        #: the last evaluation, for callbacks; None when the last validation pass was not evaluated
        self.last_evaluation: Evaluation | None = None
        #: with a whitening: the images it is learned from (set with the loaders), and the last one learned
        self._whitening_sample: WhiteningSample | None = None
        self._whitening_image_size: int | None = None
        self.last_whitening: Whitening | None = None

    # -- training ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_training_length(self.trainer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    def embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of training images (in the memory format training uses)."""
        if self.hparams.get("channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        return self.embedder(images)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, TupleStatistics]:
        """Embed the batch with the one network, mine, and apply the loss; returns ``(loss, TupleStatistics)``.

        A batch without tuples gives pytorch-metric-learning's zero loss, which keeps a gradient graph (its
        gradient is zero), so the optimisation step runs and the zero count is logged.
        """
        embeddings = self.embed_batch(images)
        labels = labels.to(embeddings.device)
        memory: CrossBatchMining | None = self.cross_batch_memory
        if memory is not None:  # enqueue the batch, mine it against the queue with self.miner
            loss = memory(embeddings, labels)
            return loss, memory_statistics(memory, embeddings.detach().float(), labels)
        indices = None if self.miner is None else self.miner(embeddings, labels)
        loss = self.loss_fn(embeddings, labels, indices)
        stats = tuple_statistics(embeddings.detach().float(), labels, indices, self.loss_fn)
        return loss, stats

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, stats = self.compute_loss(images, labels)
        size = int(labels.shape[0])
        # per step (every log_every_n_steps) and per process: an empty batch must show up, not be averaged away
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        self.log("train/num_triplets", float(stats.num_triplets), batch_size=size)
        if stats.active_fraction is not None:
            self.log("train/active_fraction", stats.active_fraction, batch_size=size)
        if stats.num_pos_pairs is not None:
            self.log("train/num_pos_pairs", float(stats.num_pos_pairs), batch_size=size)
            self.log("train/num_neg_pairs", float(stats.num_neg_pairs), batch_size=size)
        return loss

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's loader, after refusing hyperparameters that name anything but the project's own builders:
        a checkpoint from elsewhere must not run code through ``_target_`` (:mod:`oxford_ir.trusted_targets`)."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            data = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
            check_trusted(data.get(cls.CHECKPOINT_HYPER_PARAMS_KEY), str(checkpoint_path), "hyper_parameters")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The cross-batch memory's queue and position, so that a resume continues with the same memory."""
        if self.cross_batch_memory is not None:
            checkpoint[CHECKPOINT_KEY] = self.cross_batch_memory.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.cross_batch_memory is not None and CHECKPOINT_KEY in checkpoint:
            self.cross_batch_memory.load_state(checkpoint[CHECKPOINT_KEY])

    def on_train_epoch_start(self) -> None:
        """Freeze the backbone for the first ``freeze_backbone_epochs`` epochs, then unfreeze it once."""
        epochs = self.hparams.freeze_backbone_epochs
        if not epochs:
            return
        backbone = self.embedder.backbone
        if self.current_epoch < epochs and not self._warmup_frozen:
            stages = self.hparams.frozen_stages
            n = backbone.num_stages if stages is None else max(stages, self._permanent_frozen_stages)
            backbone.freeze(n)
            self._warmup_frozen = True
            rank_zero_info(f"backbone: {n}/{backbone.num_stages} stages frozen until epoch {epochs}")
        elif self.current_epoch >= epochs and self._warmup_frozen:
            backbone.unfreeze()
            if self._permanent_frozen_stages:
                backbone.freeze(self._permanent_frozen_stages)
            self._warmup_frozen = False
            rank_zero_info(
                f"backbone: unfrozen at epoch {self.current_epoch} "
                f"({self._permanent_frozen_stages} stages stay frozen by the backbone config)"
            )

    # -- optimisation ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """``backbone`` (at ``backbone_lr``) and ``head`` (everything else, at the optimizer's lr).

        Frozen parameters stay in their group: they receive no gradient, so the optimizer skips them until
        they are unfrozen, and the groups keep the same shape for checkpoint resumption.
        """
        backbone = getattr(self.embedder, "backbone", None)
        backbone_params = list(backbone.parameters()) if isinstance(backbone, torch.nn.Module) else []
        in_backbone = {id(p) for p in backbone_params}
        head_params = [p for p in self.parameters() if id(p) not in in_backbone]
        groups: list[dict[str, Any]] = []
        if backbone_params:
            group: dict[str, Any] = {"name": "backbone", "params": backbone_params}
            if self.hparams.backbone_lr is not None:
                group["lr"] = self.hparams.backbone_lr
            groups.append(group)
        if head_params:
            groups.append({"name": "head", "params": head_params})
        if not groups:
            raise ConfigError(
                f"the model ({describe_config(self.hparams.embedder)}) has no parameters to train; raw pixels with "
                "flatten pooling can only be evaluated: add embedder.projection_dim or choose another backbone"
            )
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = call(self._optimizer_factory, "optimizer", self.parameter_groups())
        if self._scheduler_factory is None:
            return optimizer
        scheduler = {
            "scheduler": call(self._scheduler_factory, self._scheduler_key, optimizer),
            "interval": "epoch",
            "frequency": 1,
        }
        scheduler.update(self._scheduler_settings)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # -- validation --------------------------------------------------------------------------------
    def evaluation_loaders(self, datamodule: Any) -> list[Any]:
        """``[database, queries]`` loaders of ``datamodule.eval_benchmark``, planned for this network: what the
        datamodule's ``val_dataloader`` returns.

        The datamodule holds the benchmark, its images and settings; the plan needs the network (can it pool
        padded images?), so it is made here, with the extraction path of ``oxford-ir-eval``.
        """
        datamodule = self._eval_datamodule(datamodule)
        settings = dict(datamodule.eval_settings)
        loaders, self._eval_plans = benchmark_loaders(
            self.embedder, datamodule.eval_benchmark, images=datamodule.eval_images(), **settings
        )
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
            check_disjoint(self._whitening_sample.paths, [datamodule.eval_benchmark], what, fix)
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
        self._val_outputs = {DB_LOADER: ([], []), QUERY_LOADER: ([], [])}
        if self._whitening_sample is not None:
            self._val_outputs[WHITENING_LOADER] = ([], [])

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx not in self._val_outputs:
            raise ConfigError(
                f"validation dataloader {dataloader_idx}: the module expects database (0), queries (1) and, with a "
                "whitening, its training images (2)"
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
        ``eval_settings``."""
        if datamodule is None:
            datamodule = getattr(self.trainer, "datamodule", None)
        missing = [a for a in ("eval_benchmark", "eval_images", "eval_settings") if not hasattr(datamodule, a)]
        if datamodule is None or missing:
            raise ConfigError(
                "validation needs a datamodule with eval_benchmark (the Benchmark), eval_images() and eval_settings "
                f"(as RetrievalDataModule); got {type(datamodule).__name__ if datamodule is not None else 'none'}"
            )
        return datamodule

    def _eval_benchmark(self) -> Benchmark:
        benchmark = self._eval_datamodule().eval_benchmark
        if not isinstance(benchmark, Benchmark):
            raise ConfigError(f"the datamodule's eval_benchmark is a {type(benchmark).__name__}, not a Benchmark")
        return benchmark

    def on_validation_epoch_end(self) -> None:
        """Gather, place by index, rank, evaluate with the benchmark's protocol once, log the whole table.

        Every process gathers the full set and computes the same numbers (ranking is one matrix product);
        they are logged with a max-reduction across processes, the identity on equal values, so Lightning
        treats them as synchronised and checkpointing agrees on every rank.
        """
        loss = held_out_loss(self, self._eval_datamodule())
        if loss is not None:
            self.log("val/loss", loss, sync_dist=True)
        benchmark = self._eval_benchmark()
        db_rows, q_rows = self._local_rows(DB_LOADER), self._local_rows(QUERY_LOADER)
        whitening_rows = self._local_rows(WHITENING_LOADER)
        self._val_outputs = {}
        db, db_present = assemble_by_index(*db_rows, benchmark.n_db)
        queries, q_present = assemble_by_index(*q_rows, benchmark.n_queries)
        evaluated = benchmark
        if not (bool(db_present.all()) and bool(q_present.all())):
            subset = self._partial_benchmark(benchmark, db_present, q_present)
            if subset is None:
                self.last_evaluation = None
                return
            evaluated, kept_queries = subset
            db = db[db_present]
            queries = queries[torch.as_tensor(kept_queries, device=queries.device)]
        with torch.inference_mode(False):  # plain tensors: callbacks may use them outside validation
            db, queries = db.float().cpu().clone(), queries.float().cpu().clone()
        ranks = rank_database(db, queries)
        metrics, per_query = evaluated.evaluate_detailed(ranks, self.hparams.kappas)
        selection = SELECTION_METRIC[evaluated.protocol]
        whitening = self._validation_whitening(whitening_rows)
        logged: dict[str, float] = {}
        unwhitened = None
        if whitening is not None:
            unwhitened = metrics  # val/ is the whitened model; val/unwhitened/ the network alone
            logged = {f"val/unwhitened/{evaluated.name}/{key}": float(value) for key, value in metrics.items()}
            logged["val/unwhitened/mAP"] = float(metrics[selection])
            with torch.inference_mode(False):
                db, queries = whitening.apply(db), whitening.apply(queries)
            ranks = rank_database(db, queries)
            metrics, per_query = evaluated.evaluate_detailed(ranks, self.hparams.kappas)
        logged.update({f"val/{evaluated.name}/{key}": float(value) for key, value in metrics.items()})
        logged["val/mAP"] = float(metrics[selection])
        self.log_dict(logged, sync_dist=True, reduce_fx="max")
        self.last_evaluation = Evaluation(evaluated, ranks, metrics, per_query, db, queries, unwhitened)

    def _validation_whitening(self, rows: tuple[torch.Tensor, torch.Tensor]) -> Whitening | None:
        """The whitening learned from this pass's embeddings of the training images (None without one, or when a
        deliberately shortened pass embedded too few of them to learn it, with a warning)."""
        sample = self._whitening_sample
        if sample is None or self._whitening_settings is None:
            return None
        vectors, present = assemble_by_index(*rows, len(sample.paths))
        vectors = vectors.float().cpu()
        reason = _shortened_pass(self.trainer)
        if not bool(present.all()) and reason is None:
            raise DataError(
                f"validation embedded {int(present.sum())}/{len(sample.paths)} of the whitening's training images; "
                "the whitening loader (2) must list each of them once"
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
        reason = _shortened_pass(self.trainer)
        if reason is None:
            raise DataError(
                f"{summary}; missing database indices {missing_db[:10]}, query indices {missing_q[:10]}. The "
                "validation dataloaders must list every image of the benchmark once (database = loader 0, "
                "queries = loader 1, indices into imlist / qimlist); check their sampler and dataset"
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
