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

Validation (:mod:`oxford_ir.models.validation`, the :class:`BenchmarkValidation` half of the module) embeds each
evaluated benchmark through the one test-time path, exactly as ``oxford-ir-eval`` does, and evaluates it with the
benchmark's own protocol; ``val/mAP`` is the first benchmark's. Validation also logs ``val/loss``
(:mod:`oxford_ir.models.validation_loss`); training ``train/loss`` every step and its epoch mean
``train/loss_epoch``.

The checks of the settings live in :mod:`oxford_ir.models.settings`; loading a checkpoint with a clear error in
:mod:`oxford_ir.models.checkpoint`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from oxford_ir.benchmarks.metrics import DEFAULT_KAPPAS
from oxford_ir.config import call, instantiate, to_plain
from oxford_ir.errors import ConfigError
from oxford_ir.extraction.whitening_source import WhiteningSettings
from oxford_ir.models.class_losses import (
    CLASS_KEYS,
    ClassStatistics,
    build_loss,
    class_statistics,
    is_class_loss,
    without_miner,
)
from oxford_ir.models.cross_batch import (
    CHECKPOINT_KEY,
    CrossBatchMining,
    build_cross_batch_memory,
    memory_statistics,
    split_loss_config,
)
from oxford_ir.models.image_lists import can_pad, embed_image_list
from oxford_ir.models.pool_mining import mining_embeddings, tuple_layout_of
from oxford_ir.models.settings import (
    check_loss_margins,
    check_optimizer_groups,
    check_parts,
    check_training_length,
    check_values,
    describe_config,
    part_config,
    probe_parameters,
    scheduler_parts,
)
from oxford_ir.models.tuple_stats import SUPPORTED_LOSSES, TupleStatistics, tuple_statistics
from oxford_ir.models.validation import BenchmarkValidation
from oxford_ir.trusted_targets import check_trusted

log = logging.getLogger(__name__)


class RetrievalModule(BenchmarkValidation, pl.LightningModule):
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
            (the projection, anything else) always uses the optimizer's ``lr``.
        loss_lr: learning rate of the loss's parameters (the class weights of ``loss=arcface``,
            :mod:`oxford_ir.models.class_losses`), without weight decay; None = the optimizer's ``lr``.
        pooling_lr: learning rate of the pooling's parameters (GeM's p), without weight decay, as
            cnnimageretrieval-pytorch trains p (at 10x the lr); None = the optimizer's ``lr``.
        freeze_backbone_epochs: freeze the backbone for the first N epochs (0 = never), then unfreeze it
            (a backbone configured as permanently frozen keeps those stages frozen).
        frozen_stages: how many leading backbone stages those epochs freeze; None = the whole backbone.
        eval_scales: validation image scales; several are combined by the generalised mean of
            ``embedder.power`` as cnnimageretrieval's multi-scale extraction.
        kappas: k of the mean precision at k reported next to mAP.
        compile: ``torch.compile`` the embedder (in place: checkpoint keys do not change).
        channels_last: NHWC weights and inputs (faster convolutions with bf16 on tensor-core GPUs; the
            checkpoint is unchanged).
        freeze_batchnorm: the embedder's BatchNorm layers normalise with their running statistics while the
            network trains, and never update them (their scale and shift still train), as cnnimageretrieval-pytorch
            fine-tunes (``set_batchnorm_eval``): the statistics of the pretrained network are kept, whatever the
            batches hold.
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
        loss_lr: float | None = None,
        pooling_lr: float | None = None,
        freeze_batchnorm: bool = False,
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
        loss_lr = None if loss_lr is None else float(loss_lr)
        pooling_lr = None if pooling_lr is None else float(pooling_lr)
        freeze_backbone_epochs = int(freeze_backbone_epochs)
        frozen_stages = None if frozen_stages is None else int(frozen_stages)
        compile = bool(compile)
        channels_last = bool(channels_last)
        freeze_batchnorm = bool(freeze_batchnorm)
        whitening = to_plain(whitening)
        self.save_hyperparameters()
        self._whitening_settings = WhiteningSettings.from_config(whitening)
        if self._whitening_settings is not None and whitening.get("source") is not None:
            raise ConfigError(
                f"whitening.source={whitening['source']}: training learns the whitening from its own training split "
                "(whitening.source=null); a source applies to oxford-ir-eval"
            )

        miner = self.hparams["miner"] = without_miner(loss, miner)  # a loss with a weight per class mines nothing
        check_parts(embedder, loss, distance, optimizer, miner)
        check_values(eval_scales, kappas, backbone_lr, freeze_backbone_epochs, loss_lr=loss_lr, pooling_lr=pooling_lr)
        scheduler_cfg, self._scheduler_settings = scheduler_parts(scheduler)

        # each part built by config.instantiate: values checked against the target's signature, construction
        # errors a ConfigError naming the key (optimizer.lr); project errors pass through
        self.embedder: torch.nn.Module = instantiate(embedder, "embedder")
        self.distance = instantiate(distance, "distance")
        loss, memory_settings = split_loss_config(loss)
        # a loss with a weight per class gets the embedder's dimension; the hyperparameters keep both numbers
        embedding_dim = int(getattr(self.embedder, "embedding_dim", 0) or 0)
        self.loss_fn, built = build_loss(loss, self.distance, embedding_dim)
        self.hparams["loss"].update({key: built[key] for key in CLASS_KEYS if key in built})
        self._class_loss = is_class_loss(self.loss_fn)
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
        if not isinstance(self.loss_fn, SUPPORTED_LOSSES) and not self._class_loss:
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

        self._init_validation()

    # -- training ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_training_length(self.trainer)
            #: data.mining=pool: the loss takes each mined tuple's pairs or triplets (oxford_ir.models.tuple_layout)
            self.tuple_layout = tuple_layout_of(self, self.trainer.datamodule)
            data = getattr(self.trainer.datamodule, "hparams", None) or {}
            if (
                data.get("train_images") == "whole"
                and not self.hparams.get("freeze_batchnorm")
                and self._has_batchnorm()
            ):
                rank_zero_warn(
                    "data.train_images=whole with BatchNorm in training mode: each shape of a batch runs alone, so "
                    "a layer's statistics come from a few images, often one; set model.freeze_batchnorm=true (as "
                    "cnnimageretrieval-pytorch trains)"
                )

    def embed_images(self, paths: Sequence[Any], **settings: Any) -> torch.Tensor:
        """Embeddings of whole images by the network as it is now, for the datamodule's pool mining
        (:func:`~oxford_ir.models.pool_mining.mining_embeddings`)."""
        return mining_embeddings(self, paths, **settings)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    def embed_batch(
        self, images: torch.Tensor | Sequence[torch.Tensor], sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings of a batch of training images (in the memory format training uses); ``sizes``: each image's
        own height and width in a padded batch. A list of images of different shapes (``data.train_images=whole``)
        is padded onto one canvas or run once per shape (:mod:`oxford_ir.models.image_lists`); the rows keep the
        list's order."""
        if not isinstance(images, torch.Tensor):
            return embed_image_list(self.embedder, images, self.embed_batch, pad=can_pad(self.embedder))
        if self.hparams.get("channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        return self.embedder(images) if sizes is None else self.embedder(images, sizes)

    def compute_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, TupleStatistics | ClassStatistics]:
        """Embed the batch with the one network, mine, and apply the loss; returns ``(loss, TupleStatistics)``, or
        ``(loss, ClassStatistics)`` for a loss with a weight per class (nothing to mine or count).

        A batch without tuples gives pytorch-metric-learning's zero loss, which keeps a gradient graph (its
        gradient is zero), so the optimisation step runs and the zero count is logged.
        """
        embeddings = self.embed_batch(images)
        labels = labels.to(embeddings.device)
        if self._class_loss:  # float32: pml casts its weights to the embeddings' dtype (bf16 under autocast)
            loss = self.loss_fn(embeddings.float(), labels)
            return loss, class_statistics(self.loss_fn, embeddings.detach(), labels)
        memory: CrossBatchMining | None = self.cross_batch_memory
        if memory is not None:  # enqueue the batch, mine it against the queue with self.miner
            loss = memory(embeddings, labels)
            return loss, memory_statistics(memory, embeddings.detach().float(), labels)
        layout = getattr(self, "tuple_layout", None)
        if layout is not None:  # data.mining=pool: each tuple's pairs or triplets, no miner
            indices = layout.indices_tuple(self.loss_fn, len(labels), labels.device)
        else:
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
        if isinstance(stats, ClassStatistics):
            if stats.class_cosine is not None:
                self.log("train/class_cosine", stats.class_cosine, batch_size=size)
            return loss
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
        if self._trainer is not None and self.trainer.state.fn == "fit":  # resuming: the optimizer state must fit
            check_optimizer_groups(checkpoint, self.parameter_groups())
        if self.cross_batch_memory is not None and CHECKPOINT_KEY in checkpoint:
            self.cross_batch_memory.load_state(checkpoint[CHECKPOINT_KEY])

    def _has_batchnorm(self) -> bool:
        return any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in self.embedder.modules())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """With ``freeze_batchnorm``: the BatchNorm layers in eval mode for this step. Set before every step, since
        anything that puts the embedder back in training mode (Lightning after validation, the extraction path
        after embedding the pool of ``data.mining=pool``) would otherwise let the next batch update them."""
        if self.hparams.get("freeze_batchnorm", False):
            for layer in self.embedder.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.eval()

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
        """``backbone`` (at ``backbone_lr``), ``pooling`` (GeM's p, at ``pooling_lr``, no weight decay), ``head``
        (everything else, at the optimizer's lr) and ``loss`` (its class weights, at ``loss_lr``, no weight decay);
        groups without parameters are left out.

        Frozen parameters stay in their group: they receive no gradient, so the optimizer skips them until
        they are unfrozen, and the groups keep the same shape for checkpoint resumption.
        """
        hp = self.hparams
        parts = {name: getattr(self.embedder, name, None) for name in ("backbone", "pooling")}
        parts["loss"] = self.loss_fn
        owned = {k: list(v.parameters()) if isinstance(v, torch.nn.Module) else [] for k, v in parts.items()}
        taken = {id(p) for params in owned.values() for p in params}
        owned["head"] = [p for p in self.parameters() if id(p) not in taken]
        settings = {
            "backbone": {"lr": hp.backbone_lr},
            "pooling": {"lr": hp.get("pooling_lr"), "weight_decay": 0.0},
            "head": {},
            "loss": {"lr": hp.get("loss_lr"), "weight_decay": 0.0},
        }
        groups: list[dict[str, Any]] = []
        for name, extra in settings.items():
            if owned[name]:
                extra = {key: value for key, value in extra.items() if value is not None}
                groups.append({"name": name, "params": owned[name], **extra})
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
