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
are placed by benchmark index, gathered across processes, ranked and evaluated once per epoch with the
benchmark's own protocol.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_metric_learning.losses import ContrastiveLoss

from oxford_ir.benchmarks.benchmark import INDEX_KEYS, POSITIVE_KEYS, Benchmark
from oxford_ir.benchmarks.metrics import DEFAULT_KAPPAS
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.config import call, instantiate
from oxford_ir.data.gpu_decode import GpuEvalDecoder
from oxford_ir.errors import CheckpointError, ConfigError, DataError, OxfordIRError
from oxford_ir.extraction.benchmark import benchmark_loaders
from oxford_ir.extraction.embedding import embed_loader_item
from oxford_ir.models.tuple_stats import SUPPORTED_LOSSES, TupleStatistics, tuple_statistics

log = logging.getLogger(__name__)

#: validation dataloader indices
DB_LOADER, QUERY_LOADER = 0, 1
#: the metric logged as ``val/mAP`` (what checkpoints and sweeps select on), per protocol
SELECTION_METRIC = {"original": "mAP", "revisited": "M/mAP"}
#: Lightning's keys of an ``lr_scheduler`` dict that a scheduler config may set next to ``scheduler``
SCHEDULER_SETTINGS = ("interval", "frequency", "monitor", "strict", "name")
#: hyperparameters a checkpoint of this module always has
REQUIRED_HPARAMS = ("embedder", "loss", "distance", "optimizer")


# -- configs -------------------------------------------------------------------------------------
def _plain(value: Any, name: str, *, required: bool = True) -> dict | None:
    """A config (DictConfig or dict with ``_target_``) as a plain, resolved dict; refuses built objects."""
    if value is None:
        if required:
            raise ConfigError(f"model.{name} is required: give a config with _target_")
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"model.{name} must be a config with _target_, got a {type(value).__name__}; the module builds its "
            "parts itself (instantiate the model node with _recursive_: false)"
        )
    return _to_plain(value)


def _to_plain(value: Any) -> Any:
    """Dicts, lists and scalars only (what a checkpoint can hold without pickling classes)."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _require_target(cfg: Mapping, name: str, *, partial: bool = False) -> None:
    if "_target_" not in cfg:
        raise ConfigError(f"model.{name} has no _target_ (keys: {sorted(cfg)}); it must name the class to build")
    if partial and cfg.get("_partial_") is not True:
        raise ConfigError(
            f"model.{name} ({cfg['_target_']}) needs _partial_: true: it is completed with the model's parameters "
            "(or the optimizer) when training starts"
        )


def _build(name: str, cfg: Mapping, **kwargs: Any) -> Any:
    """The part ``name`` built from its config by :func:`oxford_ir.config.instantiate`: values checked against the
    target's signature, construction errors a ConfigError naming the key (``optimizer.lr``); project errors pass
    through."""
    return instantiate(cfg, name, **kwargs)


def _probe_parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1))]


def check_training_length(trainer: pl.Trainer) -> None:
    """The trainer's epoch limits are whole numbers, and training has an end.

    Lightning takes ``max_epochs='abc'`` and fails deep inside ``fit``; ``max_epochs=-1`` without ``max_steps`` or
    ``max_time`` is its endless mode, whose final evaluation and cosine schedule never come. Called when ``fit``
    starts, before any step.
    """
    from lightning.pytorch.callbacks import Timer

    for key in ("max_epochs", "min_epochs"):
        value = getattr(trainer, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
            raise ConfigError(
                f"trainer.{key}={value!r}: expected a whole number of epochs (0 or more), e.g. trainer.{key}=10"
            )
    endless = trainer.max_epochs == -1 and trainer.max_steps == -1
    if endless and not any(isinstance(callback, Timer) for callback in trainer.callbacks):
        raise ConfigError(
            "trainer.max_epochs=-1 with no trainer.max_steps or trainer.max_time trains forever and never reaches "
            "the final evaluation; give the number of epochs (e.g. trainer.max_epochs=10) or a trainer.max_steps"
        )


def _describe(cfg: Any) -> str:
    """``ScratchCNN(channels=[8, 16]) + GeM(p=3.0)``-style summary of an embedder config, for messages."""
    if not isinstance(cfg, Mapping):
        return repr(cfg)
    target = str(cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    args = []
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        args.append(f"{key}={_describe(value)}" if isinstance(value, Mapping) else f"{key}={value!r}")
    return f"{target}({', '.join(args)})"


def _scheduler_parts(cfg: dict | None) -> tuple[dict | None, dict]:
    """Split a scheduler config into the scheduler's own config and Lightning's settings (interval, ...)."""
    if cfg is None:
        return None, {}
    if "_target_" in cfg:
        inner, settings = cfg, {}
    else:
        inner = cfg.get("scheduler")
        settings = {k: v for k, v in cfg.items() if k != "scheduler"}
        if not isinstance(inner, Mapping):
            raise ConfigError(
                f"model.scheduler must be a scheduler config with _target_ or {{scheduler: {{_target_: ...}}, "
                f"interval: epoch|step, ...}}; got keys {sorted(cfg)}"
            )
        unknown = sorted(set(settings) - set(SCHEDULER_SETTINGS))
        if unknown:
            raise ConfigError(
                f"model.scheduler: unknown settings {unknown}; allowed next to 'scheduler': {list(SCHEDULER_SETTINGS)}"
            )
    _require_target(inner, "scheduler", partial=True)
    interval = settings.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"model.scheduler.interval={interval!r}: use 'epoch' or 'step'")
    return dict(inner), settings


# -- evaluation helpers -------------------------------------------------------------------------
def assemble_by_index(indices: torch.Tensor, embeddings: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows placed at their benchmark index: ``(size x D embeddings, bool mask of indices present)``.

    An index seen twice (a DistributedSampler pads the last batch with repeated images) is one image
    embedded twice; either copy is kept.
    """
    indices = indices.long().reshape(-1)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        bad = int(indices[(indices < 0) | (indices >= size)][0])
        raise DataError(f"validation batch index {bad} is outside the {size} images of the benchmark list")
    out = embeddings.new_zeros(size, embeddings.shape[-1])
    present = torch.zeros(size, dtype=torch.bool, device=embeddings.device)
    out[indices] = embeddings
    present[indices] = True
    return out, present


def restrict_benchmark(
    benchmark: Benchmark, db_kept: np.ndarray, queries_kept: np.ndarray
) -> tuple[Benchmark, np.ndarray] | None:
    """The benchmark restricted to the database images and queries in the masks, renumbered, and the
    original indices of the queries it keeps.

    Queries left without a positive are dropped; None when no query remains. Only for validation passes the
    trainer deliberately cut short (sanity check, fast_dev_run, limit_val_batches, overfit_batches).
    """
    keep_db = np.flatnonzero(db_kept)
    remap = np.full(benchmark.n_db, -1, dtype=np.int64)
    remap[keep_db] = np.arange(len(keep_db))
    imlist = [benchmark.imlist[i] for i in keep_db]
    qimlist, gnd, landmarks, kept_queries = [], [], [], []
    for q in np.flatnonzero(queries_kept):
        entry = dict(benchmark.gnd[q])
        for key in INDEX_KEYS[benchmark.protocol]:
            values = remap[np.asarray(benchmark.gnd[q].get(key, ()), dtype=np.int64)]
            entry[key] = values[values >= 0]
        if sum(len(entry[k]) for k in POSITIVE_KEYS[benchmark.protocol]) == 0:
            continue
        qimlist.append(benchmark.qimlist[q])
        gnd.append(entry)
        kept_queries.append(int(q))
        if benchmark.query_landmarks:
            landmarks.append(benchmark.query_landmarks[q])
    if not qimlist:
        return None
    note = (
        f"subset: {len(imlist)}/{benchmark.n_db} database images and {len(qimlist)}/{benchmark.n_queries} queries "
        "embedded by a shortened validation pass"
    )
    restricted = replace(
        benchmark, imlist=imlist, qimlist=qimlist, gnd=gnd, query_landmarks=landmarks, is_subset=True, subset_note=note
    )
    return restricted, np.asarray(kept_queries, dtype=np.int64)


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
        loss: config of a pytorch-metric-learning loss, without ``distance``.
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
    ) -> None:
        super().__init__()
        # plain containers, so that the checkpoint's hyper_parameters load with nothing but this class
        embedder = _plain(embedder, "embedder")
        loss = _plain(loss, "loss")
        distance = _plain(distance, "distance")
        optimizer = _plain(optimizer, "optimizer")
        miner = _plain(miner, "miner", required=False)
        scheduler = _plain(scheduler, "scheduler", required=False)
        eval_scales = [float(s) for s in _to_plain(eval_scales)]
        kappas = [int(k) for k in _to_plain(kappas)]
        backbone_lr = None if backbone_lr is None else float(backbone_lr)
        freeze_backbone_epochs = int(freeze_backbone_epochs)
        frozen_stages = None if frozen_stages is None else int(frozen_stages)
        compile = bool(compile)
        channels_last = bool(channels_last)
        self.save_hyperparameters()

        for name, cfg in (("embedder", embedder), ("loss", loss), ("distance", distance)):
            _require_target(cfg, name)
        _require_target(optimizer, "optimizer", partial=True)
        for name, cfg in (("loss", loss), ("miner", miner)):
            if cfg is not None:
                _require_target(cfg, name)
                if "distance" in cfg:
                    raise ConfigError(
                        f"model.{name} sets its own distance; remove it and choose the one distance shared by the "
                        f"miner and the loss with distance=cosine|euclidean"
                    )
        if not eval_scales or min(eval_scales) <= 0:
            raise ConfigError(f"model.eval_scales={eval_scales}: give one or more positive scale factors, e.g. [1.0]")
        if not kappas or min(kappas) < 1:
            raise ConfigError(f"model.kappas={kappas}: give positive k for P@k, e.g. [1, 5, 10]")
        if backbone_lr is not None and not backbone_lr > 0:
            raise ConfigError(f"model.backbone_lr={backbone_lr}: must be positive, or null for the optimizer's lr")
        if freeze_backbone_epochs < 0:
            raise ConfigError(f"model.freeze_backbone_epochs={freeze_backbone_epochs}: must be >= 0 (0 = never)")
        scheduler_cfg, self._scheduler_settings = _scheduler_parts(scheduler)

        self.embedder: torch.nn.Module = _build("embedder", embedder)
        self.distance = _build("distance", distance)
        self.loss_fn = _build("loss", loss, distance=self.distance)
        self.miner = None if miner is None else _build("miner", miner, distance=self.distance)
        self._optimizer_factory = _build("optimizer", optimizer)
        # the key a user overrides: scheduler.<name> for a bare scheduler config, else scheduler.scheduler.<name>
        flat = scheduler is not None and "_target_" in scheduler
        self._scheduler_key = "scheduler" if flat else "scheduler.scheduler"
        self._scheduler_factory = None if scheduler_cfg is None else _build(self._scheduler_key, scheduler_cfg)
        # the optimizer and scheduler are completed when training starts: build them once now on a stand-in
        # parameter, so that values torch refuses (lr=-1, betas=[0.9, 2]) fail here, naming their key
        probe = call(self._optimizer_factory, "optimizer", _probe_parameters())
        if self._scheduler_factory is not None:
            call(self._scheduler_factory, self._scheduler_key, probe)
        self._check_loss_margins()
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
        #: the last evaluation (benchmark, ranks, metrics, per_query, db, queries), for callbacks; None when
        #: the last validation pass was not evaluated
        self.last_evaluation: dict[str, Any] | None = None

    def _check_loss_margins(self) -> None:
        """A contrastive loss whose margins point the wrong way for the distance trains on nothing useful."""
        if not isinstance(self.loss_fn, ContrastiveLoss):
            return
        pos, neg = self.loss_fn.pos_margin, self.loss_fn.neg_margin
        inverted = self.distance.is_inverted
        if (inverted and not pos > neg) or (not inverted and not pos < neg):
            kind = "a similarity (higher = closer)" if inverted else "a distance (lower = closer)"
            want = (
                "pos_margin > neg_margin, e.g. 1.0 and 0.5" if inverted else "pos_margin < neg_margin, e.g. 0 and 0.7"
            )
            raise ConfigError(
                f"loss=contrastive with pos_margin={pos}, neg_margin={neg}: {type(self.distance).__name__} is "
                f"{kind}, so it needs {want}"
            )

    # -- training ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_training_length(self.trainer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, TupleStatistics]:
        """Embed the batch with the one network, mine, and apply the loss; returns ``(loss, TupleStatistics)``.

        A batch without tuples gives pytorch-metric-learning's zero loss, which keeps a gradient graph (its
        gradient is zero), so the optimisation step runs and the zero count is logged.
        """
        if self.hparams.get("channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        embeddings = self.embedder(images)
        labels = labels.to(embeddings.device)
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
        self.log("train/num_triplets", float(stats.num_triplets), batch_size=size)
        if stats.active_fraction is not None:
            self.log("train/active_fraction", stats.active_fraction, batch_size=size)
        if stats.num_pos_pairs is not None:
            self.log("train/num_pos_pairs", float(stats.num_pos_pairs), batch_size=size)
            self.log("train/num_neg_pairs", float(stats.num_neg_pairs), batch_size=size)
        return loss

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
                f"the model ({_describe(self.hparams.embedder)}) has no parameters to train; raw pixels with "
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
        return loaders

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {DB_LOADER: ([], []), QUERY_LOADER: ([], [])}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx not in self._val_outputs:
            raise ConfigError(
                f"validation dataloader {dataloader_idx}: the module expects two, database (0) and queries (1)"
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

    def _gather(self, loader: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This loader's (indices, embeddings) of every process; processes may hold different counts."""
        indices_list, vectors_list = self._val_outputs.get(loader, ([], []))
        dim = int(getattr(self.embedder, "embedding_dim", 0) or (vectors_list[0].shape[1] if vectors_list else 0))
        indices = torch.cat(indices_list) if indices_list else torch.empty(0, dtype=torch.long, device=self.device)
        vectors = torch.cat(vectors_list) if vectors_list else torch.empty(0, dim, device=self.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return indices, vectors
        counts = self.all_gather(torch.tensor([indices.numel()], device=self.device)).reshape(-1)
        longest = int(counts.max())
        padded_idx = indices.new_full((longest,), -1)
        padded_idx[: indices.numel()] = indices
        padded_vec = vectors.new_zeros(longest, dim)
        padded_vec[: indices.numel()] = vectors
        all_idx = self.all_gather(padded_idx).reshape(world, longest)
        all_vec = self.all_gather(padded_vec).reshape(world, longest, dim)
        rows = [slice(0, int(c)) for c in counts]
        gathered_idx = torch.cat([all_idx[r, rows[r]] for r in range(world)])
        return gathered_idx, torch.cat([all_vec[r, rows[r]] for r in range(world)])

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
        benchmark = self._eval_benchmark()
        db_idx, db_vec = self._gather(DB_LOADER)
        q_idx, q_vec = self._gather(QUERY_LOADER)
        self._val_outputs = {}
        db, db_present = assemble_by_index(db_idx, db_vec, benchmark.n_db)
        queries, q_present = assemble_by_index(q_idx, q_vec, benchmark.n_queries)
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
        logged = {f"val/{evaluated.name}/{key}": float(value) for key, value in metrics.items()}
        logged["val/mAP"] = float(metrics[selection])
        self.log_dict(logged, sync_dist=True, reduce_fx="max")
        self.last_evaluation = {
            "benchmark": evaluated,
            "ranks": ranks,
            "metrics": metrics,
            "per_query": per_query,
            "db": db,
            "queries": queries,
        }

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
        restricted = restrict_benchmark(benchmark, db_present.cpu().numpy(), q_present.cpu().numpy())
        if restricted is None:
            rank_zero_warn(f"{summary} ({reason} shortens validation); no embedded query has a positive: not evaluated")
            return None
        if not self.trainer.sanity_checking:
            rank_zero_warn(
                f"{summary} ({reason} shortens validation); val/ metrics use only those images and are not "
                "comparable with a full evaluation"
            )
        return restricted


# -- checkpoints ---------------------------------------------------------------------------------
def _state_mismatch(
    model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, Any], limit: int = 5
) -> list[str]:
    """Human-readable differences between two state dicts: missing, unexpected, and reshaped keys."""
    problems = []
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    reshaped = [
        f"{k} {tuple(ckpt_state[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
        for k, v in model_state.items()
        if k in ckpt_state and isinstance(ckpt_state[k], torch.Tensor) and tuple(ckpt_state[k].shape) != tuple(v.shape)
    ]
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:limit])})")
    if reshaped:
        problems.append(f"{len(reshaped)} keys of another shape (e.g. {'; '.join(reshaped[:limit])})")
    return problems


def _read_checkpoint(path: Path, map_location: Any) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; give the path of a .ckpt file written by training")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError, ... on bad files
        text = str(error)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsafe:
            raise CheckpointError(
                f"{path}: the checkpoint holds a {unsafe.group(1)} object, not only tensors and plain data; it was not "
                "written by this project's training, and unpickling it could run code from the file: load it with "
                "the code that wrote it"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        reason = detail.group(1) if detail else (text.strip().splitlines() or [type(error).__name__])[0]
        if isinstance(error, KeyError) or reason.isdigit():  # pickle's reader on bytes that are no pickle at all
            reason = "not a PyTorch file (no pickle or zip archive inside)"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason}; the file is corrupt or truncated (an interrupted copy or "
            "save?): use another checkpoint, e.g. last.ckpt or the best-*.ckpt of the run"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by oxford-ir-train"
        )
    return checkpoint


def _without_pretrained_weights(embedder: Any) -> Any:
    """The embedder config with ``backbone.weights: none``: the checkpoint's state dict replaces them anyway,
    so rebuilding never downloads ImageNet weights or needs the local weights file of the training machine."""
    if not isinstance(embedder, dict) or not isinstance(embedder.get("backbone"), dict):
        return embedder
    backbone = embedder["backbone"]
    if "weights" not in backbone:
        return embedder
    return {**embedder, "backbone": {**backbone, "weights": "none"}}


def load_retrieval_checkpoint(
    path: str | Path, map_location: Any = "cpu", *, expected: RetrievalModule | None = None
) -> RetrievalModule:
    """The :class:`RetrievalModule` saved in ``path``, in eval mode, or a :class:`CheckpointError` that says why not.

    ``expected`` (a module built from the current config) makes the check stricter: the checkpoint's
    weights must fit that model, key for key and shape for shape; the error then names the first
    mismatched keys and the embedder the checkpoint was trained with, i.e. the config to use instead.
    """
    path = Path(path)
    checkpoint = _read_checkpoint(path, map_location)
    hparams = checkpoint.get(RetrievalModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise CheckpointError(
            f"{path} was not written by RetrievalModule: its hyper_parameters ({sorted(hparams) or 'none'}) have no "
            f"{', '.join(missing)}; load it with the model class that trained it"
        )
    state = checkpoint["state_dict"]
    trained_with = _describe(hparams.get("embedder"))
    if expected is not None:
        problems = _state_mismatch(expected.state_dict(), state)
        if problems:
            raise CheckpointError(
                f"{path} does not fit the configured model {_describe(expected.hparams.get('embedder'))}: "
                f"{'; '.join(problems)}. The checkpoint was trained with {trained_with}: compose that config "
                "(e.g. the same backbone=/pooling=/embedder.projection_dim= overrides as the run that wrote it)"
            )
    accepted = set(inspect.signature(RetrievalModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    kwargs["embedder"] = _without_pretrained_weights(kwargs.get("embedder"))
    try:
        module = RetrievalModule(**kwargs)
    except OxfordIRError as error:
        raise CheckpointError(f"{path}: cannot rebuild the model from its hyper_parameters: {error}") from None
    problems = _state_mismatch(module.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its own hyper_parameters describe ({trained_with}): "
            f"{'; '.join(problems)}. The file was edited or written by another version of the code"
        )
    module.load_state_dict(state, strict=True)
    return module.eval()
