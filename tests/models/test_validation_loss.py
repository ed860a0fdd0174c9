"""``val/loss``: the training loss on P x K batches of the held-out landmarks, against a brute-force recomputation.

A real ``RetrievalDataModule`` (the tiny synthetic benchmark of the training tests with a fifth landmark, 2 of 5
held out) and a real ``RetrievalModule`` (the tiny scratch CNN, triplet loss, batch-hard mining, cosine), validated
by a real Trainer; the brute force embeds the same batches and takes, for every anchor, its least similar positive
and most similar negative, and averages the triplets that violate the margin (pytorch-metric-learning's
``AvgNonZeroReducer``).
"""

from __future__ import annotations

import logging

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from tests.test_train import HELD_OUT, TINY, TINY_SCRATCH, compose_train

SETTINGS = [*(o for o in TINY if not o.startswith("data.synthetic.n_landmarks=")), *TINY_SCRATCH, "logger=none"]


def _parts(tmp_path, *overrides: str):
    cfg = compose_train(tmp_path, *SETTINGS, "miner=batch_hard", *overrides)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model, _recursive_=False)
    return cfg, datamodule, model


def brute_force_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    similarity = embeddings @ embeddings.T  # cosine: the embeddings are L2-normalised
    same = labels[:, None] == labels[None, :]
    itself = torch.eye(len(labels), dtype=torch.bool)
    hardest_positive = similarity.masked_fill(~same | itself, float("inf")).min(dim=1).values
    hardest_negative = similarity.masked_fill(same, float("-inf")).max(dim=1).values
    violation = torch.relu(hardest_negative - hardest_positive + margin)
    return violation[violation > 0].mean() if (violation > 0).any() else torch.zeros(())


def test_val_loss_equals_a_brute_force_recomputation_on_the_same_batches(tmp_path):
    cfg, datamodule, model = _parts(tmp_path, *HELD_OUT, "data.val_loss_batches=3")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    logged = float(trainer.callback_metrics["val/loss"])

    batches = list(datamodule.val_loss_dataloader("cpu"))
    assert len(batches) == 3
    model.eval()
    losses = []
    with torch.no_grad():
        for images, labels in batches:
            assert images.shape[0] == 2 * 2 and len(set(labels.tolist())) == 2  # P = 2 held-out landmarks x K = 2
            losses.append(brute_force_triplet_loss(model.embedder(images), labels, float(cfg.loss.margin)))
    assert logged == pytest.approx(float(torch.stack(losses).mean()), abs=1e-6)
    assert logged > 0
    # the images are the held-out landmarks' own (training never sees any), the same at every validation
    held, _ = datamodule._val_loss
    assert held.paths and not {str(p) for p in held.paths} & {str(p) for p in datamodule.split.paths}
    again = list(datamodule.val_loss_dataloader("cpu"))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


def test_val_loss_leaves_the_global_random_state_alone(tmp_path):
    _, datamodule, _ = _parts(tmp_path, *HELD_OUT)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy())
    batches = list(datamodule.val_loss_dataloader("cpu"))
    after = (torch.get_rng_state(), np.random.get_state()[1].copy())
    assert len(batches) == 4  # data.val_loss_batches' default
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_the_seed_split_logs_no_val_loss_and_says_why_once(tmp_path, caplog):
    _, datamodule, _ = _parts(tmp_path, "data.synthetic.n_landmarks=5")
    with caplog.at_level(logging.INFO, logger="oxford_ir.data.datamodule"):
        assert datamodule.val_loss_dataloader("cpu") is None
        assert datamodule.val_loss_dataloader("cpu") is None
    said = [r.getMessage() for r in caplog.records if "val/loss" in r.getMessage()]
    assert len(said) == 1 and "data.split=seed" in said[0], said
