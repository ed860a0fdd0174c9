"""DDP through the real training path: ``oxford-ir-train trainer=ddp`` on 2 CPU processes (gloo).

Lightning's ``strategy=ddp`` starts rank 1 by running the console script again into the same Hydra run
folder; these tests check that this works with our run folders, that only rank 0 writes the run's files,
and that the evaluation of a DDP run equals a single-process evaluation of the same checkpoint.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from oxford_ir.cli.evaluate import evaluate_model
from oxford_ir.cli.train import train
from oxford_ir.errors import ConfigError
from oxford_ir.models.checkpoint import load_retrieval_checkpoint
from tests.test_train import TINY, TINY_SCRATCH, cli, compose_train

#: two CPU processes with the gloo backend; torch's SyncBatchNorm is CUDA-only
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false"]


def single_process_evaluation(checkpoint: Path, data_dir: Path) -> dict[str, float]:
    """The checkpoint's embedder evaluated in this one process by oxford-ir-eval's code (not the module's)."""
    embedder = load_retrieval_checkpoint(checkpoint).embedder
    results, _, _ = evaluate_model(embedder, ["synthetic"], data_dir, image_size=64, scales=[1.0], num_workers=0)
    return results["synthetic"]


def test_ddp_run_equals_single_process_evaluation(tmp_path):
    """2-process DDP training from the CLI; its evaluations equal one process evaluating its checkpoints.

    Exact equality: the full-precision table of ``metrics.json`` (mAP, mP@k) equals the single-process
    numbers bit for bit, and the logged float32 values of the last epoch's validation equal the float32 of
    the single-process evaluation of ``last.ckpt`` (so every process evaluated rank 0's weights and
    BatchNorm statistics, not its own).
    """
    run, data = tmp_path / "run", tmp_path / "data"
    result = cli(
        *TINY, *TINY_SCRATCH, *DDP_CPU, "trainer.max_epochs=2", "logger=many", f"paths.data_dir={data}",
        f"hydra.run.dir={run}", cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Starting with 2 processes" in result.stderr and "GLOBAL_RANK: 1" in result.stderr
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr

    # rank 1 ran in the same folder and wrote nothing of its own: one summary, one W&B run, one id
    assert result.stdout.count("run folder:") == 1
    run_id = (run / "wandb_run_id").read_text().strip()
    assert [p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")] == [run_id]
    assert not (tmp_path / "logs").exists() and not list(run.glob("*.tmp"))
    hydra_overrides = [str(o) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml")]
    assert not any(o.startswith(("hydra.job.name", "hydra.output_subdir")) for o in hydra_overrides)

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6  # 3 batches per process and epoch, 2 epochs
    (best,) = (run / "checkpoints").glob("best-epoch*.ckpt")

    # the final table (best checkpoint, evaluated by both processes, gathered) at full precision
    written = json.loads((run / "metrics.json").read_text())
    assert written["evaluations"]["final"]["synthetic"] == single_process_evaluation(best, data)
    assert "After training" in (run / "table.txt").read_text()

    # the last epoch's validation during fit, as logged (float32)
    with open(run / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/mAP")]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # 2 epochs, then the final validate
    fit_end = {k.removeprefix("val/synthetic/"): float(v) for k, v in rows[1].items() if k.startswith("val/synthetic/")}
    single = single_process_evaluation(run / "checkpoints" / "last.ckpt", data)
    assert fit_end == {k: float(np.float32(v)) for k, v in single.items()}


@pytest.mark.slow  # 17 s: DDP itself is tested by test_ddp_run_equals_single_process_evaluation in the fast suite
def test_ddp_multirun_jobs_each_start_their_own_processes(tmp_path):
    """A sweep of DDP jobs (default launcher): each job re-launches its own rank 1 into its own folder.

    Without the job's own command line, rank 1 would re-run the whole sweep; without closing the process
    group and restoring the launcher's environment, job 1 would reuse job 0's group or wait for a rank 1 that
    is never started.
    """
    result = cli(
        "-m", "loss.margin=0.1,0.2", *TINY, *TINY_SCRATCH, *DDP_CPU, "trainer.max_epochs=1", "logger=csv",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("Starting with 2 processes") == 2
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    margins = []
    for job in jobs:
        margins.append(OmegaConf.load(job / ".hydra" / "config.yaml").loss.margin)
        written = json.loads((job / "metrics.json").read_text())
        assert 0.0 <= written["evaluations"]["final"]["synthetic"]["mAP"] <= 1.0
        assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert margins == [0.1, 0.2]
    assert result.stdout.count("run folder:") == 2
    assert not (tmp_path / "logs").exists()  # no rank wrote a folder of its own


def test_ddp_trainer_configs(tmp_path):
    ddp = compose_train(tmp_path, "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2").trainer
    assert (ddp.strategy, ddp.devices, ddp.num_nodes, ddp.sync_batchnorm) == ("ddp", 8, 2, True)
    assert ddp.use_distributed_sampler is True and ddp.default_root_dir == str(tmp_path / "run")
    cpu = compose_train(tmp_path, "trainer=ddp_cpu").trainer
    assert (cpu.strategy, cpu.accelerator, cpu.devices, cpu.sync_batchnorm) == ("ddp", "cpu", 2, False)


def test_sync_batchnorm_on_cpu_is_one_clear_error(tmp_path):
    """torch's SyncBatchNorm raises deep inside DDP's constructor on CPU; we refuse it first, naming the fix."""
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "trainer=ddp", "trainer.accelerator=cpu", "logger=none")
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm=true needs GPUs.*trainer=ddp_cpu"):
        train(cfg)
