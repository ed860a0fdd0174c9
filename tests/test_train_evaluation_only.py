"""``oxford-ir-train train=false``: an evaluation of the network as configured (or of ``ckpt_path``), reported as
such: no "before training" title, no checkpoints folder or resume line that do not exist, the selection metric
from the evaluation (issue 22: each of these was printed for an evaluation-only run)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from oxford_ir.cli.train import _selection_metric
from tests.test_train import TINY, TINY_SCRATCH, compose_train, run_main


def test_an_evaluation_only_run_says_what_it_evaluated_and_nothing_it_did_not(tmp_path):
    args = [*TINY, *TINY_SCRATCH, "train=false", "logger=none", f"paths.data_dir={tmp_path / 'data'}",
            "validate_before_training=true"]  # fmt: skip
    result = run_main(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Evaluation (train=false: the network as configured, not trained)" in out
    assert "Before training" not in out and "After training" not in out
    assert out.count("mAP") == 1  # one table: the same network is not evaluated twice
    assert "checkpoints:" not in out and "resume with" not in out
    assert "was not logged" not in result.stderr
    table = (tmp_path / "run" / "table.txt").read_text()
    assert table.startswith("Evaluation (train=false")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    cfg = compose_train(tmp_path, *args)
    assert _selection_metric(metrics, cfg) == metrics["untrained/val/mAP"] > 0


@pytest.mark.slow
def test_an_evaluation_only_run_of_a_checkpoint_evaluates_its_weights(tmp_path):
    """Before, ``train=false ckpt_path=...`` evaluated the network built from the config, not the checkpoint."""
    args = [*TINY, *TINY_SCRATCH, "logger=none", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=1"]
    trained = run_main(*args, f"hydra.run.dir={tmp_path / 'trained'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = json.loads((tmp_path / "trained" / "metrics.json").read_text())["metrics"]["final/val/mAP"]
    best = tmp_path / "model.ckpt"  # outside the run folder (a ckpt_path inside one resumes that run)
    shutil.copy(next((tmp_path / "trained" / "checkpoints").glob("best-*.ckpt")), best)
    assert torch.load(best, weights_only=True)["state_dict"]
    result = run_main(*args, "train=false", f"ckpt_path={best}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluation (train=false: the checkpoint given as ckpt_path, not trained)" in result.stdout
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["final/val/mAP"]
    assert evaluated == final  # the checkpoint's weights, not a freshly initialised network
