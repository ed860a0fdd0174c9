"""Faults injected into ``oxford-ir-index`` for real: SIGKILL at chosen points, a file-size limit (what a full disk
looks like without root), dying and hanging DataLoader workers, a second builder of the same index.

After each fault: (a) what was there before still loads (checksums verified), (b) nothing half-written is taken
for complete, (c) running the same command again finishes and gives exactly (bit for bit) what an uninterrupted
run gives. A failing command ends within bounded time with one ``error:`` line on stderr and exit code 2.

The default suite runs one killed build as a real command and the rest in this process (the shared-memory case
of a file-size limit in test_extraction_workers.py); every other point and fault kind, as real commands, is
``slow`` (each command costs ~5 s of imports).
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from oxford_ir.cli.index import index
from oxford_ir.errors import IndexFormatError, user_error_in
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import CURRENT_FILE, RetrievalIndex
from oxford_ir.retrieval.model_spec import ModelSpec
from tests.reliability.processes import Outcome, children, environment, exists, lock_held_elsewhere, run, script

REPO = Path(__file__).resolve().parents[2]
#: the tiny model and images of every run here: 64 x 48 px photos, a scratch CNN with 8 and 16 channels
SETTINGS = [
    "backbone=scratch",
    "backbone.channels=[8,16]",
    "extraction.image_size=64",
    "extraction.batch_size=4",
    "extraction.device=cpu",
    "progress=false",
]
TINY = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM"},
}
FAST = {"image_size": 64, "batch_size": 4, "num_workers": 0, "progress": False}


def write_photos(folder: Path, names: range | list[int], seed: int = 0) -> None:
    """Random 64 x 48 PNGs ``p<i>.png`` (same size: every batch has one shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in names:
        rng = np.random.default_rng(seed * 1000 + i)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"p{i:03d}.png")


def command(photos: Path, out: Path, *extra: str) -> list[str]:
    run_dir = out.parent / f"run-{out.name}-{time.monotonic_ns()}"
    return [
        script("oxford-ir-index"),
        f"images={photos}",
        f"out={out}",
        *SETTINGS,
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=null",
        *extra,
    ]


def index_in_process(photos: Path, out: Path, *extra: str):
    """What the command does, called in this process (same config, same function)."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "index",
            overrides=[f"images={photos}", f"out={out}", *SETTINGS, "extraction.num_workers=0", *extra],
        )
    return index(cfg)


def files(out: Path) -> dict[str, bytes]:
    """Every file of an index folder, with its bytes (the lock's content is the pid of a running build)."""
    found = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in found}


def assert_same_index(index: RetrievalIndex, reference: RetrievalIndex) -> None:
    assert index.complete and reference.complete
    assert index.entries == reference.entries
    assert index.embeddings.dtype == reference.embeddings.dtype
    assert np.array_equal(index.embeddings, reference.embeddings)


def assert_clean(out: Path) -> None:
    """Only the live version, CURRENT, the report and the lock: no half-written folder or temp file."""
    version = (out / CURRENT_FILE).read_text().strip()
    assert sorted(os.listdir(out)) == [".lock", "CURRENT", "report.json", version]


def one_error_line(outcome: Outcome) -> str:
    assert not outcome.killed and outcome.returncode == 2, (outcome.returncode, outcome.stderr[-2000:])
    assert not outcome.traceback, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    return lines[0]


# -- the default suite: one killed build as a command, the rest in this process ---------------------------------
def test_a_build_killed_after_a_checkpoint_keeps_its_rows_and_the_rerun_equals_a_clean_build(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(64))
    index_in_process(photos, tmp_path / "reference")
    reference = RetrievalIndex.load(tmp_path / "reference")

    # SIGKILL as soon as the first checkpoint is committed (CURRENT appears), 2 workers decoding
    outcome = run(command(photos, out, "index.checkpoint_every=0"), cwd=tmp_path, kill_when=exists(out / CURRENT_FILE))
    assert outcome.killed
    partial = RetrievalIndex.load(out, warn_incomplete=False)  # (a) it loads, checksums verified
    assert not partial.complete and 0 < len(partial) < 64  # (b) marked as a checkpoint, not taken for complete
    rows = reference.positions([e.path for e in partial.entries])
    assert [reference.entries[r] for r in rows] == partial.entries
    assert np.array_equal(reference.embeddings[rows], partial.embeddings)  # the finished rows, bit for bit

    report = index_in_process(photos, out)  # (c) the same command again: embeds only what is missing
    assert report.kept == len(partial) and len(report.added) == 64 - len(partial)
    assert_same_index(RetrievalIndex.load(out), reference)
    assert_clean(out)


@pytest.mark.slow
def test_an_update_under_a_file_size_limit_with_workers_is_one_line_and_leaves_the_index_as_it_was(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(16))
    index_in_process(photos, out)
    write_photos(photos, range(12, 20), seed=1)  # 4 changed, 4 new
    before = files(out)

    # a batch is 4 x 3 x 48 x 64 float32 = 147 kB of shared memory; the limit is 64 kB (index files are ~2 kB)
    outcome = run(command(photos, out), cwd=tmp_path, file_size=64_000, timeout=120)
    line = one_error_line(outcome)
    assert re.fullmatch(
        r"error: DataLoader worker [01] \(pid \d+\) could not hand batch [12] of 2 \(\S+/photos/p01[2-9]\.png, "
        r"\S+, \S+ and 1 more\) to the main process: shared memory is full or over the file-size limit "
        r"\(RuntimeError: unable to \S+ file </torch_\S+> to the right size: File too large \(27\)\); free space in "
        r"/dev/shm or raise the limit \(ulimit -f\), or rerun with fewer workers \(extraction.num_workers\), or 0 to "
        r"read the images in the main process",
        line,
    ), line
    assert outcome.seconds < 60  # it used to wait forever
    assert files(out) == before  # the previous index, byte for byte; nothing half-written beside it
    assert RetrievalIndex.load(out).complete


def test_a_write_over_the_file_size_limit_removes_what_it_half_wrote(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(16))
    spec = ModelSpec(embedder=TINY)

    def limited(out: Path) -> OSError:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # 16 x 16 float32 embeddings: 1152 bytes
        try:
            with pytest.raises(OSError) as caught:
                build_index(spec, photos, out, **FAST, dtype="float32")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        return caught.value

    error = limited(out)  # a fresh build: nothing is left but the lock
    assert error.errno == errno.EFBIG and error.filename == str(out / "v000001" / "embeddings.npy")
    assert sorted(os.listdir(out)) == [".lock"]
    assert str(user_error_in(error)) == (
        f"the file-size limit was reached writing {out}/v000001/embeddings.npy: free space (or raise the limit) and "
        "run the same command again; complete results written before are kept and nothing half-written is used"
    )

    build_index(spec, photos, out, **FAST, dtype="float32")  # room again: it builds
    before = files(out)
    write_photos(photos, range(16, 20))
    error = limited(out)  # an update: the previous version stays, byte for byte, alone
    assert error.filename == str(out / "v000002" / "embeddings.npy")
    assert files(out) == before and RetrievalIndex.load(out).version == "v000001"


def test_what_a_kill_between_commit_and_clean_up_leaves_is_never_read_and_removed_by_the_next_run(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(8))
    build_index(ModelSpec(embedder=TINY), photos, out, **FAST)
    before = files(out)
    # the states a SIGKILL leaves (the timed kills above hit them only by chance): an older version not yet
    # deleted, a half-written newer one, temp files of CURRENT and the report
    shutil.copytree(out / "v000001", out / "v000000")
    (out / "v000002").mkdir()
    (out / "v000002" / "embeddings.npy").write_bytes(b"\x93NUMPY half")
    (out / "CURRENT.tmp").write_text("v000002\n")
    (out / "report.json.tmp").write_text("{")
    assert RetrievalIndex.load(out).version == "v000001"
    report = build_index(ModelSpec(embedder=TINY), photos, out, **FAST)
    assert not report.wrote and report.kept == 8  # nothing to embed, and the leftovers are gone:
    assert sorted(os.listdir(out)) == [".lock", "CURRENT", "report.json", "v000001"]
    assert {k: v for k, v in files(out).items() if k != "report.json"} == {
        k: v for k, v in before.items() if k != "report.json"
    }


def test_a_fifo_among_the_images_is_skipped_unread(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(4))
    os.mkfifo(photos / "p004.png")  # opening it would block forever
    report = build_index(ModelSpec(embedder=TINY), photos, out, **{**FAST, "num_workers": 2})
    assert report.count == 4 and [(s.path, s.reason) for s in report.skipped] == [
        ("p004.png", "not a regular file (a FIFO, socket or device): not read")
    ]


def test_a_second_builder_is_refused_with_the_pid_of_the_first(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(4))
    out.mkdir()
    with lock_held_elsewhere(out / ".lock") as holder, pytest.raises(IndexFormatError) as caught:
        build_index(ModelSpec(embedder=TINY), photos, out, **FAST)
    assert str(caught.value) == (
        f"index {out.resolve()} is being updated by another oxford-ir-index run (pid {holder.pid}); wait for it to "
        "finish, then run this command again (it embeds only what is still missing)"
    )
    assert sorted(os.listdir(out)) == [".lock"]
    assert build_index(ModelSpec(embedder=TINY), photos, out, **FAST).count == 4  # the holder died: free again


# -- slow: every kill point, fresh and update, each rerun as the real command -------------------------------
def kill_and_rerun(tmp_path: Path, photos: Path, out: Path, kill_when, expected: RetrievalIndex, **run_options):
    """SIGKILL the command at ``kill_when``, check (a) and (b), rerun it for real, check (c)."""
    before = RetrievalIndex.load(out, warn_incomplete=False) if (out / CURRENT_FILE).exists() else None
    outcome = run(command(photos, out, "index.checkpoint_every=0"), cwd=tmp_path, kill_when=kill_when, **run_options)
    assert outcome.killed or outcome.returncode == 0, outcome.stderr[-2000:]
    if (out / CURRENT_FILE).exists():
        after = RetrievalIndex.load(out, warn_incomplete=False)  # (a) checksums verified
        if before is not None and after.version == before.version:  # the previous version, unchanged
            assert after.entries == before.entries and np.array_equal(after.embeddings, before.embeddings)
        elif after.complete:  # killed after its final commit
            assert_same_index(after, expected)
        else:  # (b) a checkpoint: each row a finished row of the expected index, or an old row of a file it still
            for row, entry in enumerate(after.entries):  # marks as changed (its old size and mtime), nothing else
                if entry in expected.entries:
                    assert np.array_equal(after.embeddings[row], expected.embeddings[expected.entries.index(entry)])
                else:
                    assert before is not None and entry in before.entries
    else:
        assert before is None  # a first build killed before its first commit leaves no index at all
        with pytest.raises(IndexFormatError, match="is not an index|no index at"):
            RetrievalIndex.load(out)
    rerun = run(command(photos, out), cwd=tmp_path)  # (c)
    assert rerun.returncode == 0 and not rerun.killed, rerun.stderr[-2000:]
    assert_same_index(RetrievalIndex.load(out), expected)
    assert_clean(out)
    return outcome


def new_version(out: Path):
    """A version folder newer than CURRENT's appears: the command is writing a checkpoint or the final index."""
    current = (out / CURRENT_FILE).read_text().strip() if (out / CURRENT_FILE).exists() else "v000000"
    return lambda: any(p.name > current for p in out.glob("v*"))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["early", "after a checkpoint", "while writing a version"])
def test_a_fresh_build_killed_at_any_point_reruns_to_exactly_a_clean_build(tmp_path, point):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(96))
    index_in_process(photos, tmp_path / "reference")
    expected = RetrievalIndex.load(tmp_path / "reference")
    kill_when = {
        "early": lambda: any(tmp_path.glob("run-index-*/index.log")),  # Hydra started the job, nothing embedded
        "after a checkpoint": exists(out / CURRENT_FILE),
        "while writing a version": new_version(out),
    }[point]
    outcome = kill_and_rerun(tmp_path, photos, out, kill_when, expected)
    assert outcome.killed


@pytest.mark.slow
@pytest.mark.parametrize("point", ["early", "after a checkpoint", "while writing a version"])
def test_an_update_killed_at_any_point_reruns_to_exactly_an_uninterrupted_update(tmp_path, point):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(64))
    index_in_process(photos, out)
    for name in ("p000.png", "p001.png"):
        (photos / name).unlink()
    write_photos(photos, range(40, 96), seed=1)  # 24 changed, 32 new, 2 deleted
    shutil.copytree(out, tmp_path / "reference")
    index_in_process(photos, tmp_path / "reference")  # the uninterrupted update
    expected = RetrievalIndex.load(tmp_path / "reference")
    kill_when = {
        "early": lambda: any(tmp_path.glob("run-index-*/index.log")),
        "after a checkpoint": lambda: (out / CURRENT_FILE).read_text().strip() != "v000001",
        "while writing a version": new_version(out),
    }[point]
    outcome = kill_and_rerun(tmp_path, photos, out, kill_when, expected)
    assert outcome.killed


@pytest.mark.slow
def test_a_fresh_build_over_the_file_size_limit_without_workers_is_one_line_and_leaves_nothing(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(16))
    outcome = run(command(photos, out, "extraction.num_workers=0", "index.dtype=float32"), cwd=tmp_path, file_size=1000)
    assert one_error_line(outcome) == (
        f"error: the file-size limit was reached writing {out}/v000001/embeddings.npy: free space (or raise the "
        "limit) and run the same command again; complete results written before are kept and nothing half-written "
        "is used"
    )
    assert sorted(os.listdir(out)) == [".lock"]


def workers_of(pid: int) -> list[int]:
    return [c for c in children(pid) if Path(f"/proc/{c}").exists()]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_worker_killed_or_stopped_ends_the_command_with_one_line(tmp_path, fault):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(400))
    index_in_process(photos, out)
    before = files(out)
    write_photos(photos, range(400), seed=1)  # every file changes: 100 batches to decode
    struck: list[int] = []

    def strike(pid: int) -> None:
        if not struck:
            found = workers_of(pid)
            if len(found) == 2:  # both workers are up: hit the first one
                os.kill(found[0], getattr(signal, fault))
                struck.append(found[0])

    outcome = run(
        command(photos, out, "extraction.worker_timeout=3", "index.checkpoint_every=null"),
        cwd=tmp_path,
        each_poll=strike,
        timeout=120,
    )
    line = one_error_line(outcome)
    pid = struck[0]
    if fault == "SIGKILL":
        assert re.fullmatch(
            rf"error: DataLoader worker \d \(pid {pid}\) was killed by SIGKILL before delivering batch \d+ of 100 "
            r"\(.*\): the system may have run out of memory \(see `dmesg`\) or something killed it; rerun with "
            r"fewer workers \(extraction.num_workers\), or 0 to read the images in the main process",
            line,
        ), line
    else:
        assert re.fullmatch(
            rf"error: DataLoader worker \d \(pid {pid}\) delivered nothing for 3 s while reading batch \d+ of 100 "
            r"\(.*\): it hangs .*; check those files, raise extraction.worker_timeout for very slow storage, or "
            r"rerun with fewer workers \(extraction.num_workers\), or 0 to read the images in the main process",
            line,
        ), line
        assert outcome.seconds < 60 and not Path(f"/proc/{pid}").exists()
    # the index is as it was, or a checkpoint of what was finished before the failure; the rerun completes it
    if files(out) != before:
        assert not RetrievalIndex.load(out, warn_incomplete=False).complete
    index_in_process(photos, tmp_path / "reference")
    rerun = run(command(photos, out), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same_index(RetrievalIndex.load(out), RetrievalIndex.load(tmp_path / "reference"))


@pytest.mark.slow
def test_two_builders_of_one_index_one_refused_naming_the_other_and_the_index_complete(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "index"
    write_photos(photos, range(64))
    index_in_process(photos, tmp_path / "reference")
    first = subprocess.Popen(
        command(photos, out), cwd=tmp_path, env=environment(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)  # it holds the lock; keep it there while the second one starts
        second = run(command(photos, out), cwd=tmp_path)
        assert one_error_line(second) == (
            f"error: index {out} is being updated by another oxford-ir-index run (pid {first.pid}); wait for it to "
            "finish, then run this command again (it embeds only what is still missing)"
        )
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert_same_index(RetrievalIndex.load(out), RetrievalIndex.load(tmp_path / "reference"))
    assert_clean(out)
