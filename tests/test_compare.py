"""oxford-ir-compare on real runs: a 2-job multirun (logger=csv) and a W&B-offline run, read back from their folders.

Every number of the table is checked against the run's own files (``csv/metrics.csv``, the W&B run file read with
``tests.wandb_files``, ``metrics.json``); a sweep in progress is a copy of the finished one cut back (a job without
``metrics.json`` whose CSV stops mid-line, a job just started whose folder a process holds as training does).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from oxford_ir.cli.compare import PLOT_NAME, main
from oxford_ir.run_comparison import PALETTE, PLOT_SIZE, differing_keys, plot_metric
from oxford_ir.run_history import curve, epoch_rows, find_run_folders, read_run, wall_seconds
from tests.reliability.processes import lock_held_elsewhere
from tests.test_train import TINY, TINY_SCRATCH, TRAIN_SCRIPT, run_main
from tests.wandb_files import read_records

COMPARE_SCRIPT = str(Path(sys.executable).parent / "oxford-ir-compare")
#: both runs: two epochs on the revisited synthetic benchmark (final Easy / Medium / Hard mAP), without the image
#: grids and per-query tables (half the time of a run this small)
RUN = [*TINY, *TINY_SCRATCH, "trainer.max_epochs=2", "data.benchmark=rsynthetic", "callbacks.retrieval_grid=null",
       "callbacks.per_query_table=null"]  # fmt: skip
EPOCHS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A real 2-job multirun over ``loss.margin`` with ``logger=csv`` (``sweep``) and a real single run with
    ``logger=wandb`` offline and another margin (``single``), sharing one data folder."""
    root = tmp_path_factory.mktemp("compare")
    data = f"paths.data_dir={root / 'data'}"
    sweep = run_main("-m", "loss.margin=0.1,0.2", *RUN, "logger=csv", data, f"hydra.sweep.dir={root / 'sweep'}",
                     cwd=root)  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    single = run_main("loss.margin=0.3", *RUN, "logger=wandb", data, f"hydra.run.dir={root / 'single'}", cwd=root,
                      env={"WANDB_MODE": "offline", "WANDB_DIR": str(root)})  # fmt: skip
    assert single.returncode == 0, single.stderr[-4000:]
    return SimpleNamespace(root=root, sweep=root / "sweep", single=root / "single")


def compare(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[list[str], list[dict[str, str]], str]:
    """``oxford-ir-compare args`` in this process: (header, rows as {column: cell}, everything printed)."""
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    assert set(lines[1]) == {"-"}
    body = lines[2 : next(i for i, line in enumerate(lines) if line.startswith("mAP in %"))]
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in body]
    return header, rows, printed


def csv_val_map(job: Path) -> dict[int, float]:
    """val/mAP of the validations after each training epoch, as Lightning's CSV holds them."""
    with open(job / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["val/mAP"]]
    # the last row is the evaluation of the best checkpoint after training (logged as epoch EPOCHS)
    assert int(rows[-1]["epoch"]) == EPOCHS
    return {int(r["epoch"]): float(r["val/mAP"]) for r in rows[:-1]}


def wandb_val_map(run: Path) -> dict[int, float]:
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = []
    for record in read_records(wandb_file):
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        if "val/mAP" in items:
            history.append((int(items["epoch"]), float(items["val/mAP"])))
    assert history[-1][0] == EPOCHS  # the evaluation after training
    return dict(history[:-1])


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def best(per_epoch: dict[int, float]) -> tuple[int, float]:
    epoch = min(per_epoch, key=lambda e: (-per_epoch[e], e))
    return epoch, per_epoch[epoch]


def assert_row_matches_files(row: dict[str, str], run: Path, per_epoch: dict[int, float]) -> None:
    epoch, value = best(per_epoch)
    assert (row["best val/mAP"], row["epoch"]) == (pct(value), str(epoch))
    final = json.loads((run / "metrics.json").read_text())["evaluations"]["final"]["rsynthetic"]
    assert [row["final E"], row["final M"], row["final H"]] == [pct(final[f"{p}/mAP"]) for p in "EMH"]
    (checkpoint,) = (run / "checkpoints").glob("best-*.ckpt")
    assert (Path.cwd() / row["best checkpoint"]).resolve() == checkpoint.resolve()
    assert row["status"] == "done" and re.fullmatch(r"\d+:\d\d:\d\d", row["wall (files)"])


def test_table_of_a_multirun_holds_each_jobs_numbers_and_only_the_differing_override(runs, capsys):
    header, rows, printed = compare(capsys, runs.sweep, "--no-plot")
    assert header == ["job", "loss.margin", "status", "best val/mAP", "epoch", "final E", "final M", "final H",
                      "wall (files)", "best checkpoint"]  # fmt: skip
    assert sorted(row["job"] for row in rows) == ["0", "1"]
    for row in rows:
        job = runs.sweep / row["job"]
        assert row["loss.margin"] == {"0": "0.1", "1": "0.2"}[row["job"]]
        assert_row_matches_files(row, job, csv_val_map(job))
    best_values = [float(row["best val/mAP"]) for row in rows]
    assert best_values == sorted(best_values, reverse=True)  # best first by default
    assert "on rsynthetic" in printed and PLOT_NAME not in printed


def test_sort_option_orders_the_rows(runs, capsys):
    _, by_margin, _ = compare(capsys, runs.sweep, "--no-plot", "--sort", "loss.margin")
    assert [row["loss.margin"] for row in by_margin] == ["0.1", "0.2"]
    _, reversed_margin, _ = compare(capsys, runs.sweep, "--no-plot", "--sort", "loss.margin", "--reverse")
    assert [row["loss.margin"] for row in reversed_margin] == ["0.2", "0.1"]
    _, by_hard, _ = compare(capsys, runs.sweep, "--no-plot", "--sort", "H", "--reverse")
    assert [float(row["final H"]) for row in by_hard] == sorted(float(row["final H"]) for row in by_hard)


def test_plot_has_one_line_per_job_in_the_order_of_the_values(runs, capsys, tmp_path):
    compare(capsys, runs.sweep)  # default place: the multirun folder
    with Image.open(runs.sweep / PLOT_NAME) as written:
        assert written.format == "PNG" and written.size == PLOT_SIZE
    jobs = [read_run(folder) for folder in find_run_folders([runs.sweep])]
    box = plot_metric(jobs, differing_keys(jobs), tmp_path / "plot.png")
    assert box.title == f"val/mAP (%) per epoch: {runs.sweep.name}"
    pixels = Image.open(tmp_path / "plot.png").convert("RGB").load()
    centres = []
    for index, job in enumerate(jobs):
        colour = PALETTE[index]
        inside = [(x, y) for x in range(box.left, box.right + 1) for y in range(box.top, box.bottom + 1)
                  if pixels[x, y] == colour]  # fmt: skip
        xs = [x for x, _ in inside]
        # a line from the first epoch (left edge) to the last (right edge)
        assert min(xs) <= box.left + 5 and max(xs) >= box.right - 5, job.folder
        column = [y for x, y in inside if x == box.right - 6]
        assert column, job.folder
        centres.append(sum(column) / len(column))
    last = [job.val_map[EPOCHS - 1] for job in jobs]
    assert last[0] != last[1]
    assert (centres[0] < centres[1]) == (last[0] > last[1])  # higher mAP, higher on the image
    assert not any(pixels[x, y] == PALETTE[2] for x in range(PLOT_SIZE[0]) for y in range(PLOT_SIZE[1]))


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)  # copy2: file times kept
    return target


def test_a_sweep_still_running_shows_finished_jobs_and_how_far_the_others_got(runs, capsys, tmp_path):
    sweep = copy_run(runs.sweep, tmp_path / "sweep")
    # job 1 stopped in its second epoch: no metrics.json, its CSV cut before epoch 1's validation, mid-line
    stopped = sweep / "1"
    (stopped / "metrics.json").unlink()
    (stopped / "table.txt").unlink()
    lines = (stopped / "csv" / "metrics.csv").read_text().splitlines(keepends=True)
    parsed = list(csv.DictReader(lines))
    cut = 1 + next(i for i, row in enumerate(parsed) if row["epoch"] == "1" and row["val/mAP"])
    (stopped / "csv" / "metrics.csv").write_text("".join(lines[:cut]) + lines[cut][:12])
    expected_stopped = {e: v for e, v in csv_val_map(runs.sweep / "1").items() if e == 0}
    # job 2 has just started: Hydra wrote its .hydra/, the training process holds the folder's lock
    started = sweep / "2"
    shutil.copytree(sweep / "0" / ".hydra", started / ".hydra")
    overrides = started / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("loss.margin=0.1", "loss.margin=0.3"))
    with lock_held_elsewhere(started / ".lock"):
        _, rows, _ = compare(capsys, sweep, "--sort", "job")
    done, unfinished, running = rows
    assert (done["job"], done["loss.margin"]) == ("0", "0.1")
    assert_row_matches_files(done, sweep / "0", csv_val_map(runs.sweep / "0"))
    assert unfinished["status"] == f"unfinished (1/{EPOCHS} epochs)"
    assert (unfinished["best val/mAP"], unfinished["epoch"]) == (pct(expected_stopped[0]), "0")
    assert [unfinished[f"final {p}"] for p in "EMH"] == ["-", "-", "-"]
    assert running["status"] == f"running (0/{EPOCHS} epochs)" and running["loss.margin"] == "0.3"
    assert [running[c] for c in ("best val/mAP", "epoch", "final M", "best checkpoint")] == ["-"] * 4
    assert Image.open(sweep / PLOT_NAME).size == PLOT_SIZE
    # once the holder is gone the job reads as unfinished
    assert read_run(started).status == "unfinished"


@pytest.mark.slow
def test_a_real_sweep_reads_running_while_it_trains_and_unfinished_once_killed(tmp_path, capsys):
    """The real thing: ``oxford-ir-train -m`` in its own process, compared while its first job trains (the
    training process holds the folder's lock), then SIGKILLed."""
    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [TRAIN_SCRIPT, "-m", "loss.margin=0.1,0.2", *RUN, "trainer.max_epochs=50", "logger=csv",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        metrics = sweep / "0" / "csv" / "metrics.csv"
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and "val/mAP" in metrics.read_text().partition("\n")[0]):
            assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before validating"
            time.sleep(0.2)
        _, (row,), _ = compare(capsys, sweep, "--no-plot")
        assert row["job"] == "0" and re.fullmatch(r"running \((\d+)/50 epochs\)", row["status"]), row
        assert float(row["best val/mAP"]) > 0 and row["final M"] == "-"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, (row,), _ = compare(capsys, sweep, "--no-plot")
    assert re.fullmatch(r"unfinished \((\d+)/50 epochs\)", row["status"]), row


def test_runs_of_different_folders_and_the_wandb_offline_source(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the whole sweep, one of its jobs again (listed once) and a run of another folder, logged by W&B only
    header, rows, printed = compare(capsys, runs.sweep, runs.sweep / "1", runs.single)
    assert not (runs.single / "csv").exists() and list((runs.single / "wandb").glob("offline-run-*"))
    assert header[:3] == ["job", "loss.margin", "logger"]
    by_job = {row["job"]: row for row in rows}
    assert set(by_job) == {"sweep/0", "sweep/1", "single"}
    assert [(by_job[j]["loss.margin"], by_job[j]["logger"]) for j in ("sweep/0", "sweep/1", "single")] == [
        ("0.1", "csv"), ("0.2", "csv"), ("0.3", "wandb")]  # fmt: skip
    assert_row_matches_files(by_job["single"], runs.single, wandb_val_map(runs.single))
    for job in ("0", "1"):
        assert_row_matches_files(by_job[f"sweep/{job}"], runs.sweep / job, csv_val_map(runs.sweep / job))
    single = read_run(runs.single)
    assert single.source == "wandb" and single.val_map == wandb_val_map(runs.single)
    values = [float(row["best val/mAP"]) for row in rows]
    assert values == sorted(values, reverse=True)
    # runs of several folders: no plot unless --plot says where (never the working folder by surprise)
    assert list(tmp_path.iterdir()) == [] and "val/mAP plot: not written" in printed


def test_wall_time_runs_from_the_first_file_to_the_last(runs, tmp_path, capsys):
    job = copy_run(runs.sweep / "0", tmp_path / "sweep" / "0")
    start = 1_800_000_000
    for folder, _, names in os.walk(job):
        for name in names:
            os.utime(os.path.join(folder, name), (start + 60, start + 60))
    os.utime(job / "wandb_run_id", (start, start))
    os.utime(job / "metrics.json", (start + 3725, start + 3725))
    assert wall_seconds(job) == 3725
    _, (row,), _ = compare(capsys, job, "--no-plot")
    assert row["wall (files)"] == "1:02:05"


def val_rows(*pairs: tuple[int, float], trained: bool = True) -> list[dict[str, float]]:
    """Rows as the loggers hold them: per epoch a training row (unless ``trained`` is false), then its validation."""
    rows = []
    for epoch, value in pairs:
        if trained:
            rows.append({"epoch": epoch, "train/loss": 0.1})
        rows.append({"epoch": epoch, "val/mAP": value})
    return rows


def per_epoch(rows, **kwargs) -> dict[int, float]:
    return curve(epoch_rows(rows, **kwargs), "val/mAP")[1]


def test_validations_that_are_not_an_epochs_are_left_out_and_a_repeated_epoch_keeps_its_last_value():
    # untrained network, epochs 0 and 1, epoch 1 again (a resumed run), the best checkpoint after training
    rows = [{"epoch": 0, "val/mAP": 0.10}, *val_rows((0, 0.20), (1, 0.30), (1, 0.35)), {"epoch": 2, "val/mAP": 0.35}]
    assert per_epoch(rows, untrained=True, finished_with_evaluation=True, max_epochs=2) == {0: 0.2, 1: 0.35}
    # still running: the evaluation after training is logged, metrics.json not yet written
    assert per_epoch(rows[1:], untrained=False, finished_with_evaluation=False, max_epochs=2) == {0: 0.2, 1: 0.35}
    # finished, but its log lost the evaluation after training (cut short): the last epoch stays
    assert per_epoch(rows[:-1], untrained=True, finished_with_evaluation=True, max_epochs=None) == {0: 0.2, 1: 0.35}
    # no training rows logged (a logger that keeps validations only): the last validation is the final one
    untrained_only = val_rows((0, 0.2), (1, 0.3), (2, 0.3), trained=False)
    assert per_epoch(untrained_only, untrained=False, finished_with_evaluation=True, max_epochs=None) == {
        0: 0.2, 1: 0.3}  # fmt: skip


def test_file_names_are_those_the_training_run_writes():
    from oxford_ir import run_history
    from oxford_ir.cli import run_folder, train

    assert (run_history.RUN_LOCK, run_history.WANDB_ID_FILE) == (run_folder.RUN_LOCK, run_folder.WANDB_ID_FILE)
    assert run_history.UNTRAINED_FILE == train.UNTRAINED_FILE


@pytest.mark.parametrize("kind", ["missing", "not a run"])
def test_a_path_that_is_not_a_run_or_multirun_folder_is_one_error_line(tmp_path, capsys, kind):
    path = tmp_path / "nowhere"
    if kind == "not a run":
        (path / "jpg").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        main([str(path)])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"error: {path}") and "multirun folder" in captured.err


def test_console_script_prints_the_error_line(tmp_path):
    result = subprocess.run([COMPARE_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: {tmp_path} is neither a run folder (no .hydra/config.yaml and .hydra/overrides.yaml) nor a multirun "
        "folder (no multirun.yaml, no run folder inside); pass a run folder (the 'run folder' oxford-ir-train prints, "
        "e.g. logs/train/runs/<time>) or a multirun folder (logs/train/multiruns/<time>)\n"
    )


# -- damaged run folders: each problem one warning line, the rest used ---------------------------------------------
def compare_with_warnings(capsys, *args) -> tuple[list[dict[str, str]], list[str]]:
    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    body = lines[2 : next(i for i, line in enumerate(lines) if line.startswith("mAP in %"))]
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in body]
    warnings = captured.err.splitlines()
    assert all(line.startswith("warning: ") for line in warnings), captured.err
    return rows, warnings


def test_a_log_line_that_is_not_utf8_is_skipped_with_a_warning_naming_it(runs, capsys, tmp_path):
    job = copy_run(runs.sweep / "0", tmp_path / "sweep" / "0")
    log = job / "csv" / "metrics.csv"
    lines = log.read_bytes().split(b"\n")
    train = next(i for i, line in enumerate(lines) if line.startswith(b"0,,,1,"))  # a training row of epoch 0
    lines[train] = lines[train][:8] + b"\xff\xfe\x00" + lines[train][8:]
    log.write_bytes(b"\n".join(lines))
    (row,), warnings = compare_with_warnings(capsys, job, "--no-plot")
    assert warnings == [f"warning: {log}:{train + 1}: not UTF-8 text (byte 8 of the line): line skipped"]
    assert_row_matches_files(row, job, csv_val_map(runs.sweep / "0"))


def test_a_finished_runs_log_cut_mid_line_keeps_every_epoch_and_the_best_one(runs, capsys, tmp_path):
    """The evaluation after training is the log's last line: cut there, the last epoch is still an epoch."""
    job = copy_run(runs.sweep / "0", tmp_path / "sweep" / "0")
    log = job / "csv" / "metrics.csv"
    text = log.read_text()
    last_line = text.rstrip("\n").rsplit("\n", 1)[1]
    assert last_line.startswith(f"{EPOCHS},")  # the evaluation after training
    log.write_text(text[: len(text) - len(last_line) + 10 - 1])  # 10 characters of it, no newline
    number = text.count("\n")
    (row,), warnings = compare_with_warnings(capsys, job, "--no-plot")
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {log}:{number}: the last line is cut short")
    assert read_run(job).val_map == csv_val_map(runs.sweep / "0")
    assert_row_matches_files(row, job, csv_val_map(runs.sweep / "0"))


@pytest.mark.parametrize("damage", ["empty", "cut short", "text"])
def test_a_best_checkpoint_that_would_not_load_is_never_named(runs, capsys, tmp_path, damage):
    from oxford_ir.errors import CheckpointError
    from oxford_ir.models.checkpoint import load_retrieval_checkpoint

    job = copy_run(runs.sweep / "0", tmp_path / "sweep" / "0")
    (checkpoint,) = (job / "checkpoints").glob("best-*.ckpt")
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"empty": b"", "cut short": data[: len(data) // 2], "text": b"not a checkpoint\n"}[damage])
    with pytest.raises(CheckpointError):  # what the project's loader says of it
        load_retrieval_checkpoint(checkpoint)
    (row,), warnings = compare_with_warnings(capsys, job, "--no-plot")
    assert row["best checkpoint"] == "-" and row["epoch"] != "-"
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {checkpoint}: ")
    assert warnings[0].endswith(": not shown as the best checkpoint")


def test_the_checkpoint_check_agrees_with_the_projects_loader(runs):
    from oxford_ir import run_history
    from oxford_ir.models import checkpoint
    from oxford_ir.models.module import RetrievalModule

    assert run_history.REQUIRED_HPARAMS == checkpoint.REQUIRED_HPARAMS
    assert run_history.HYPER_PARAMS_KEY == RetrievalModule.CHECKPOINT_HYPER_PARAMS_KEY
    for path in (runs.sweep / "0" / "checkpoints").glob("*.ckpt"):
        assert run_history.checkpoint_problem(path) is None
        checkpoint.load_retrieval_checkpoint(path)


def test_the_epoch_loss_of_real_runs_is_plotted_per_epoch(runs, capsys):
    """``--metric train/loss_epoch``: the epoch means the training logs, one point per epoch, in its own file."""
    with open(runs.sweep / "0" / "csv" / "metrics.csv") as handle:
        logged = {
            int(r["epoch"]): float(r["train/loss_epoch"]) for r in csv.DictReader(handle) if r["train/loss_epoch"]
        }
    assert sorted(logged) == list(range(EPOCHS))
    _, _, printed = compare(capsys, runs.sweep, "--metric", "train/loss_epoch")
    assert f"train/loss_epoch per epoch: {runs.sweep / 'train_loss_epoch.png'}" in printed
    assert Image.open(runs.sweep / "train_loss_epoch.png").size == PLOT_SIZE
    assert read_run(runs.sweep / "0").curve("train/loss_epoch") == ("epoch", logged)
    single = read_run(runs.single)  # the same key from the W&B offline files
    assert sorted(single.curve("train/loss_epoch")[1]) == list(range(EPOCHS))
