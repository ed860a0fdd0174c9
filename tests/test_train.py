"""oxford-ir-train end to end: composition of every experiment, real multiruns, resume, W&B offline, errors.

Everything runs on a tiny synthetic benchmark (4 landmarks, 64 px) with a tiny CNN, on the CPU. The console
script's ``main()`` runs in this process (``run_main``: real Hydra runs, multiruns and sweepers, without the ~6 s
a new process spends importing torch, Lightning and Hydra); a real subprocess (``cli``) where the process is the
point: the exact stderr of a failing run, and a resume in a fresh process.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from oxford_ir.cli.train import main, train
from oxford_ir.errors import CheckpointError, ConfigError
from tests.wandb_files import read_finished_records

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
TRAIN_SCRIPT = str(Path(sys.executable).parent / "oxford-ir-train")

#: a benchmark of 4 landmarks x (2 queries + 6 photos) + 8 distractors at 64 px, and a model to match
TINY_SYNTHETIC = {
    "n_landmarks": 4,
    "images_per_landmark": 6,
    "queries_per_landmark": 2,
    "hard_per_landmark": 1,
    "junk_per_landmark": 1,
    "n_distractors": 8,
    "photo_long_side": 64,
}
TINY = [
    *(f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()),
    "data.image_size=32",
    "data.eval_image_size=64",
    "data.classes_per_batch=3",
    "data.images_per_class=2",
    "data.distractors_per_batch=2",
    "data.batches_per_epoch=3",
    "data.num_workers=0",
    "data.eval_batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
TINY_SCRATCH = ["backbone=scratch", "backbone.channels=[8,16]"]


def compose_train(tmp_path: Path, *overrides: str, run: str = "run"):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", *overrides],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / run)
    return cfg


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [TRAIN_SCRIPT, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def restored_process_state():
    """Undo what a run changes in this process besides its files: torch's flags and thread count (Lightning's
    ``deterministic=true`` turns on deterministic algorithms) and the environment (and CUBLAS_WORKSPACE_CONFIG)."""
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
    )
    environment = dict(os.environ)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]
        torch.set_num_threads(flags[3])
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)


def run_main(
    *args: str, cwd: Path, env: dict | None = None, entry: Callable[[], object] = main, prog: str = TRAIN_SCRIPT
) -> subprocess.CompletedProcess:
    """A console script's ``main()`` (default ``oxford-ir-train``) with ``args``, in this process.

    The same call as the installed script makes, in ``cwd`` with ``env`` (W&B off unless given): real Hydra
    (run, multirun, sweepers, output folders), real Lightning. What it prints is returned as a finished
    process's ``stdout`` / ``stderr`` and its ``SystemExit`` as the return code. ``sys.argv``, the working
    directory, the environment, torch's flags, the logging handlers that Hydra configures and Hydra's global
    config (which ``--cfg`` and the joblib launcher leave set) are restored afterwards.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hydra_config = HydraConfig.instance().cfg
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with restored_process_state(), pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [prog, *args])
        for key, value in {"WANDB_MODE": "disabled", **(env or {})}.items():
            patch.setenv(key, value)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                entry()
        except SystemExit as stop:
            code = stop.code
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
            HydraConfig.instance().cfg = hydra_config
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess([prog, *args], returncode, out.getvalue(), err.getvalue())


def test_run_main_leaves_this_process_as_it_found_it(tmp_path):
    """What the tests below rely on: after ``run_main`` the next test starts from the same process state."""
    before = (sys.argv[:], os.getcwd(), logging.getLogger().handlers[:], HydraConfig.instance().cfg, dict(os.environ))
    result = run_main("--cfg", "job", "seed=7", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0 and "seed: 7" in result.stdout.splitlines()
    after = (sys.argv, os.getcwd(), logging.getLogger().handlers, HydraConfig.instance().cfg, dict(os.environ))
    assert after == before
    assert not GlobalHydra.instance().is_initialized()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(tmp_path, experiment):
    cfg = compose_train(tmp_path, f"experiment={experiment}", "backbone.weights=none")
    if "num_classes" in cfg.loss and cfg.loss.num_classes is None:  # a class loss: oxford-ir-train fills it in
        cfg.loss.num_classes = 7
    OmegaConf.resolve(cfg.model)  # every interpolation of the model resolves
    import hydra

    model = hydra.utils.instantiate(cfg.model, _recursive_=False)
    assert model.embedder.embedding_dim > 0
    assert cfg.model._target_ == "oxford_ir.models.module.RetrievalModule"
    assert cfg.data._target_ == "oxford_ir.data.datamodule.RetrievalDataModule"


def test_experiments_carry_their_recipes(tmp_path):
    seed = compose_train(tmp_path, "experiment=seed_scratch")
    # the original project's small network: 200 px, 32-d, Adam 1e-3, margin 0.1
    assert (seed.data.image_size, seed.embedder.projection_dim) == (200, 32)
    assert (seed.optimizer.lr, seed.loss.margin, seed.optimizer._target_) == (1e-3, 0.1, "torch.optim.Adam")
    assert seed.data.split == "seed" and seed.miner is None
    gem = compose_train(tmp_path, "experiment=gem_resnet50")
    assert gem.backbone._target_.endswith("ResNet50") and gem.backbone.weights == "imagenet"
    assert gem.pooling._target_.endswith("GeM") and gem.miner._target_.endswith("BatchHardMiner")
    assert gem.data.split == "cross" and gem.data.eval_benchmark == "roxford5k"
    quick = compose_train(tmp_path, "experiment=quickstart")
    assert quick.data.benchmark in ("synthetic", "rsynthetic") and quick.trainer.accelerator == "cpu"


def read_csv_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


#: the shared two-epoch run's overrides (deterministic: the resume test compares a resumed run with it): TINY with a
#: fifth landmark, landmark-disjoint (3 trained, 2 held out: evaluated, and the batches of val/loss)
HELD_OUT = ["data.synthetic.n_landmarks=5", "data.split=landmarks", "data.n_held_out=2"]
TWO_EPOCHS = [
    *(o for o in TINY if not o.startswith("data.synthetic.n_landmarks=")), *HELD_OUT, *TINY_SCRATCH, "logger=csv",
    "trainer.deterministic=true",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One uninterrupted two-epoch run (``TWO_EPOCHS``, ``trainer.max_epochs=2``), shared by the tests that only
    read what it wrote: its folder ``run``, its data folder ``data``, the returned ``metrics``, the trainer's
    ``global_step`` and what it printed (``stdout``)."""
    root = tmp_path_factory.mktemp("two_epochs")
    printed = io.StringIO()
    with restored_process_state(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")
        cfg = compose_train(root, *TWO_EPOCHS, "trainer.max_epochs=2")
        with contextlib.redirect_stdout(printed):
            metrics, objects = train(cfg)
    return SimpleNamespace(
        run=root / "run",
        data=root / "data",
        metrics=metrics,
        global_step=objects["trainer"].global_step,
        stdout=printed.getvalue(),
    )


def test_train_logs_mining_statistics_and_writes_checkpoints(two_epochs):
    run = two_epochs.run
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    assert two_epochs.global_step == 6
    rows = read_csv_metrics(run)
    names = set(rows[0])
    assert {"train/loss", "train/num_triplets", "train/active_fraction", "val/mAP", "val/synthetic/mAP"} <= names
    triplets = [float(r["train/num_triplets"]) for r in rows if r.get("train/num_triplets")]
    # one whole count per step, and the tiny run does mine triplets (a batch without any would train nothing)
    assert len(triplets) == 6 and all(t == int(t) for t in triplets) and sum(triplets) > 0
    # loss curves: the epoch mean of the training loss and the loss on the held-out landmarks, once per epoch
    step_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    epoch_means = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert epoch_means == pytest.approx([sum(step_losses[:3]) / 3, sum(step_losses[3:]) / 3])
    val_losses = [(r["epoch"], float(r["val/loss"])) for r in rows if r.get("val/loss")]
    assert [epoch for epoch, _ in val_losses] == ["0", "1", "2"] and all(v > 0 for _, v in val_losses)  # 2: final
    assert two_epochs.metrics["final/val/loss"] == val_losses[-1][1]
    assert 0.0 <= two_epochs.metrics["final/val/mAP"] <= 1.0
    # grids and per-query tables are written with any logger: two epochs, then the best checkpoint's evaluation
    assert len(list((run / "retrieval_grids").glob("epoch*.png"))) == 2
    assert len(list((run / "retrieval_grids").glob("validate_*.png"))) == 1
    assert len(list((run / "per_query_ap").glob("epoch*.csv"))) == 2
    out = two_epochs.stdout
    assert "After training (best checkpoint)" in out and str(run) in out


def test_training_learns_on_the_synthetic_benchmark(tmp_path):
    """The quickstart recipe on the tiny benchmark: validation mAP clearly above the untrained network's.

    The recipe (scratch CNN, GeM, semi-hard mining, Revisited protocol), shrunk: 4 landmarks at 64 px, 48 px
    crops, 4 x 4 images a batch, 3 epochs x 10 batches. Measured when written (Revisited Medium mAP, ~5 s on
    2 cores): untrained 0.2816, trained 0.6404 (seed 42); with seeds 0-5, 0.29-0.33 -> 0.59-0.73. The full-size
    quickstart is ``test_quickstart_learns_on_the_default_synthetic_benchmark`` (slow).
    """
    cfg = compose_train(
        tmp_path, "experiment=quickstart", *(f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()),
        "data.image_size=48", "data.eval_image_size=64", "data.classes_per_batch=4", "data.images_per_class=4",
        "data.batches_per_epoch=10", "trainer.max_epochs=3", "logger=csv", "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    metrics, _ = train(cfg)
    before, after = metrics["untrained/val/mAP"], metrics["final/val/mAP"]
    print(f"untrained val/mAP {before:.4f} -> trained {after:.4f}")
    assert after > before + 0.2


@pytest.mark.slow  # ~35-65 s on 2 cores; test_training_learns_on_the_synthetic_benchmark covers the default suite
def test_quickstart_learns_on_the_default_synthetic_benchmark(tmp_path):
    """The quickstart recipe, shortened: validation mAP clearly above the untrained network's.

    Measured when written (seed 42, the default synthetic benchmark, Revisited Medium mAP,
    6 epochs x 20 batches, ~35 s on 2 cores): untrained 0.2415, trained 0.6358.
    """
    cfg = compose_train(
        tmp_path, "experiment=quickstart", "logger=csv", "trainer.max_epochs=6", "data.batches_per_epoch=20",
        "data.num_workers=0", "trainer.enable_progress_bar=false",
    )  # fmt: skip
    metrics, _ = train(cfg)
    before, after = metrics["untrained/val/mAP"], metrics["final/val/mAP"]
    print(f"untrained val/mAP {before:.4f} -> trained {after:.4f}")
    assert after > before + 0.1


def test_resume_after_sigkill_mid_epoch_continues_the_same_run_exactly(tmp_path, two_epochs):
    """SIGKILL in the middle of epoch 1, resume: the same folder, W&B id, step counter, weights, optimizer state,
    logged rows and results as an uninterrupted run (the shared two-epoch run, same overrides and data).

    The killed run and the resume are real processes; the killed one loads its batches with 2 workers (the
    uninterrupted one with none: what is trained on depends on the sampler only). On the code before the fix the
    resumed epoch trained on epoch 0's batches (the workers drew them before Lightning set the sampler's epoch),
    and the CSV logger deleted the rows logged before the kill.
    """
    args = [*TWO_EPOCHS, f"paths.data_dir={two_epochs.data}", "trainer.max_epochs=2"]
    killed = tmp_path / "killed"
    kill = ["+callbacks.kill._target_=tests.reliability.kill_training.KillAt", "+callbacks.kill.point=train_batch"]
    environment = {"PYTHONPATH": str(REPO)}
    part = cli(*args, "data.num_workers=2", *kill, "+callbacks.kill.at=4", f"hydra.run.dir={killed}", cwd=tmp_path,
               env=environment)  # fmt: skip
    assert part.returncode == -9, part.stderr[-3000:]
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "metrics.json").exists()
    run_id = (killed / "wandb_run_id").read_text()
    # the saved overrides are re-applied; the kill is taken out
    resumed = cli(f"resume={killed}", "~callbacks.kill", cwd=tmp_path, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed / "wandb_run_id").read_text() == run_id
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("last.ckpt"))

    assert_same_run(killed, two_epochs.run)


def assert_same_run(resumed: Path, reference: Path) -> None:
    """``resumed`` ended exactly as the uninterrupted ``reference``: step, weights, optimizer state, every logged
    CSV row (none twice), ``metrics.json``, ``table.txt`` and the checkpoint files."""
    a = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    assert a["epoch"] == b["epoch"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert read_csv_metrics(resumed) == read_csv_metrics(reference)
    results = [json.loads((folder / "metrics.json").read_text()) for folder in (resumed, reference)]
    assert results[0] == results[1]
    assert (resumed / "table.txt").read_text() == (reference / "table.txt").read_text()
    names = [sorted(p.name for p in (folder / "checkpoints").iterdir()) for folder in (resumed, reference)]
    assert names[0] == names[1]


def test_ctrl_c_mid_epoch_then_resume_continues_the_same_run_exactly(tmp_path, two_epochs):
    """Ctrl-C (SIGINT to the run's process group, workers included, as a terminal sends it) in the middle of
    epoch 1, then ``resume=``: exit 130 without a traceback, the ``resume with`` line printed, nothing saved at the
    stop (``last.ckpt`` is still the end of epoch 0, no ``best-*`` of the unvalidated epoch 1), and the resumed run
    ends exactly as the uninterrupted one. Before the fix the stop overwrote ``last.ckpt`` with the mid-epoch state
    and saved it as ``best-epoch001.ckpt``, exited 1 without the resume line, and the resume ended elsewhere."""
    from tests.reliability.processes import environment
    from tests.reliability.processes import run as run_process

    args = [*TWO_EPOCHS, f"paths.data_dir={two_epochs.data}", "trainer.max_epochs=2"]
    stopped = tmp_path / "stopped"
    kill = ["+callbacks.kill._target_=tests.reliability.kill_training.KillAt", "+callbacks.kill.point=train_batch",
            "+callbacks.kill.at=4", "+callbacks.kill.signal=SIGINT"]  # fmt: skip
    env = environment(PYTHONPATH=str(REPO))
    part = run_process([TRAIN_SCRIPT, *args, "data.num_workers=2", *kill, f"hydra.run.dir={stopped}"], cwd=tmp_path,
                       env=env, timeout=120)  # fmt: skip
    assert part.returncode == 130 and not part.traceback, part.stderr[-3000:]
    assert f"resume with:  oxford-ir-train resume={stopped}" in part.stdout, part.stdout[-2000:]
    assert not part.error_lines and not (stopped / "metrics.json").exists()
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (0, 3)  # the end of epoch 0, not the stop at step 4
    resumed = run_main(f"resume={stopped}", "~callbacks.kill", cwd=tmp_path)  # in this process: no 6 s of imports
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(stopped, two_epochs.run)


def test_resume_errors_are_clear(tmp_path):
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", f"resume={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="no such run folder"):
        train(cfg)
    (tmp_path / "empty").mkdir()
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", f"resume={tmp_path / 'empty'}", run="empty")
    with pytest.raises(ConfigError, match="last.ckpt does not exist and .* is not a run folder"):
        train(cfg)
    # the console script's own check, before Hydra composes anything
    result = run_main(f"resume={tmp_path / 'empty'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a run folder" in result.stderr


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path, two_epochs):
    other = compose_train(
        tmp_path, *TINY, "backbone=scratch", "backbone.channels=[8,32]", "logger=none",
        f"ckpt_path={two_epochs.run / 'checkpoints' / 'last.ckpt'}", run="other",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="last.ckpt"):
        train(other)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    broken = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", f"ckpt_path={tmp_path / 'broken.ckpt'}")
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        train(broken)


def assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.images_per_class=50", "images_per_class"),
        ("data.split=nonsense", "split"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
    ],
)
def test_bad_config_values_are_one_clear_error(tmp_path, override, message):
    """``oxford-ir-train``'s main() in this process: exit status 2 and one ``error:`` line naming the key."""
    result = run_main(*TINY, *TINY_SCRATCH, override, f"paths.data_dir={tmp_path / 'data'}",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert_one_error_line(result, message)


def test_bad_config_value_is_one_line_on_the_console_scripts_stderr(tmp_path):
    """The installed console script in its own process: all it writes to stderr holds one ``error:`` line and
    no traceback (the error is raised inside Lightning's fit, which wraps it)."""
    result = cli(*TINY, *TINY_SCRATCH, "data.images_per_class=50", f"paths.data_dir={tmp_path / 'data'}",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert_one_error_line(result, "images_per_class")


def test_multirun_over_every_experiment(tmp_path):
    """A real Hydra multirun: one job per experiment, each in its own folder, with fast_dev_run."""
    result = run_main(
        "-m", f"experiment={','.join(EXPERIMENTS)}", "debug=fast_dev_run", "data=synthetic", "backbone.weights=none",
        # the recipes' own evaluated benchmarks (roxford5k, ...) are real data: the synthetic one stands for them
        "data.benchmark=synthetic", "data.eval_benchmark=null", "data.extra_eval_benchmarks=[]", "data.pool.qsize=8",
        "data.pool.poolsize=32",
        "logger=csv", *TINY, "data.eval_image_size=64", "embedder.projection_dim=16",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == len(EXPERIMENTS)
    chosen = {OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices.experiment for job in jobs}
    assert chosen == set(EXPERIMENTS)
    ids = set()
    for job in jobs:
        ids.add((job / "wandb_run_id").read_text())
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "debug.log").is_file(), job
    assert len(ids) == len(EXPERIMENTS)
    assert result.stdout.count("run folder:") == len(EXPERIMENTS)


def test_wandb_offline_run_files_hold_metrics_images_table_and_group(tmp_path):
    """Real W&B, offline: a two-job sweep writes two runs in one group with metrics, grids and AP tables."""
    result = run_main(
        "-m", "loss.margin=0.1,0.2", *TINY, *TINY_SCRATCH, "logger=wandb", "trainer.max_epochs=1",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 2
    ids, groups = set(), set()
    for job in jobs:
        run_id = (job / "wandb_run_id").read_text().strip()
        (folder,) = (job / "wandb").glob(f"offline-run-*-{run_id}")
        ids.add(run_id)
        (wandb_file,) = folder.glob("run-*.wandb")
        records = read_finished_records(wandb_file)
        run_record = next(r.run for r in records if r.HasField("run"))
        groups.add(run_record.run_group)
        assert {"dataset:synthetic", "backbone:scratch"} <= set(run_record.tags)
        history_keys = {
            item.key or item.nested_key[0] for r in records if r.HasField("history") for item in r.history.item
        }
        assert {"train/loss", "train/num_triplets", "train/active_fraction", "val/mAP"} <= history_keys
        assert "val/retrieval_grid" in history_keys and "val/per_query_ap" in history_keys
        config = {item.key for r in records if r.HasField("config") for item in r.config.update}
        assert {"data", "model", "trainer", "loss"} <= config
        assert list((folder / "files" / "media" / "images").rglob("*.png"))
        tables = list((folder / "files" / "media" / "table").rglob("*.table.json"))
        assert tables and "AP" in json.loads(tables[0].read_text())["columns"][-1]
    assert len(ids) == 2
    assert groups == {"sweep"}


def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path):
    """hparams_search=optuna: a real Optuna study over margin, lr and miner, maximising val/mAP."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_main(
        "hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        *TINY, *TINY_SCRATCH, "logger=none", "trainer.max_epochs=1", "test=false",
        f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert set(summary.best_params) == {"loss.margin", "optimizer.lr", "miner"}
    assert 0.0 < summary.best_value <= 1.0
    assert len(list((tmp_path / "sweep").glob("[0-9]*/checkpoints/last.ckpt"))) == 2


def test_grid_search_config_sweeps_margin_and_miner(tmp_path):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=grid"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"loss.margin": "0.1,0.2", "miner": "triplet_semihard,triplet_all"}
    assert cfg.optimized_metric == "val/mAP"
