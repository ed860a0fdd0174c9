"""oxford-ir-compare on run folders made by hand with the real loggers (Lightning's CSVLogger, W&B offline): any
logged metric is plotted (``--metric train/loss_epoch``), identical curves are named and stay visible, folders that
are not runs are refused without writing anything, and nothing read from ``.hydra/`` ever runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from oxford_ir.cli.compare import main
from oxford_ir.run_comparison import PALETTE, differing_keys, plot_metric
from oxford_ir.run_history import find_run_folders, read_run

#: train/loss_epoch per epoch of three jobs: 0 and 1 identical (the margin changed nothing), 2 different
LOSSES = {0: [0.50, 0.40, 0.35], 1: [0.50, 0.40, 0.35], 2: [0.60, 0.30, 0.20]}
STEPS_PER_EPOCH = 4


def write_hydra(run: Path, overrides: list[str], config: dict | None = None) -> None:
    """What Hydra writes into a job's folder when it starts."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"trainer": {"max_epochs": 3}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def log_csv(run: Path, losses: list[float]) -> None:
    """Lightning's CSVLogger, as the training run logs: per-step loss, the epoch mean, val/mAP after each epoch."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(run, name="csv", version="")
    for epoch, loss in enumerate(losses):
        for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
            logger.log_metrics({"train/loss": loss + step / 100, "epoch": epoch}, step=step)
        last = (epoch + 1) * STEPS_PER_EPOCH - 1
        logger.log_metrics({"train/loss_epoch": loss, "epoch": epoch}, step=last)
        logger.log_metrics({"val/mAP": 0.2 + epoch / 10, "epoch": epoch}, step=last)
    logger.save()


def make_sweep(root: Path) -> Path:
    """A multirun folder of three jobs logged with Lightning's CSVLogger, differing in loss.margin."""
    sweep = root / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for job, losses in LOSSES.items():
        write_hydra(sweep / str(job), [f"loss.margin={0.1 * (job + 1):.1f}"])
        log_csv(sweep / str(job), losses)
    return sweep


def test_any_logged_metric_is_plotted_and_identical_curves_are_named_and_visible(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    assert main([str(sweep), "--metric", "train/loss_epoch", "--sort", "job"]) == 0
    printed = capsys.readouterr().out
    assert "jobs 0 and 1 have identical train/loss_epoch curves: the setting they differ in (loss.margin) has no " \
           "effect on it" in printed  # fmt: skip
    assert "train/loss_epoch per epoch: " in printed and (sweep / "train_loss_epoch.png").is_file()
    assert not (sweep / "val_mAP.png").exists()
    jobs = [read_run(folder) for folder in find_run_folders([sweep])]
    assert [job.curve("train/loss_epoch") for job in jobs] == [("epoch", dict(enumerate(v))) for v in LOSSES.values()]
    # the per-step loss is drawn per step
    assert jobs[2].curve("train/loss") == ("step", {s: LOSSES[2][s // 4] + s / 100 for s in range(12)})

    box = plot_metric(jobs, differing_keys(jobs), tmp_path / "loss.png", "train/loss_epoch")
    assert box.title == "train/loss_epoch per epoch: sweep"
    pixels = Image.open(tmp_path / "loss.png").convert("RGB").load()
    seen = {i: sum(pixels[x, y] == PALETTE[i] for x in range(box.left, box.right + 1)
                   for y in range(box.top, box.bottom + 1)) for i in range(3)}  # fmt: skip
    # job 1 is drawn dashed over job 0, which shows between its dashes: both colours stay on the plot
    assert seen[0] > 100 and seen[1] > 100 and seen[2] > 100, seen


def test_a_metric_no_run_logged_is_one_error_line_naming_those_logged(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(sweep), "--metric", "val/loss"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --metric val/loss: no run logged it; logged: train/loss, train/loss_epoch, val/mAP")
    assert len(err.splitlines()) == 1


def test_train_loss_epoch_from_a_real_wandb_offline_run(tmp_path, capsys, monkeypatch):
    """W&B offline writes ``run-<id>.wandb`` into the run folder, as WandbLogger logs (``trainer/global_step``)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "runs" / "single"
    write_hydra(run, ["loss.margin=0.3", "logger=wandb"])
    (run / "wandb_run_id").write_text("cmpwandb1\n")
    experiment = wandb.init(mode="offline", dir=str(run), id="cmpwandb1", project="compare-test")
    try:
        for epoch, loss in enumerate(LOSSES[2]):
            step = (epoch + 1) * STEPS_PER_EPOCH - 1
            experiment.log({"train/loss_epoch": loss, "epoch": epoch, "trainer/global_step": step})
            experiment.log({"val/mAP": 0.2 + epoch / 10, "epoch": epoch, "trainer/global_step": step})
    finally:
        experiment.finish()
    history = read_run(run)
    assert history.source == "wandb" and history.warnings == []
    assert history.curve("train/loss_epoch") == ("epoch", dict(enumerate(LOSSES[2])))
    assert main([str(run), "--metric", "train/loss_epoch", "--plot", str(tmp_path / "w.png")]) == 0
    assert Image.open(tmp_path / "w.png").format == "PNG"
    # a W&B file cut in its last record: a warning naming it, the records before it used
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-cmpwandb1.wandb")
    data = wandb_file.read_bytes()
    wandb_file.write_bytes(data[: len(data) - 20])
    cut = read_run(run)
    assert cut.curve("train/loss_epoch") == ("epoch", dict(enumerate(LOSSES[2])))
    assert len(cut.warnings) == 1 and re.fullmatch(rf"{re.escape(str(wandb_file))}: byte \d+: the last record is cut "
                                                   r"short .*: left out", cut.warnings[0])  # fmt: skip


def test_numbered_folders_that_are_not_runs_are_refused_and_nothing_is_written(tmp_path, capsys):
    photos = tmp_path / "photos"
    for name in ("0", "1", "2"):
        (photos / name).mkdir(parents=True)
        (photos / name / "img.jpg").write_bytes(b"\xff\xd8")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        main([str(photos)])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"error: {photos} is neither a run folder") and "multirun folder" in captured.err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_multirun_folder_lists_only_its_run_folders(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    (sweep / "7" / "notes").mkdir(parents=True)  # a numbered folder Hydra did not write a job into
    assert [p.name for p in find_run_folders([sweep])] == ["0", "1", "2"]


def test_nothing_read_from_hydra_files_is_instantiated_or_resolved(tmp_path, capsys):
    """A run folder is data: ``_target_`` nodes are never instantiated, resolvers (even one registered in this
    process) never called, environment variables never read into the table."""
    from omegaconf import OmegaConf

    pwned = tmp_path / "pwned"
    touch = {"_target_": "os.system", "_args_": [f"touch {pwned}"]}
    OmegaConf.register_new_resolver("compare_test_touch", lambda path: Path(path).touch() or "touched")
    try:
        sweep = make_sweep(tmp_path)
        config = {
            "_target_": "os.system", "_args_": [f"touch {pwned}"],
            "trainer": {"max_epochs": 3, "callbacks": touch},
            "loss": {"margin": f"${{compare_test_touch:{pwned}}}", "extra": touch},
            "logger": "${oc.env:COMPARE_TEST_SECRET}",
            "model": {"_target_": "os.system", "_args_": [f"touch {pwned}"], "_recursive_": True},
        }  # fmt: skip
        (sweep / "1" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (sweep / "1" / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"logger=${{compare_test_touch:{pwned}}}", "loss.margin=0.2"])
        )
        (sweep / "1" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": touch}}}))
        os.environ["COMPARE_TEST_SECRET"] = "s3cret"
        assert main([str(sweep), "--sort", "job", "--no-plot"]) == 0
        printed = capsys.readouterr().out
    finally:
        os.environ.pop("COMPARE_TEST_SECRET", None)
        OmegaConf.clear_resolver("compare_test_touch")
    assert not pwned.exists()
    assert "s3cret" not in printed and "touched" not in printed
    assert "compare_test_touch" in printed  # the override's text, shown as it is
