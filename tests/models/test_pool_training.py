"""Training on pool-mined tuples (``data.mining=pool``): Lightning's gradient accumulation against
cnnimageretrieval-pytorch's ``--update-every`` loop on a tiny model, and a resumed run against an uninterrupted one."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from oxford_ir.cli.train import train
from oxford_ir.data.tuple_mining import PoolSettings
from oxford_ir.models.module import RetrievalModule
from tests.models.test_tuple_layout import cirtorch_contrastive
from tests.test_train import TINY, TINY_SCRATCH, compose_train, read_csv_metrics, restored_process_state

T, NNUM, UPDATE_EVERY, LR = 2, 2, 2, 0.5
#: a linear network: raw pixels on a 2 x 2 grid, projected to 4 dimensions, L2-normalised (no BatchNorm, so a
#: batch gives what cirtorch's one image at a time gives)
LINEAR = ["backbone=raw_pixels", "backbone.grid=2", "pooling=flatten", "embedder.projection_dim=4",
          "loss=cirtorch_contrastive", "loss.neg_margin=1.2", "distance=euclidean", "miner=none", "optimizer=sgd",
          "optimizer.momentum=0.0", "optimizer.weight_decay=0.0", "logger=none"]  # fmt: skip


class TupleBatches(pl.LightningDataModule):
    """Fixed batches of T tuples of 2 + NNUM images, laid out as the datamodule lays them out."""

    tuple_layout = PoolSettings(qsize=8, poolsize=8, nnum=NNUM, tuples_per_batch=T)

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def cirtorch_train(embedder: torch.nn.Module, batches: list, lr: float) -> torch.nn.Module:
    """cirtorch's ``train()`` loop with SGD, literally: each image forwarded alone, one loss per tuple (its target:
    -1 query, 1 positive, 0 negatives) backpropagated at once, a step every ``update_every`` batches."""
    optimizer = torch.optim.SGD(embedder.parameters(), lr=lr)
    size = 2 + NNUM
    target = torch.tensor([-1.0, 1.0] + [0.0] * NNUM)
    optimizer.zero_grad()
    for i, (images, _) in enumerate(batches):
        for q in range(T):
            output = torch.stack([embedder(images[q * size + j][None])[0] for j in range(size)], dim=1)
            loss = cirtorch_contrastive(output, target, margin=1.2)
            assert loss > 0  # every tuple trains
            loss.backward()
        if (i + 1) % UPDATE_EVERY == 0:
            optimizer.step()
            optimizer.zero_grad()
    return embedder


def test_accumulated_batches_make_cirtorchs_update_every_step(tmp_path):
    """cirtorch forwards each tuple, backpropagates its summed loss, and steps every ``update_every`` batches: the
    gradient is the sum over the tuples of ``update_every`` batches. Lightning's ``accumulate_grad_batches`` divides
    each batch's loss by the count, so the step is cirtorch's at ``lr / update_every`` (with SGD; Adam's step does
    not depend on the gradient's scale): SGD at ``lr`` here equals cirtorch's loop at ``lr / update_every``."""
    cfg = compose_train(tmp_path, *TINY, *LINEAR, f"optimizer.lr={LR}")
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    module = RetrievalModule(**{k: v for k, v in settings.items() if not k.startswith("_")})
    reference, initial_embedder = copy.deepcopy(module.embedder), copy.deepcopy(module.embedder)
    generator = torch.Generator().manual_seed(0)
    size = 2 + NNUM
    batches = [(torch.randn(T * size, 3, 8, 8, generator=generator), torch.arange(T * size)) for _ in range(4)]

    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=UPDATE_EVERY, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=TupleBatches(batches))
    assert trainer.global_step == len(batches) // UPDATE_EVERY

    reference = cirtorch_train(reference, batches, lr=LR / UPDATE_EVERY)
    initial = dict(initial_embedder.named_parameters())
    for (name, ours), theirs in zip(module.embedder.named_parameters(), reference.parameters(), strict=True):
        assert (ours - initial[name]).abs().max() > 1e-3, name  # the two steps moved it
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), name
    # and not cirtorch's at the same lr: Lightning averages the accumulated batches where cirtorch sums them
    summed = dict(cirtorch_train(copy.deepcopy(initial_embedder), batches, lr=LR).named_parameters())
    assert not torch.allclose(module.embedder.projection.weight, summed["projection.weight"], rtol=0, atol=1e-3)


def test_whole_images_with_frozen_batchnorm_train_as_cirtorchs_one_image_at_a_time(tmp_path):
    """``data.train_images=whole`` + ``model.freeze_batchnorm``: batches are lists of images of several shapes (some
    equal, run together); the weights after 2 steps are those of cirtorch's loop, which forwards each image alone
    with BatchNorm in eval mode (``set_batchnorm_eval``). A scratch CNN with BatchNorm, GeM, SGD."""
    cfg = compose_train(
        tmp_path, *TINY, *TINY_SCRATCH, "loss=cirtorch_contrastive", "loss.neg_margin=1.2", "distance=euclidean",
        "miner=none", "optimizer=sgd", "optimizer.momentum=0.0", "optimizer.weight_decay=0.0", "logger=none",
        f"optimizer.lr={LR}", "model.freeze_batchnorm=true",
    )  # fmt: skip
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    module = RetrievalModule(**{k: v for k, v in settings.items() if not k.startswith("_")})
    reference, initial_embedder = copy.deepcopy(module.embedder), copy.deepcopy(module.embedder)
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 12), (12, 16), (16, 12), (10, 10), (16, 12), (12, 16), (14, 9), (16, 12)]  # repeated shapes
    batches = [
        ([torch.randn(3, *shapes[(i + j) % len(shapes)], generator=generator) for j in range(T * (2 + NNUM))],
         torch.arange(T * (2 + NNUM)))
        for i in range(4)
    ]  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=UPDATE_EVERY, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=TupleBatches(batches))
    assert trainer.global_step == len(batches) // UPDATE_EVERY

    reference.train()
    for layer in reference.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.eval()  # cirtorch's set_batchnorm_eval
    reference = cirtorch_train(reference, batches, lr=LR / UPDATE_EVERY)
    initial = dict(initial_embedder.named_parameters())
    for (name, ours), theirs in zip(module.embedder.named_parameters(), reference.parameters(), strict=True):
        assert (ours - initial[name]).abs().max() > 1e-4, name  # the steps moved it
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), name
    for ours, theirs in zip(module.embedder.buffers(), reference.buffers(), strict=True):
        assert torch.equal(ours, theirs)  # running statistics untouched on both sides


POOL = [*TINY, *TINY_SCRATCH, "data.mining=pool", "data.pool.qsize=6", "data.pool.poolsize=16", "data.pool.nnum=2",
        "data.pool.tuples_per_batch=2", "loss=cirtorch_contrastive", "distance=euclidean", "miner=none",
        "logger=csv", "trainer.deterministic=true", "test=false"]  # fmt: skip


def pool_run(tmp_path: Path, name: str, epochs: int, ckpt: Path | None = None, *more: str) -> tuple[dict, dict]:
    """``train(cfg)`` of ``POOL`` for ``epochs``: (its last.ckpt, the objects train returns)."""
    extra = [*more] if ckpt is None else [f"ckpt_path={ckpt}", *more]
    with restored_process_state():
        _, objects = train(compose_train(tmp_path, *POOL, f"trainer.max_epochs={epochs}", *extra, run=name))
    saved = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return saved, objects


def test_pool_mining_trains_on_each_tuples_pairs(tmp_path, monkeypatch):
    """One epoch: 3 batches of 2 tuples, each q and p of one class and 2 negatives of two other classes; the loss
    sees exactly each tuple's pairs: 1 positive and 2 negative pairs a tuple (2 x 2 triplets), every step. The P x K
    settings mean nothing to pool batches: more classes per batch than the split has is no error."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    saved, objects = pool_run(tmp_path, "run", 1, None, "data.classes_per_batch=50")
    epoch, tuples = objects["trainer"].train_dataloader.sampler.tuples
    labels = objects["datamodule"].train_labels
    assert epoch == 0 and tuples.shape == (6, 4) and saved["global_step"] == 3
    assert (labels[tuples[:, 0]] == labels[tuples[:, 1]]).all()
    assert (labels[tuples[:, 2:]] != labels[tuples[:, :1]]).all()
    assert (labels[tuples[:, 2]] != labels[tuples[:, 3]]).all()
    steps = [row for row in read_csv_metrics(tmp_path / "run") if row.get("train/num_triplets")]
    assert len(steps) == 3
    for row in steps:
        assert (float(row["train/num_triplets"]), float(row["train/num_pos_pairs"])) == (4.0, 2.0)
        assert float(row["train/num_neg_pairs"]) == 4.0 and float(row["train/loss"]) > 0


@pytest.mark.parametrize("frozen", [True, False])
def test_pool_mining_trains_on_whole_images(tmp_path, monkeypatch, frozen: bool):
    """The cirtorch setting end to end (``train(cfg)``): tuples mined, then trained on their whole images; with
    BatchNorm in training mode it still trains, with a warning that names ``model.freeze_batchnorm``."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved, objects = pool_run(tmp_path, "run", 1, None, "data.train_images=whole",
                                  f"model.freeze_batchnorm={str(frozen).lower()}")  # fmt: skip
    assert saved["global_step"] == 3 and objects["datamodule"].hparams.train_images == "whole"
    steps = [row for row in read_csv_metrics(tmp_path / "run") if row.get("train/num_triplets")]
    assert len(steps) == 3 and all(float(row["train/loss"]) > 0 for row in steps)
    warned = [w for w in caught if "data.train_images=whole with BatchNorm in training mode" in str(w.message)]
    assert bool(warned) == (not frozen)


@pytest.mark.slow
def test_pool_mining_resumes_exactly(tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch + resume from last.ckpt: the tuples of epoch 1, re-mined from the restored
    weights and the same draw, and the weights."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    straight, objects = pool_run(tmp_path, "straight", 2)
    epoch, tuples = objects["trainer"].train_dataloader.sampler.tuples
    assert epoch == 1 and straight["global_step"] == 6
    pool_run(tmp_path, "resumed", 1)
    resumed, objects = pool_run(tmp_path, "resumed", 2, tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert np.array_equal(objects["trainer"].train_dataloader.sampler.tuples[1], tuples)
    assert resumed["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_the_cirtorch_recipe_carries_the_published_settings(tmp_path):
    """experiment=cirtorch_sfm120k_r101 against the README command of cnnimageretrieval-pytorch (--arch resnet101
    --pool gem --loss contrastive --loss-margin 0.85 --optimizer adam --lr 5e-7 --neg-num 5 --query-size 2000
    --pool-size 22000 --batch-size 5 --image-size 362; weight decay 1e-6, p at 10x, decay exp(-0.01))."""
    cfg = compose_train(tmp_path, "experiment=cirtorch_sfm120k_r101")
    assert (cfg.backbone.name, cfg.pooling._target_) == ("resnet101", "oxford_ir.models.pooling.GeM")
    assert cfg.data.mining == "pool" and cfg.miner is None
    assert dict(cfg.data.pool) == {"qsize": 2000, "poolsize": 22000, "nnum": 5, "tuples_per_batch": 5}
    assert cfg.data.image_size == 362 and cfg.trainer.accumulate_grad_batches == 1
    assert cfg.data.train_images == "whole" and cfg.model.freeze_batchnorm  # whole images, BatchNorm frozen
    assert cfg.loss._target_.endswith("SquaredContrastiveLoss") and cfg.loss.neg_margin == 0.85
    assert cfg.loss.reducer._target_.endswith("SumReducer") and cfg.distance.p == 2
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("torch.optim.Adam", 5e-7, 1e-6)
    assert cfg.model.pooling_lr == pytest.approx(10 * cfg.optimizer.lr)
    assert cfg.scheduler.scheduler.gamma == pytest.approx(np.exp(-0.01), rel=1e-12)
