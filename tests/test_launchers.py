"""Hydra launchers: joblib for local parallel sweeps, submitit for SLURM (conf/hydra/launcher/slurm.yaml).

The SLURM config is checked by composition (no cluster here); submitit's local executor runs the same
pickled job that the SLURM launcher submits.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from tests.test_train import REPO, TINY, TINY_SCRATCH, cli, run_main

LAUNCHER_DIR = REPO / "conf" / "hydra" / "launcher"
SLURM_2x8 = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"]


def compose_launcher(tmp_path: Path, *overrides: str):
    """The resolved ``hydra.launcher`` node of oxford-ir-train's config."""
    with warnings.catch_warnings():
        # Hydra warns when a yaml is matched against a structured config of the same name (deprecated)
        warnings.simplefilter("error", UserWarning)
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                return_hydra_config=True,
            )
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_our_launcher_configs_do_not_shadow_the_plugins():
    """A yaml named like a plugin's config would replace it (or include itself with `defaults: [<name>]`).

    Composing once makes Hydra discover the plugins, which register their configs in the ConfigStore.
    """
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        compose("train", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    registered = set(ConfigStore.instance().list("hydra/launcher"))
    assert {"joblib.yaml", "submitit_slurm.yaml", "submitit_local.yaml"} <= registered
    ours = {p.name for p in LAUNCHER_DIR.glob("*.yaml")}
    assert "slurm.yaml" in ours and not ours & registered


def test_joblib_launcher_composes(tmp_path):
    launcher = compose_launcher(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert launcher["_target_"] == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher["n_jobs"] == 2 and launcher["backend"] is None


def test_slurm_launcher_follows_the_trainer(tmp_path):
    """2 nodes x 8 GPUs: one task per GPU (Lightning's SLURM requirement), nodes = trainer.num_nodes."""
    launcher = compose_launcher(tmp_path, *SLURM_2x8, "hydra.launcher.partition=gpu", "hydra.launcher.account=lab")
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert (launcher["partition"], launcher["account"]) == ("gpu", "lab")
    assert launcher["submitit_folder"] == f"{tmp_path / 'sweep'}/submitit/%j"
    assert launcher["timeout_min"] == 1440 and launcher["cpus_per_task"] == 8 and launcher["mem_gb"] == 64
    assert launcher["array_parallelism"] == 8 and launcher["max_num_timeout"] == 0
    assert launcher["setup"][0].startswith("source ") and launcher["setup"][0].endswith("/bin/activate")
    assert launcher["setup"][1] == "export OMP_NUM_THREADS=8"
    # a single-GPU trainer without num_nodes: one node, one task, one GPU
    single = compose_launcher(tmp_path, "hydra/launcher=slurm", "trainer=gpu")
    assert (single["nodes"], single["tasks_per_node"], single["gpus_per_node"]) == (1, 1, 1)


def test_slurm_launcher_resolves_in_the_real_cli(tmp_path):
    """``--cfg all --resolve`` of the console script's main(): what submitit would receive, without submitting.

    (``--cfg hydra --resolve`` cannot resolve it: the hydra node alone lacks ``paths``.)
    """
    result = run_main(*SLURM_2x8, f"hydra.sweep.dir={tmp_path / 'sweep'}", "--cfg", "all", "--resolve", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = OmegaConf.create(result.stdout).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.name == "train" and launcher.submitit_folder == f"{tmp_path / 'sweep'}/submitit/%j"
    assert list(launcher.setup)[1] == "export OMP_NUM_THREADS=8"
    assert not (tmp_path / "sweep").exists()  # nothing was launched


def fast_dev_run_sweep(tmp_path: Path, *launcher: str, run=cli):
    """A two-job sweep over loss.margin with fast_dev_run, through ``run`` (a subprocess, or ``run_main``)."""
    return run(
        "-m", *launcher, "loss.margin=0.1,0.2", "debug=fast_dev_run", "logger=csv", *TINY, *TINY_SCRATCH,
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip


def assert_two_finished_jobs(sweep: Path) -> list[Path]:
    jobs = sorted(sweep.glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    margins = [OmegaConf.load(job / ".hydra" / "config.yaml").loss.margin for job in jobs]
    assert margins == [0.1, 0.2]
    ids = set()
    for job in jobs:
        assert "train/loss" in json.loads((job / "metrics.json").read_text())["metrics"], job
        assert (job / "debug.log").is_file(), job
        ids.add((job / "wandb_run_id").read_text())
    assert len(ids) == 2
    return jobs


def test_joblib_multirun_runs_jobs_in_parallel_processes(tmp_path):
    """The sweep is oxford-ir-train's main() in this process; joblib's worker processes run the two jobs."""
    from joblib.externals.loky import get_reusable_executor

    try:
        result = fast_dev_run_sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", run=run_main)
    finally:
        get_reusable_executor().shutdown(wait=True)  # joblib keeps its workers for reuse: none outlive the test
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert_two_finished_jobs(tmp_path / "sweep")


@pytest.mark.slow  # 18-28 s on 2 shared cores; the joblib test covers the default suite
def test_submitit_local_multirun_runs_the_pickled_jobs(tmp_path):
    """submitit's local executor: the job is pickled, run by another python process, its result read back."""
    result = fast_dev_run_sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_two_finished_jobs(tmp_path / "sweep")
    logs = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2 and all("run folder:" in log.read_text() for log in logs)


def test_ddp_inside_a_joblib_worker_is_one_clear_error(tmp_path):
    """strategy=ddp re-runs the command line for rank 1; a loky worker's is ``python -m ...popen_loky_posix``.

    oxford-ir-train's main() in this process; the check reads the sweep's launcher, so it also refuses the job
    that joblib (``n_jobs=1``) runs in the calling process.
    """
    result = run_main(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "loss.margin=0.1", *TINY, *TINY_SCRATCH,
        "trainer=ddp_cpu", "trainer.max_epochs=1", "logger=none", f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "JoblibLauncher" in errors[0] and "hydra/launcher=slurm" in errors[0]
