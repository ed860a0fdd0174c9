"""Losses with a weight per class (loss=arcface|subcenter_arcface|cosface) and FastAP: built from their configs with
the numbers filled in, without the configured miner, refused with the wrong distance, ``train/class_cosine`` against
the loss's own cosines, their weights in the state dict, the optimizer (group ``loss``) and a resumed run."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from torch.utils.data import DataLoader, TensorDataset

from oxford_ir.cli import train as train_cli
from oxford_ir.config import instantiate
from oxford_ir.data.random_sampler import RandomBatchSampler
from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.models.class_losses import (
    build_loss,
    class_cosine,
    fill_num_classes,
    is_class_loss,
    random_batches_warning,
    takes_classes,
)
from oxford_ir.models.module import RetrievalModule
from oxford_ir.models.validation_loss import held_out_loss
from oxford_ir.trusted_targets import check_trusted
from tests.test_train import (
    TINY,
    TINY_SCRATCH,
    TWO_EPOCHS,
    assert_same_run,
    compose_train,
    read_csv_metrics,
    restored_process_state,
)

LOSSES = "pytorch_metric_learning.losses."
ARCFACE = {"_target_": LOSSES + "ArcFaceLoss", "num_classes": 5, "embedding_size": None, "margin": 28.6, "scale": 64}
SUBCENTER = {**ARCFACE, "_target_": LOSSES + "SubCenterArcFaceLoss", "sub_centers": 3}
COSFACE = {**ARCFACE, "_target_": LOSSES + "CosFaceLoss", "margin": 0.35}
FASTAP = {"_target_": LOSSES + "FastAPLoss", "num_bins": 10}
ARCFACE_RANDOM = ["loss=arcface", "data.sampler=random"]  # with the default miner (batch_hard): left out


@pytest.mark.parametrize("config", [ARCFACE, SUBCENTER, COSFACE], ids=["arcface", "subcenter", "cosface"])
def test_class_losses_get_the_embedding_size_and_the_cosine_to_their_class(config):
    torch.manual_seed(0)
    loss_fn, built = build_loss(dict(config), CosineSimilarity(), 6)
    assert takes_classes(config) and is_class_loss(loss_fn) and built["embedding_size"] == 6
    assert built["num_classes"] == 5 and config["embedding_size"] is None  # the given config is not changed
    assert tuple(loss_fn.W.shape) == (6, 5 * config.get("sub_centers", 1))
    check_trusted({"loss": built}, "a checkpoint", "hyper_parameters")  # a checkpoint naming it loads
    embeddings = torch.nn.functional.normalize(torch.randn(7, 6), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    # reference: pml's own cosines to every class (the nearest sub-centre), read at each image's class
    expected = loss_fn.get_cosine(embeddings).detach()[torch.arange(7), labels].mean()
    assert class_cosine(loss_fn, embeddings, labels) == pytest.approx(float(expected), abs=1e-6)
    assert torch.isfinite(loss_fn(embeddings, labels))


def test_what_is_refused_names_the_fix():
    with pytest.raises(ConfigError, match="loss.num_classes is not set for ArcFaceLoss"):
        build_loss({**ARCFACE, "num_classes": None}, CosineSimilarity(), 6)
    with pytest.raises(ConfigError, match="loss.embedding_size=8 but the embedder's embeddings have 6"):
        build_loss({**ARCFACE, "embedding_size": 8}, CosineSimilarity(), 6)
    with pytest.raises(ConfigError, match="ArcFaceLoss requires .*CosineSimilarity.*choose distance=cosine"):
        build_loss(dict(ARCFACE), LpDistance(normalize_embeddings=True, p=2), 6)
    with pytest.raises(ConfigError, match="FastAPLoss requires .*LpDistance.*choose distance=euclidean"):
        build_loss(dict(FASTAP), CosineSimilarity(), 6)
    # FastAP is a loss over the batch: no class weights; the distance it needs works
    fastap, built = build_loss(dict(FASTAP), LpDistance(normalize_embeddings=True, p=2), 6)
    assert not takes_classes(FASTAP) and not is_class_loss(fastap) and built == FASTAP
    assert class_cosine(fastap, torch.randn(2, 6), torch.tensor([0, 1])) is None


def test_num_classes_is_filled_once_and_a_different_one_refused():
    loss = {**ARCFACE, "num_classes": None}
    fill_num_classes(loss, 12)
    assert loss["num_classes"] == 12
    fill_num_classes(loss, 12)  # the same number again: a resumed run
    with pytest.raises(ConfigError, match="loss.num_classes=12 but the training split has 13 labels"):
        fill_num_classes(loss, 13)


def test_shuffled_batches_are_warned_about_for_losses_over_tuples_only():
    arcface, _ = build_loss(dict(ARCFACE), CosineSimilarity(), 6)
    triplet = TripletMarginLoss(distance=CosineSimilarity())
    assert "may hold no positives" in random_batches_warning(triplet, "random")
    assert random_batches_warning(arcface, "random") is None
    assert random_batches_warning(triplet, "balanced") is None


# -- in the module and in training ------------------------------------------------------------------
EMBEDDER = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [4, 8]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
}


def class_module(loss: dict, **overrides) -> RetrievalModule:
    torch.manual_seed(0)
    settings = {
        "embedder": EMBEDDER,
        "loss": loss,
        "distance": {"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 0.1},
        "loss_lr": 0.05,
        **overrides,
    }
    return RetrievalModule(**settings)


class Recorder(pl.Callback):
    """What training logged at each step (train/loss, train/class_cosine), as the logger received it."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_epoch")})


def fit(module: RetrievalModule, epochs: int, ckpt: Path | None = None) -> tuple[pl.Trainer, list[dict]]:
    """``epochs`` epochs of 3 fixed batches (6 classes, 2 images each), no validation; what each step logged."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(6).repeat(3)
    images = torch.randn(len(labels), 3, 16, 16, generator=generator) + labels.reshape(-1, 1, 1, 1) * 0.3
    loader = DataLoader(TensorDataset(images, labels), batch_size=6, shuffle=False)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[recorder], deterministic=True,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
    return trainer, recorder.logged


def test_class_weights_are_trained_saved_and_resumed_exactly(tmp_path):
    loss = {**ARCFACE, "num_classes": 6}
    module = class_module(loss)
    assert module.hparams["loss"]["embedding_size"] == 8 and "loss_fn.W" in module.state_dict()
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert [id(p) for p in groups["loss"]["params"]] == [id(module.loss_fn.W)]
    assert groups["loss"]["lr"] == 0.05 and groups["loss"]["weight_decay"] == 0.0 == groups["pooling"]["weight_decay"]
    assert groups["backbone"]["lr"] == 1e-2 and groups["backbone"]["weight_decay"] == 0.1

    straight = class_module(loss)
    start = straight.loss_fn.W.detach().clone()
    _, straight_log = fit(straight, 2)
    assert not torch.equal(start, straight.loss_fn.W)  # trained
    first = class_module(loss)
    trainer, first_log = fit(first, 1)
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    saved = torch.load(tmp_path / "epoch0.ckpt", map_location="cpu", weights_only=True)
    names = [g["name"] for g in saved["optimizer_states"][0]["param_groups"]]
    loss_index = saved["optimizer_states"][0]["param_groups"][names.index("loss")]["params"][0]
    assert saved["optimizer_states"][0]["state"][loss_index]["exp_avg"].shape == (8, 6)  # W's Adam moments
    resumed = class_module(loss)
    _, resumed_log = fit(resumed, 2, tmp_path / "epoch0.ckpt")
    assert torch.equal(straight.loss_fn.W, resumed.loss_fn.W)
    assert first_log + resumed_log == straight_log and len(straight_log) == 6
    assert all("train/class_cosine" in step and "train/num_triplets" not in step for step in straight_log)
    # the checkpoint alone rebuilds the loss: the numbers are in its hyperparameters, W in its state dict
    loaded = RetrievalModule.load_from_checkpoint(tmp_path / "epoch0.ckpt")
    assert loaded.hparams["loss"]["num_classes"] == 6 and torch.equal(loaded.loss_fn.W, first.loss_fn.W)
    # an optimizer state of other groups (as written before p and W had their own) is one clear error, not torch's
    groups = saved["optimizer_states"][0]["param_groups"]
    groups[names.index("pooling")]["params"] += groups.pop(names.index("loss"))["params"]
    torch.save(saved, tmp_path / "other_groups.ckpt")
    with pytest.raises(CheckpointError, match=r"\('pooling', 2\)\] and this version trains .*\('loss', 1\)\]"):
        fit(class_module(loss), 2, tmp_path / "other_groups.ckpt")


def test_class_weights_stay_float32_under_bf16_autocast_and_val_loss_is_skipped_once(caplog):
    module = class_module({**SUBCENTER, "num_classes": 4})
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(4).repeat(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = module.compute_loss(images, labels)
    loss.backward()
    assert module.loss_fn.W.dtype == module.loss_fn.W.grad.dtype == torch.float32 and torch.isfinite(loss)
    assert -1.0 <= stats.class_cosine <= 1.0
    with caplog.at_level(logging.INFO, logger="oxford_ir.models.validation_loss"):
        assert held_out_loss(module, datamodule=None) is None
        assert held_out_loss(module, datamodule=None) is None
    said = [r.getMessage() for r in caplog.records if "val/loss" in r.getMessage()]
    assert len(said) == 1 and "SubCenterArcFaceLoss has weights only for the training classes" in said[0]
    with pytest.raises(ConfigError, match="model.loss_lr=-1.0"):
        class_module({**ARCFACE}, loss_lr=-1)


def test_oxford_ir_train_fills_num_classes_and_random_batches_come_from_every_training_image(
    tmp_path, caplog, monkeypatch
):
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", *ARCFACE_RANDOM)
    datamodule = hydra.utils.instantiate(cfg.data)
    train_cli._fill_class_count(cfg, datamodule)
    split = datamodule.split
    assert cfg.loss.num_classes == split.num_classes == 4 + 8  # 4 landmarks, 8 distractors: a class each
    with caplog.at_level(logging.INFO):
        model = hydra.utils.instantiate(cfg.model, _recursive_=False)
    assert tuple(model.loss_fn.W.shape) == (16, 12) and model.hparams["loss"]["num_classes"] == 12
    assert model.miner is None and model.hparams["miner"] is None  # the checkpoint says no miner was used
    assert "loss=ArcFaceLoss scores each image against every class's weights: BatchHardMiner is not used" in caplog.text
    datamodule.setup("fit")
    sampler = datamodule.train_sampler()
    assert isinstance(sampler, RandomBatchSampler) and sampler.batch_size == datamodule.batch_size == 3 * 2
    assert np.array_equal(sampler.indices, np.arange(len(datamodule.train_split)))  # distractors_per_batch > 0
    with pytest.raises(ConfigError, match="data.sampler='pk': choose balanced or random"):
        instantiate(compose_train(tmp_path, *TINY, "data.sampler=pk").data, "data")
    with pytest.raises(ConfigError, match="data.sampler=random and data.mining=pool exclude each other"):
        instantiate(compose_train(tmp_path, *TINY, "data.sampler=random", "data.mining=pool").data, "data")
    # a triplet loss on shuffled batches is warned about by oxford-ir-train, once, before anything trains
    monkeypatch.setattr(train_cli, "instantiate_loggers", stop)
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", "data.sampler=random", run="triplet")
    with caplog.at_level(logging.WARNING, logger="oxford_ir.cli.train"), pytest.raises(Stopped):
        train_cli.train(cfg)
    said = [r.getMessage() for r in caplog.records if "may hold no positives" in r.getMessage()]
    assert len(said) == 1 and "TripletMarginLoss" in said[0]


class Stopped(Exception):
    pass


def stop(*args, **kwargs):
    raise Stopped


@pytest.mark.slow  # three tiny train() runs, ~30-60 s on 2 cores; the fast suite has the resume of a bare Trainer
def test_arcface_on_shuffled_batches_resumes_through_oxford_ir_train_exactly(tmp_path):
    """2 epochs straight == 1 epoch + resume from last.ckpt through ``train(cfg)``: weights (W included), optimizer
    state, every logged CSV row, results; held-out landmarks, so val/loss is asked for and skipped."""

    def run(name: str, epochs: int, ckpt: Path | None = None) -> None:
        extra = [] if ckpt is None else [f"ckpt_path={ckpt}"]
        with restored_process_state():
            train_cli.train(compose_train(tmp_path, *TWO_EPOCHS, *ARCFACE_RANDOM, f"trainer.max_epochs={epochs}",
                                          *extra, run=name))  # fmt: skip

    run("straight", 2)
    run("resumed", 1)
    run("resumed", 2, tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    checkpoint = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    loss = checkpoint["hyper_parameters"]["loss"]
    assert tuple(checkpoint["state_dict"]["loss_fn.W"].shape) == (loss["embedding_size"], loss["num_classes"])
    rows = read_csv_metrics(tmp_path / "straight")
    assert any(row.get("train/class_cosine") for row in rows)
    assert not any(row.get("train/num_triplets") or row.get("val/loss") for row in rows)
