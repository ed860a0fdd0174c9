"""The writers of data and results under SIGKILL and a file-size limit, in real processes.

Three writers: the download (``oxford-ir-data download``, from an HTTP server on 127.0.0.1 that sends slowly
enough to be killed mid-transfer), the synthetic benchmark (``oxford-ir-data synthetic``) and the evaluation's
results (``oxford-ir-eval``: ``table.txt`` and ``metrics.json``). Each is SIGKILLed (its whole process group) at
several points, chosen by what it has written or printed (tests/reliability/processes.py), and then:

(a) what was there before still loads, unchanged (another dataset in the same data folder, the previous benchmark
    in the folder being replaced, the data an evaluation reads);
(b) nothing half-written is taken for complete: the loader refuses an unfinished download, a benchmark folder is
    the old one or the new one, ``metrics.json`` is absent or whole;
(c) running the same command again finishes and leaves exactly what an uninterrupted run leaves (the same file
    names, byte-identical contents; the download's completion marker differs only by its time stamp).

Under a file-size limit (RLIMIT_FSIZE: a write past it fails with EFBIG) each prints one ``error:`` line naming the
file, leaves nothing that looks complete, and the same command without the limit then finishes as above.
A kill in the split second between two renames cannot be hit from outside; those states are made by hand
(``test_*_between_*``) and recovered from in this process.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.benchmarks.download import COMPLETE_MARKER
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.synthetic import SYNTHETIC_TINY, write_synthetic_benchmark
from oxford_ir.errors import DataError, GroundTruthError
from tests.benchmarks.http_server import FileServer
from tests.reliability.processes import Outcome, environment, run, script

#: the command's own output (stderr, stdout) is written to files in cwd, which a file-size limit also limits:
#: no progress bars
QUIET = {"TQDM_DISABLE": "1", "HYDRA_FULL_ERROR": "0", "OXFORD_IR_DEBUG": "0"}


def tree(folder: Path, *, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not skip(p)
    }


def assert_one_error_line(outcome: Outcome, *names: str) -> None:
    assert outcome.returncode == 2 and not outcome.killed, outcome.stderr[-3000:]
    assert not outcome.traceback, outcome.stderr[-3000:]
    assert len(outcome.error_lines) == 1, outcome.stderr[-3000:]
    for name in names:
        assert name in outcome.error_lines[0], outcome.error_lines[0]


#: kill points in the last milliseconds of a run: polled every 2 ms, and the command may still finish first
END_POINTS = {"marker-written", "ground-truth-started", "table-written"}


def poll_for(point: str) -> dict:
    """``run`` arguments for a kill at ``point``: a fine poll for the points at the very end of a run."""
    return {"poll": 0.002} if point in END_POINTS else {}


def killed_at(outcome: Outcome, *, or_finished: bool = False) -> None:
    """The command was killed by us (not hung); ``or_finished``: it may also have finished first (a point at its
    very end, which the poll can miss)."""
    if or_finished and not outcome.killed:
        assert outcome.returncode == 0, outcome.stderr[-2000:]
        return
    assert outcome.killed and outcome.returncode == -9, (outcome.returncode, outcome.stderr[-2000:])


# -- the download ----------------------------------------------------------------------------------------------------
#: the served archive is sent in pieces of this size with a pause after each: ~6 MB/s, a transfer to kill
THROTTLE_BYTES, THROTTLE_SECONDS = 32 * 1024, 0.005
IMAGE_NAMES = [f"tower_{i:06d}" for i in range(4)] + [f"bridge_{i:06d}" for i in range(4)]


def _noise_jpeg(seed: int, size: int = 512) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _tgz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _served_dataset() -> dict[str, bytes]:
    """A miniature oxford5k that loads: ~2.5 MB of images (nested, flattened on extraction; more than the 1 MB
    the downloader reads at a time, so that a part of it reaches the disk mid-transfer), gt text files and the
    gnd pickle (one query, two positives, one junk)."""
    images = {f"oxbuild_images/{name}.jpg": _noise_jpeg(i) for i, name in enumerate(IMAGE_NAMES)}
    gt = {
        "tower_1_query.txt": b"oxc1_tower_000001 10.0 12.0 200.0 220.0\n",
        "tower_1_good.txt": b"tower_000000\ntower_000002\n",
        "tower_1_ok.txt": b"",
        "tower_1_junk.txt": b"tower_000003\n",
    }
    gnd = {
        "imlist": IMAGE_NAMES,
        "qimlist": ["tower_000001"],
        "gnd": [{"bbx": [10.0, 12.0, 200.0, 220.0], "ok": [0, 1, 2], "junk": [3]}],
    }
    return {"images.tgz": _tgz(images), "gt.tgz": _tgz(gt), "gnd_oxford5k.pkl": pickle.dumps(gnd, protocol=2)}


@pytest.fixture
def slow_server() -> Iterator[FileServer]:
    """The 127.0.0.1 file server of the downloader tests, sending every response in throttled pieces."""
    server = FileServer()
    base = server.httpd.RequestHandlerClass

    class Throttled(base):
        def setup(self) -> None:
            super().setup()
            self.wfile = _SlowWriter(self.wfile)

    server.httpd.RequestHandlerClass = Throttled
    server.files.update(_served_dataset())
    server.thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()


class _SlowWriter:
    def __init__(self, raw) -> None:
        self._raw = raw

    def write(self, data: bytes) -> int:
        for start in range(0, len(data), THROTTLE_BYTES):
            self._raw.write(data[start : start + THROTTLE_BYTES])
            self._raw.flush()
            time.sleep(THROTTLE_SECONDS)
        return len(data)

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _sources(server: FileServer, path: Path) -> Path:
    path.write_text(
        "files:\n"
        f"  - {{url: {server.url}/images.tgz, filename: images.tgz, extract_to: jpg, flatten: true}}\n"
        f"  - {{url: {server.url}/gt.tgz, filename: gt.tgz, extract_to: gt_files_170407, flatten: true}}\n"
        f"  - {{url: {server.url}/gnd_oxford5k.pkl, filename: gnd_oxford5k.pkl}}\n"
    )
    return path


def _download(root: Path, sources: Path) -> list[str]:
    return [script("oxford-ir-data"), "-q", "download", "oxford5k", "--root", str(root), "--sources", str(sources),
            "--no-progress", "--retries", "0", "--timeout", "20"]  # fmt: skip


def _without_time(files: dict[str, bytes]) -> dict[str, bytes]:
    """The dataset's files with the completion marker's time stamp taken out (its only varying byte)."""
    out = dict(files)
    marker = json.loads(out[COMPLETE_MARKER])
    marker.pop("completed_at")
    out[COMPLETE_MARKER] = json.dumps(marker, sort_keys=True).encode()
    return out


@pytest.fixture
def download_world(slow_server: FileServer, tmp_path: Path):
    """``(command, data root, reference files of an uninterrupted download, files of the synthetic benchmark
    that shares the data root)``."""
    sources = _sources(slow_server, tmp_path / "sources.yaml")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    reference = run(_download(tmp_path / "reference", sources), cwd=cwd, env=environment(**QUIET))
    assert reference.returncode == 0, reference.stderr
    expected = _without_time(tree(tmp_path / "reference" / "oxford5k"))
    root = tmp_path / "data"
    write_synthetic_benchmark(root / "synthetic", **SYNTHETIC_TINY)
    return _download(root, sources), root, expected, tree(root / "synthetic"), cwd


def _check_download_after_fault(root: Path, synthetic: dict[str, bytes]) -> None:
    """(a) the other dataset is untouched and loads; (b) the interrupted one is refused, or complete and whole."""
    assert tree(root / "synthetic") == synthetic
    load_benchmark("synthetic", root)
    folder = root / "oxford5k"
    if (folder / COMPLETE_MARKER).is_file():
        assert load_benchmark("oxford5k", root).n_queries == 1
    elif folder.exists():
        with pytest.raises((DataError, GroundTruthError)):
            load_benchmark("oxford5k", root)


def _check_download_rerun(command: list[str], root: Path, expected: dict[str, bytes], cwd: Path) -> None:
    """(c) the same command finishes with exactly the files of an uninterrupted download."""
    again = run(command, cwd=cwd, env=environment(**QUIET))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _without_time(tree(root / "oxford5k")) == expected
    benchmark = load_benchmark("oxford5k", root)
    assert benchmark.qimlist == ["tower_000001"] and not benchmark.missing_images()


DOWNLOAD_KILLS = {
    "mid-transfer": lambda folder: (
        (folder / "images.tgz.part").is_file() and (folder / "images.tgz.part").stat().st_size > 0
    ),
    "images-extracted": lambda folder: (folder / "jpg").is_dir(),
    "first-step-recorded": lambda folder: (folder / ".download-state.json").is_file(),
    "ground-truth-extracted": lambda folder: (folder / "gt_files_170407").is_dir(),
    "marker-written": lambda folder: (folder / COMPLETE_MARKER).is_file(),
}


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, marks=[] if p == "mid-transfer" else [pytest.mark.slow]) for p in DOWNLOAD_KILLS],
)
def test_download_killed_resumes_to_the_same_files(download_world, point: str) -> None:
    command, root, expected, synthetic, cwd = download_world
    folder = root / "oxford5k"
    outcome = run(
        command, cwd=cwd, env=environment(**QUIET), kill_when=lambda: DOWNLOAD_KILLS[point](folder), **poll_for(point)
    )
    killed_at(outcome, or_finished=point in END_POINTS)
    _check_download_after_fault(root, synthetic)
    _check_download_rerun(command, root, expected, cwd)
    _check_download_after_fault(root, synthetic)


def test_download_over_the_file_size_limit_is_one_line_and_resumes(download_world) -> None:
    command, root, expected, synthetic, cwd = download_world
    outcome = run(command, cwd=cwd, env=environment(**QUIET), file_size=200_000)
    assert_one_error_line(outcome, "file-size limit", "images.tgz.part")
    assert not (root / "oxford5k" / COMPLETE_MARKER).exists()
    assert 0 < (root / "oxford5k" / "images.tgz.part").stat().st_size <= 200_000  # kept: the next run resumes it
    _check_download_after_fault(root, synthetic)
    _check_download_rerun(command, root, expected, cwd)


# -- the synthetic benchmark -----------------------------------------------------------------------------------------
#: what the killed command writes (seed 1, ~70 images: about a second); the folder held seed 0 before
SYNTHETIC_ARGS = ["--preset", "tiny", "--seed", "1", "--landmarks", "4", "--images-per-landmark", "12",
                  "--distractors", "10"]  # fmt: skip
SYNTHETIC_PARAMS = {
    **SYNTHETIC_TINY, "seed": 1, "n_landmarks": 4, "images_per_landmark": 12, "n_distractors": 10,
}  # fmt: skip


def _staging(root: Path) -> list[Path]:
    return sorted(root.parent.glob(f".{root.name}.tmp-*"))


@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted ``oxford-ir-data synthetic`` run of :data:`SYNTHETIC_ARGS`."""
    root = tmp_path_factory.mktemp("synthetic_reference")
    outcome = run([script("oxford-ir-data"), "-q", "synthetic", "--root", str(root / "synthetic"), *SYNTHETIC_ARGS],
                  cwd=root, env=environment(**QUIET))  # fmt: skip
    assert outcome.returncode == 0, outcome.stderr
    return tree(root / "synthetic")


@pytest.fixture
def synthetic_world(tmp_path: Path):
    """``(command, benchmark folder holding seed 0, its files, cwd)``."""
    root = tmp_path / "data" / "synthetic"
    write_synthetic_benchmark(root, **SYNTHETIC_TINY)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    command = [script("oxford-ir-data"), "-q", "synthetic", "--root", str(root), *SYNTHETIC_ARGS]
    return command, root, tree(root), cwd


def _check_synthetic_after_fault(root: Path, before: dict[str, bytes], reference: dict[str, bytes]) -> None:
    """(a) + (b): the folder is the old benchmark or the new one, whole, and loads; never a mix or a part."""
    now = tree(root)
    assert now in (before, reference), "the benchmark folder holds neither the old nor the new benchmark"
    assert load_benchmark("rsynthetic", root.parent).n_queries > 0


def _check_synthetic_rerun(command: list[str], root: Path, reference: dict[str, bytes], cwd: Path) -> None:
    """(c) the same command finishes with the files of an uninterrupted run, and nothing is left beside them."""
    again = run(command, cwd=cwd, env=environment(**QUIET))
    assert again.returncode == 0, again.stderr[-3000:]
    assert tree(root) == reference
    assert _staging(root) == []


SYNTHETIC_KILLS = {
    "staging-created": lambda staging: bool(staging),
    "ten-images-drawn": lambda staging: any(len(list((s / "jpg").glob("*.jpg"))) >= 10 for s in staging),
    "ground-truth-started": lambda staging: any((s / "gt_files_170407").is_dir() for s in staging),
}


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, marks=[] if p == "ten-images-drawn" else [pytest.mark.slow]) for p in SYNTHETIC_KILLS],
)
def test_synthetic_killed_leaves_the_old_benchmark_and_reruns_identically(
    synthetic_world, synthetic_reference, point: str
) -> None:
    command, root, before, cwd = synthetic_world
    outcome = run(
        command,
        cwd=cwd,
        env=environment(**QUIET),
        kill_when=lambda: SYNTHETIC_KILLS[point](_staging(root)),
        **poll_for(point),
    )
    killed_at(outcome, or_finished=point in END_POINTS)
    if outcome.killed:  # killed before its swap, it leaves its staging folder (removed by the next run)
        assert _staging(root) or tree(root) == synthetic_reference
    _check_synthetic_after_fault(root, before, synthetic_reference)
    _check_synthetic_rerun(command, root, synthetic_reference, cwd)


def test_synthetic_over_the_file_size_limit_is_one_line_and_keeps_the_old_benchmark(
    synthetic_world, synthetic_reference
) -> None:
    command, root, before, cwd = synthetic_world
    outcome = run(command, cwd=cwd, env=environment(**QUIET), file_size=3000)  # views.json is larger
    assert_one_error_line(outcome, "file-size limit", f"writing {root.parent}/.synthetic.tmp-")
    assert tree(root) == before and _staging(root) == []  # the partial benchmark is removed, the old one kept
    _check_synthetic_rerun(command, root, synthetic_reference, cwd)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_synthetic_killed_between_its_two_renames_is_recovered(tmp_path: Path, synthetic_reference) -> None:
    """A run killed after moving the old folder aside and before moving the new one in leaves no folder at the
    root: the next run moves the finished one in (drawing nothing) and removes the old one."""
    root = tmp_path / "synthetic"
    pid = _dead_pid()
    finished = tmp_path / f".synthetic.tmp-{pid}-0123abcd"
    write_synthetic_benchmark(finished, **SYNTHETIC_PARAMS)
    old = tmp_path / f".synthetic.tmp-{pid}-0123abcd.old"
    write_synthetic_benchmark(old, **SYNTHETIC_TINY)
    started = time.perf_counter()
    assert write_synthetic_benchmark(root, **SYNTHETIC_PARAMS) == root
    assert time.perf_counter() - started < 0.5  # moved, not drawn again
    assert tree(root) == synthetic_reference and _staging(root) == []


# -- the evaluation's results ----------------------------------------------------------------------------------------
EVAL_ARGS = ["backbone=raw_pixels", "pooling=flatten", "benchmarks=[synthetic,rsynthetic]", "synthetic.preset=tiny",
             "extraction.num_workers=0", "extraction.device=cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory: pytest.TempPathFactory):
    """``(command without its run folder, data folder, files of the data, reference results, cwd)``: one
    uninterrupted evaluation, which also wrote the synthetic benchmark it reads."""
    root = tmp_path_factory.mktemp("eval_faults")
    command = [script("oxford-ir-eval"), *EVAL_ARGS, f"paths.data_dir={root / 'data'}"]
    outcome = run([*command, f"hydra.run.dir={root / 'reference'}"], cwd=root, env=environment(**QUIET))
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    reference = {name: (root / "reference" / name).read_bytes() for name in ("metrics.json", "table.txt")}
    return command, root / "data", tree(root / "data"), reference, root


def _results(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file() and p.suffix != ".log"}


EVAL_KILLS = {
    "hydra-started": {"kill_when": "config"},
    "first-benchmark-evaluated": {"kill_on_output": "synthetic: "},
    "table-written": {"kill_when": "table"},
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(EVAL_KILLS))
def test_evaluation_killed_leaves_no_partial_metrics_and_reruns_identically(eval_world, tmp_path, point) -> None:
    command, data, data_files, reference, cwd = eval_world
    folder = tmp_path / "run"
    # the folder holds a finished evaluation of another command: replaced whole, or still whole
    previous = run([*command, "kappas=[1]", f"hydra.run.dir={folder}"], cwd=cwd, env=environment(**QUIET))
    assert previous.returncode == 0, previous.stderr[-3000:]
    old = _results(folder)
    how = dict(EVAL_KILLS[point])
    if "kill_when" in how:
        target = folder / (".hydra/config.yaml" if how.pop("kill_when") == "config" else "table.txt")
        mtime = target.stat().st_mtime_ns if target.exists() else None
        how["kill_when"] = lambda: target.exists() and target.stat().st_mtime_ns != mtime
    outcome = run([*command, f"hydra.run.dir={folder}"], cwd=cwd, env=environment(**QUIET), **how, **poll_for(point))
    killed_at(outcome, or_finished=point in END_POINTS)
    now = _results(folder)
    assert tree(data) == data_files  # (a) the data it read is untouched
    # (b) a metrics.json is whole and belongs with the table beside it; a kill between writing a temp file and
    # renaming it leaves that ``*.tmp``, which nothing reads and the next run removes
    if "metrics.json" in now:
        assert {k: v for k, v in now.items() if not k.endswith(".tmp")} in (old, reference)
        json.loads(now["metrics.json"])
    again = run([*command, f"hydra.run.dir={folder}"], cwd=cwd, env=environment(**QUIET))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _results(folder) == reference  # (c) byte-identical to an uninterrupted run
    assert not [p for p in folder.glob("*.tmp")]


@pytest.mark.slow
def test_evaluation_over_the_file_size_limit_is_one_line_without_metrics(eval_world, tmp_path) -> None:
    """The limit lies between the table (~300 B) and metrics.json (~2 kB): the table is written, metrics.json
    is not, and no temporary file is left. Hydra's own files (.hydra/, the log file) are switched off, as Hydra
    reports a failure to write them with its own traceback, before any of our code runs."""
    command, data, data_files, reference, cwd = eval_world
    folder = tmp_path / "run"
    hydra_files_off = ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    outcome = run([*command, *hydra_files_off, f"hydra.run.dir={folder}"], cwd=cwd, env=environment(**QUIET),
                  file_size=1200)  # fmt: skip
    assert_one_error_line(outcome, "file-size limit", "metrics.json")
    assert not (folder / "metrics.json").exists() and not list(folder.glob("*.tmp"))
    assert tree(data) == data_files
    again = run([*command, *hydra_files_off, f"hydra.run.dir={folder}"], cwd=cwd, env=environment(**QUIET))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _results(folder) == reference


def test_results_written_in_order_with_no_metrics_on_failure(tmp_path: Path, monkeypatch) -> None:
    """The states between the renames, by hand: metrics.json of an earlier run is gone before the new table is
    written, and a failure to write the new metrics.json leaves none (the table alone is not a finished run)."""
    import oxford_ir.cli.evaluate as evaluate

    folder = tmp_path / "run"
    evaluate.write_results(folder, {"metrics": {"a": 1.0}}, "old table")
    written = []
    real = evaluate.replace_file

    def failing(path: Path, data: bytes, **kwargs) -> None:
        written.append((path.name, (folder / "metrics.json").exists()))
        if path.name == "metrics.json":
            raise OSError(27, "File too large", str(path) + ".tmp")
        real(path, data, **kwargs)

    monkeypatch.setattr(evaluate, "replace_file", failing)
    with pytest.raises(OSError):
        evaluate.write_results(folder, {"metrics": {"a": 2.0}}, "new table")
    assert written == [("table.txt", False), ("metrics.json", False)]
    assert not (folder / "metrics.json").exists() and (folder / "table.txt").read_text() == "new table\n"
    shutil.rmtree(folder)
