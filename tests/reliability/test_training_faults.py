"""Training under faults: SIGKILL at every kind of point, then resume; a full disk; workers that die or hang; two
processes on one run folder; a copied run folder.

The default suite holds a sample: the run-folder lock, the copied-folder state, and (in ``tests/test_train.py``)
``test_resume_after_sigkill_mid_epoch_continues_the_same_run_exactly``; the extraction workers' failures are in
``test_extraction_workers.py``. Everything else is ``slow``. Every fault is real: a real ``oxford-ir-train``
process, SIGKILL from the kernel (``tests/reliability/kill_training.py`` kills its own process at a named point),
SIGSTOP/SIGKILL of a real DataLoader worker, a real file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes
fail with EFBIG).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from oxford_ir.callbacks.checkpoint import moved_state
from oxford_ir.cli.train import train
from oxford_ir.errors import ConfigError
from tests.reliability.processes import children, environment, lock_held_elsewhere, run, script
from tests.test_train import REPO, TINY, TINY_SCRATCH, compose_train, read_csv_metrics

TRAIN = script("oxford-ir-train")
#: the quickstart recipe shrunk: untrained evaluation first, CSV logs, 3 epochs of 3 batches, 2 workers
QUICK = ["experiment=quickstart", *TINY, *TINY_SCRATCH, "logger=csv", "trainer.max_epochs=3", "data.num_workers=2"]
KILL = "+callbacks.kill._target_=tests.reliability.kill_training.KillAt"


def _env() -> dict[str, str]:
    return environment(PYTHONPATH=str(REPO))


def _results(run_dir: Path) -> tuple:
    """What a run reports: its table, metrics.json and every logged CSV row."""
    return (
        (run_dir / "table.txt").read_text(),
        json.loads((run_dir / "metrics.json").read_text()),
        read_csv_metrics(run_dir),
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted ``QUICK`` run (a real process): its folder and its data folder."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = root / "data"
    result = run([TRAIN, *QUICK, f"paths.data_dir={data}", f"hydra.run.dir={root / 'run'}"], cwd=root, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", data


# -- default suite -------------------------------------------------------------------------------------------
def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path):
    """While one process holds a run folder, ``train`` on that folder stops before writing anything, naming it."""
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none")
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True)
    with lock_held_elsewhere(folder / ".lock") as holder:  # noqa: SIM117 - the match needs the pid
        with pytest.raises(ConfigError, match=rf"run folder .*run is in use by pid {holder.pid}: wait for"):
            train(cfg)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written: no checkpoints, no W&B id


def test_checkpoint_state_follows_a_copied_run_folder(tmp_path):
    """The paths a checkpoint callback stored, restored in a copy of the run folder: those whose file is in the
    copy point into the copy (so ``last.ckpt`` is rewritten in place, never ``last-v1.ckpt``); others are dropped
    with their score (a new run started from another run's checkpoint refers to no file of that run)."""
    old, new = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    new.mkdir(parents=True)
    for name in ("best-epoch002.ckpt", "last.ckpt"):
        (new / name).write_bytes(b"x")
    state = {
        "dirpath": str(old),
        "best_model_path": str(old / "best-epoch002.ckpt"),
        "best_model_score": torch.tensor(0.7),
        "kth_best_model_path": str(old / "best-epoch002.ckpt"),
        "kth_value": torch.tensor(0.7),
        "last_model_path": str(old / "last.ckpt"),
        "best_k_models": {str(old / "best-epoch002.ckpt"): torch.tensor(0.7)},
    }
    moved = moved_state(state, old, new)
    assert moved["dirpath"] == str(new)
    assert moved["best_model_path"] == moved["kth_best_model_path"] == str(new / "best-epoch002.ckpt")
    assert moved["last_model_path"] == str(new / "last.ckpt")
    assert moved["best_k_models"] == {str(new / "best-epoch002.ckpt"): torch.tensor(0.7)}
    assert moved["best_model_score"] == torch.tensor(0.7) and moved["kth_value"] == torch.tensor(0.7)

    elsewhere = moved_state(state, old, tmp_path / "c" / "checkpoints")  # files not there: a new run
    assert (elsewhere["best_model_path"], elsewhere["last_model_path"], elsewhere["best_k_models"]) == ("", "", {})
    assert elsewhere["best_model_score"] is None and "kth_value" not in elsewhere


#: a real Trainer fitting a 256 x 256 linear layer (a ~260 KB checkpoint) for one epoch with the run's checkpoint
#: callback as ``conf/callbacks/default.yaml`` configures it, its errors reported as the console scripts report them
CHECKPOINTING = """
import sys, torch, lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from oxford_ir.callbacks.checkpoint import RunCheckpoint
from oxford_ir.errors import exit_on_user_error

class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(256, 256)
    def training_step(self, batch, index):
        return self.layer(batch[0]).pow(2).mean()
    def validation_step(self, batch, index):
        self.log("val/mAP", -self.layer(batch[0]).pow(2).mean())
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 256)), batch_size=2)
    val_dataloader = train_dataloader

@exit_on_user_error
def main():
    checkpoint = RunCheckpoint(dirpath=sys.argv[1], filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                               monitor="val/mAP", mode="max", save_top_k=1, save_last=True, save_on_exception=True,
                               enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Linear())

main()
"""


def test_a_checkpoint_over_the_file_size_limit_is_one_line_naming_it_and_leaves_no_file(tmp_path):
    """A real Trainer and ``RunCheckpoint`` in a process whose file-size limit (RLIMIT_FSIZE: writes fail with EFBIG,
    as on a full disk) is below the checkpoint's size: one ``error:`` line naming the checkpoint's final path (not
    a temp file) and the fix, and nothing under any checkpoint name, 0-byte or partial, nor a temp file. Before the
    fix Lightning's fsspec transaction wrote a temp file under /tmp (the error named it) and, across file systems,
    copied it into the final name, and ``save_on_exception`` tried again under the best checkpoint's name."""
    folder = tmp_path / "run" / "checkpoints"
    result = run([sys.executable, "-c", CHECKPOINTING, str(folder)], cwd=tmp_path, env=_env(), file_size=64 * 1024,
                 timeout=120)  # fmt: skip
    assert result.returncode == 2 and not result.traceback, result.stderr[-3000:]
    assert len(result.error_lines) == 1, result.stderr[-3000:]
    line = result.error_lines[0]
    assert f"the file-size limit was reached writing the checkpoint {folder / 'best-epoch000.ckpt'}:" in line, line
    assert f"resume={tmp_path / 'run'}" in line and ".tmp" not in line
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_checkpoint_write_is_atomic_beside_its_final_name(tmp_path, monkeypatch):
    """``AtomicCheckpointIO``: a write that fails part way (here, the disk fills after 1 KB) leaves the previous
    checkpoint of that name byte for byte and no temp file, and the error names the final path."""
    import errno

    from oxford_ir.callbacks.checkpoint import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state": torch.arange(10)}, path)
    before = path.read_bytes()
    assert torch.equal(torch.load(path, weights_only=True)["state"], torch.arange(10))

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(bytes(data)[:1024])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def full_open(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 - closed by its user
        return Full(handle) if "x" in mode else handle

    monkeypatch.setattr("oxford_ir.fs.open", full_open, raising=False)  # the file writers' open
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"state": torch.zeros(100_000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- slow: every kill point, full disk, dead worker, copied folder ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "at"),
    [
        ("train_batch", 1),  # before the first checkpoint: the resume starts again from the beginning
        ("train_batch", 7),  # in the middle of the last epoch
        ("validation", 1),  # while epoch 1 is evaluated
        ("checkpoint", 2),  # epoch 0's last.ckpt being saved, after its best-epoch000.ckpt
        ("checkpoint", 3),  # epoch 1's last.ckpt (or best) being saved
        ("final_validation", 0),  # while the best checkpoint is evaluated after training
    ],
)
def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_results(tmp_path, uninterrupted, point, at):
    reference, data = uninterrupted
    folder = tmp_path / "run"
    killed = run(
        [TRAIN, *QUICK, f"paths.data_dir={data}", f"hydra.run.dir={folder}", KILL,
         f"+callbacks.kill.point={point}", f"+callbacks.kill.at={at}"],
        cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (folder / "metrics.json").exists()
    resumed = run([TRAIN, f"resume={folder}", "~callbacks.kill"], cwd=tmp_path, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _results(folder) == _results(reference)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "at"),
    [
        ("train_batch", 1),  # before the first checkpoint: the resume starts again from the beginning
        ("train_batch", 7),  # in the middle of the last epoch (mid-epoch 1 is in the default suite, test_train.py)
        ("validation", 1),  # while epoch 1 is evaluated: no best-epoch001.ckpt of an unvalidated epoch
        ("checkpoint", 2),  # while epoch 0's last.ckpt is being saved: none is left half-written
        ("final_validation", 0),  # while the best checkpoint is evaluated after training
    ],
)
def test_ctrl_c_at_any_point_then_resume_gives_the_uninterrupted_results(tmp_path, uninterrupted, point, at):
    """Ctrl-C (SIGINT to the run's process group, as a terminal sends it) at each kind of point: exit 130 without a
    traceback, the ``resume with`` line, no ``best-*`` of an epoch that was not validated, ``last.ckpt`` (if any) at
    the end of an epoch; ``resume=`` then gives the uninterrupted run's table, metrics.json, CSV rows and files."""
    reference, data = uninterrupted
    folder = tmp_path / "run"
    stopped = run(
        [TRAIN, *QUICK, f"paths.data_dir={data}", f"hydra.run.dir={folder}", KILL,
         f"+callbacks.kill.point={point}", f"+callbacks.kill.at={at}", "+callbacks.kill.signal=SIGINT"],
        cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert stopped.returncode == 130 and not stopped.traceback, stopped.stderr[-3000:]
    assert f"resume with:  oxford-ir-train resume={folder}" in stopped.stdout
    assert not (folder / "metrics.json").exists()
    checkpoints = folder / "checkpoints"
    rows = read_csv_metrics(folder) if (folder / "csv" / "metrics.csv").is_file() else []
    validated = {int(r["epoch"]) for r in rows if r.get("val/mAP") and r.get("epoch")}
    best = {p.name for p in checkpoints.glob("best-*.ckpt")} if checkpoints.is_dir() else set()
    assert best <= {f"best-epoch{e:03d}.ckpt" for e in validated}, (best, validated)
    assert not checkpoints.is_dir() or not list(checkpoints.glob("*.tmp"))
    if (checkpoints / "last.ckpt").is_file():
        last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
        assert last["global_step"] % 3 == 0 and last["global_step"] == 3 * (last["epoch"] + 1)
    resumed = run([TRAIN, f"resume={folder}", "~callbacks.kill"], cwd=tmp_path, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _results(folder) == _results(reference)
    names = [sorted(p.name for p in (f / "checkpoints").iterdir()) for f in (folder, reference)]
    assert names[0] == names[1]


@pytest.mark.slow
def test_a_copied_run_folder_resumes_in_itself(tmp_path, uninterrupted):
    """Kill a run, copy its folder, resume the copy: the copy's own last.ckpt is continued (not a stale one beside
    a new last-v1.ckpt), its best checkpoint is the one evaluated, and the results are the uninterrupted run's."""
    reference, data = uninterrupted
    original = tmp_path / "original"
    killed = run(
        [TRAIN, *QUICK, f"paths.data_dir={data}", f"hydra.run.dir={original}", KILL,
         "+callbacks.kill.point=train_batch", "+callbacks.kill.at=7"],
        cwd=tmp_path, env=_env(),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)  # nothing of the copy may refer to the original
    resumed = run([TRAIN, f"resume={copy}", "~callbacks.kill"], cwd=tmp_path, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _results(copy) == _results(reference)
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference / "checkpoints").iterdir()) and "last-v1.ckpt" not in names
    state = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stored = next(v for k, v in state["callbacks"].items() if k.startswith("RunCheckpoint"))
    assert Path(stored["best_model_path"]).parent == copy / "checkpoints"


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_the_rerun_completes(tmp_path, uninterrupted):
    """A file-size limit that the first checkpoint exceeds: one line naming the checkpoint file, no partial file;
    the same command without the limit (``resume=``) then gives the uninterrupted run's results. (No workers: with
    them, their shared memory, subject to the same limit, fails first; ``test_extraction_workers.py`` covers that.)"""
    reference, data = uninterrupted
    folder = tmp_path / "run"
    size = (reference / "checkpoints" / "last.ckpt").stat().st_size
    full = run(
        [TRAIN, *QUICK, "data.num_workers=0", "~callbacks.retrieval_grid", f"paths.data_dir={data}",
         f"hydra.run.dir={folder}"],
        cwd=tmp_path, env=_env(), file_size=size - 1024,
    )  # fmt: skip
    assert full.returncode == 2 and not full.traceback, full.stderr[-3000:]
    assert len(full.error_lines) == 1
    assert "the file-size limit was reached writing" in full.error_lines[0]
    assert f"{folder / 'checkpoints'}" in full.error_lines[0] and ".ckpt" in full.error_lines[0]
    assert not (folder / "checkpoints").exists() or list((folder / "checkpoints").iterdir()) == []
    resumed = run([TRAIN, f"resume={folder}", "data.num_workers=2"], cwd=tmp_path, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table, metrics, rows = _results(folder)
    assert (table, metrics) == _results(reference)[:2]
    assert rows == _results(reference)[2]


@pytest.mark.slow
def test_a_hung_worker_ends_training_with_one_clear_error(tmp_path):
    """A DataLoader worker stopped (SIGSTOP) while training: the run ends after ``data.worker_timeout`` seconds
    with one line saying what happened and what to do, instead of waiting forever (as with torch's default).

    Through the console script, which must also kill the stopped workers so that its interpreter can exit."""
    stopped: list[int] = []

    def stop_a_worker(pid: int) -> None:
        workers = children(pid)
        if not stopped and (tmp_path / "run" / "wandb_run_id").is_file() and workers:
            os.kill(workers[0], signal.SIGSTOP)
            stopped.append(workers[0])

    args = [*TINY, *TINY_SCRATCH, "logger=none", "data.num_workers=2", "data.worker_timeout=2", "trainer.max_epochs=50",
            f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = run([TRAIN, *args], cwd=tmp_path, env=_env(), each_poll=stop_a_worker, timeout=120, poll=0.05)
    assert stopped, "no worker was stopped"
    assert result.returncode == 2, result.stderr[-3000:]
    assert not result.traceback
    assert result.error_lines == [result.stderr.strip().splitlines()[-1]]
    assert "no batch came from the data-loading workers for 2 s" in result.error_lines[0]
    assert "num_workers=0" in result.error_lines[0]


@pytest.mark.slow
def test_a_killed_worker_ends_training_with_one_clear_error(tmp_path):
    """A DataLoader worker killed (SIGKILL, as the OOM killer does) while training: one line naming its pid."""
    killed: list[int] = []

    def kill_a_worker(pid: int) -> None:
        workers = children(pid)
        if not killed and (tmp_path / "run" / "wandb_run_id").is_file() and workers:
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    args = [*TINY, *TINY_SCRATCH, "logger=none", "data.num_workers=2", "trainer.max_epochs=50",
            f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = run([TRAIN, *args], cwd=tmp_path, env=_env(), each_poll=kill_a_worker, timeout=120, poll=0.05)
    assert killed
    assert result.returncode == 2 and not result.traceback, result.stderr[-3000:]
    assert len(result.error_lines) == 1
    assert f"a data-loading worker process (pid {killed[0]}) died" in result.error_lines[0]


def test_save_last_link_replaces_the_link_in_one_step(tmp_path):
    """``save_last="link"``: ``last.ckpt`` becomes a link to the new checkpoint by a rename over the old link (never
    missing in between, no temp left), relative, so that a copied run folder keeps it."""
    from types import SimpleNamespace

    from oxford_ir.callbacks.checkpoint import RunCheckpoint

    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    for name in ("best-epoch000.ckpt", "best-epoch001.ckpt"):
        (tmp_path / name).write_bytes(name.encode())
        RunCheckpoint._link_checkpoint(trainer, str(tmp_path / name), str(tmp_path / "last.ckpt"))
        assert (tmp_path / "last.ckpt").read_bytes() == name.encode()
        assert os.readlink(tmp_path / "last.ckpt") == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch000.ckpt", "best-epoch001.ckpt", "last.ckpt"]
