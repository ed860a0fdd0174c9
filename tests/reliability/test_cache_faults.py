"""Faults injected into the image cache build for real: a file-size limit (a full disk without root), decoding
workers killed or stopped, a FIFO among the images, a second builder, and SIGKILL of ``oxford-ir-data cache`` at
chosen points.

After each fault: (a) the previous cache still opens with the same pixels, (b) a pixel file or temp manifest
that no manifest names is never read, (c) building again gives exactly (bit for bit) what an uninterrupted build
gives, and leaves no stray file. The default suite runs the cases in this process (real worker processes, real
limits and signals); the command-line cases are ``slow``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.data.cache import build_image_cache
from oxford_ir.data.cache_format import ImageCache, ImageCacheError, open_image_cache
from oxford_ir.errors import DataError, ResourceError
from tests.reliability.processes import children, environment, lock_held_elsewhere, run, script

HINT = (
    "rerun with fewer decoding workers (oxford-ir-data cache --workers, data.cache.num_workers), or 0 to decode in "
    "the main process"
)


def write_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(seed * 1000 + i)
        path = folder / f"im{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def contents(cache: ImageCache) -> dict:
    """What a cache holds, independent of its pixel file's name: key -> (source size, mtime, pixels)."""
    return {
        key: (tuple(int(v) for v in cache.sources[row]), cache.pixels(row).tobytes())
        for row, key in enumerate(cache.keys)
    }


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def assert_clean(folder: Path) -> None:
    """The manifest, the one pixel file it names and the lock: nothing else."""
    named = json.loads((folder / "manifest.json").read_text())["pixels"]["file"]
    assert sorted(os.listdir(folder)) == sorted([".lock", "manifest.json", named])


def strike_workers(sig: signal.Signals, others: set[int]) -> threading.Thread:
    """Send ``sig`` to both decoding workers of this process as soon as they are up (from a thread); ``others``:
    children this process had before (of other tests), left alone."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = [pid for pid in children() if pid not in others]
            if len(pids) >= 2:
                for pid in pids:
                    os.kill(pid, sig)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- the default suite: in this process ------------------------------------------------------------------
def test_a_write_over_the_file_size_limit_is_one_error_and_keeps_the_previous_cache(tmp_path):
    sources, folder = write_images(tmp_path / "src", 8), tmp_path / "cache"
    before = contents(build_image_cache(folder, sources, kind="eval", long_side=32, progress=False))
    kept = files(folder)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # 8 x 48 x 64 x 3 = 73 kB of pixels
    try:
        with pytest.raises(ImageCacheError) as caught:
            build_image_cache(folder, sources, kind="eval", long_side=64, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert re.fullmatch(
        rf"the file-size limit was reached writing {re.escape(str(folder))}/pixels-[0-9a-f]{{32}}\.u8 \(the image "
        rf"cache in {re.escape(str(folder))}\): free space \(or raise the limit\) and run again, or build the cache "
        r"on a disk with room \(data.cache.dir, oxford-ir-data cache --dir\); the previous cache is kept and nothing "
        r"half-written is used",
        str(caught.value),
    ), str(caught.value)
    assert caught.value.__cause__.errno == errno.EFBIG
    assert files(folder) == kept and contents(open_image_cache(folder)) == before  # no stray pixel file either


@pytest.mark.parametrize("fault", [pytest.param("SIGKILL", marks=pytest.mark.slow), "SIGSTOP"])
def test_a_decoding_worker_killed_or_stopped_is_one_error_naming_it(tmp_path, fault):
    sources, folder = write_images(tmp_path / "src", 16), tmp_path / "cache"
    others = set(children())
    striker = strike_workers(getattr(signal, fault), others)
    started = time.monotonic()
    with pytest.raises(ResourceError) as caught:
        build_image_cache(folder, sources, kind="eval", long_side=64, num_workers=2, worker_timeout=1, progress=False)
    seconds = time.monotonic() - started
    striker.join()
    message = str(caught.value)
    item = rf"image \d+ of 16 \({re.escape(str(tmp_path))}/src/im0\d\d\.png\)"
    if fault == "SIGKILL":
        assert re.fullmatch(
            rf"DataLoader worker [01] \(pid \d+\) was killed by SIGKILL before delivering {item}(, {item})*"
            rf"(; DataLoader worker [01] .*)?: the system may have run out of memory \(see `dmesg`\) or something "
            rf"killed it; {re.escape(HINT)}",
            message,
        ), message
    else:
        assert re.fullmatch(
            rf"DataLoader worker [01] \(pid \d+\) delivered nothing for 1 s while reading {item}: it hangs \(.*\); "
            rf"check those files, raise the worker timeout for very slow storage, or {re.escape(HINT)}",
            message,
        ), message
    assert seconds < 15 and set(children()) <= others  # stopped workers were killed: nothing blocks the exit
    assert sorted(os.listdir(folder)) == [".lock"]  # the half-written pixel file was removed
    rebuilt = build_image_cache(folder, sources, kind="eval", long_side=64, num_workers=2, progress=False)
    reference = build_image_cache(tmp_path / "reference", sources, kind="eval", long_side=64, progress=False)
    assert contents(rebuilt) == contents(reference)


def test_files_a_killed_build_left_beside_a_fresh_cache_are_never_read_and_removed(tmp_path):
    sources, folder = write_images(tmp_path / "src", 4), tmp_path / "cache"
    before = contents(build_image_cache(folder, sources, kind="eval", long_side=32, progress=False))
    kept = files(folder)
    # a build killed after its commit leaves the old pixel file; one killed before it, its new file and temp manifest
    (folder / f"pixels-{'a' * 32}.u8").write_bytes(b"\x00" * 64)
    (folder / f"manifest.{'b' * 32}.tmp").write_text("{")
    assert contents(open_image_cache(folder)) == before
    assert contents(build_image_cache(folder, sources, kind="eval", long_side=32, progress=False)) == before
    assert files(folder) == kept


def test_a_fifo_among_the_images_is_refused_before_anything_blocks(tmp_path):
    sources, folder = write_images(tmp_path / "src", 3), tmp_path / "cache"
    fifo = tmp_path / "src" / "im003.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=rf"^{re.escape(str(fifo))} is not a regular file \(a FIFO, socket or device"):
        build_image_cache(folder, [*sources, fifo], kind="eval", long_side=64, num_workers=2, progress=False)
    assert not folder.exists() or sorted(os.listdir(folder)) in ([], [".lock"])


def test_a_second_builder_waits_for_the_first_naming_it_then_finds_the_cache_fresh(tmp_path, caplog):
    sources, folder = write_images(tmp_path / "src", 4), tmp_path / "cache"
    folder.mkdir()
    with lock_held_elsewhere(folder / ".lock", seconds=1.0) as holder:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="oxford_ir.data.cache"):
            cache = build_image_cache(folder, sources, kind="eval", long_side=32, progress=False)
        assert holder.wait() == 0 and time.monotonic() - started > 0.5  # it waited for the holder to finish
    assert f"image cache {folder}: another process (pid {holder.pid}) is building it; waiting" in caplog.messages
    assert len(cache) == 4 and (folder / ".lock").read_text() == ""
    assert_clean(folder)


# -- slow: the command, killed at chosen points ----------------------------------------------------------
@pytest.fixture
def benchmark(tmp_path: Path) -> Path:
    """A data folder with a synthetic benchmark of 121 images of 128 px."""
    from oxford_ir.benchmarks.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark

    write_synthetic_benchmark(
        tmp_path / "data" / "synthetic", **{**SYNTHETIC_PRESETS["tiny"], "n_distractors": 100, "photo_long_side": 128}
    )
    return tmp_path / "data"


def cache_command(data: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [script("oxford-ir-data"), "cache", "synthetic", "--root", str(data), "--dir", str(cache_dir),
            "--eval-size", "128", "--no-progress", *extra]  # fmt: skip


def changed(data: Path, count: int) -> None:
    """Rewrite the first ``count`` database images (same size, other pixels): an update decodes them again."""
    for path in sorted((data / "synthetic" / "jpg").glob("*.jpg"))[:count]:
        with Image.open(path) as image:
            flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        flipped.save(path, quality=90)


def unnamed_pixel_file(folder: Path):
    """A pixel file that the manifest does not name appears: the command is writing a new build."""

    def due() -> bool:
        try:
            named = json.loads((folder / "manifest.json").read_text())["pixels"]["file"]
        except (OSError, ValueError, KeyError):
            named = None
        return any(p.name != named for p in folder.glob("pixels-*.u8"))

    return due


@pytest.mark.slow
@pytest.mark.parametrize("update", [False, True], ids=["fresh", "update"])
@pytest.mark.parametrize("point", ["early", "while decoding", "at the commit"])
def test_a_cache_build_killed_at_any_point_reruns_to_exactly_an_uninterrupted_build(benchmark, tmp_path, update, point):
    cache_dir = tmp_path / "cache"
    folder = cache_dir / "eval-synthetic-128"
    command = cache_command(benchmark, cache_dir, "--workers", "2")
    if update:
        assert run(command, cwd=tmp_path).returncode == 0
        changed(benchmark, 60)
    before = contents(open_image_cache(folder)) if update else None
    before_files = files(folder) if update else None
    reference_dir = tmp_path / "reference"
    if update:
        shutil.copytree(cache_dir, reference_dir)
    assert run(cache_command(benchmark, reference_dir), cwd=tmp_path).returncode == 0  # uninterrupted
    expected = contents(open_image_cache(reference_dir / "eval-synthetic-128"))

    kill_when = {
        "early": lambda: False,
        "while decoding": unnamed_pixel_file(folder),
        "at the commit": lambda: any(folder.glob("manifest.*.tmp")) or (before_files is not None and (
            folder / "manifest.json").exists() and (folder / "manifest.json").read_bytes()
            != before_files["manifest.json"]) or (not update and (folder / "manifest.json").exists()),
    }[point]  # fmt: skip
    outcome = run(command, cwd=tmp_path, kill_when=kill_when, kill_on_output="decoding" if point == "early" else None)
    assert outcome.killed, outcome.stderr[-2000:]
    if (folder / "manifest.json").exists():
        now = contents(open_image_cache(folder))  # (a) and (b): the old cache or the new one, whole
        assert now in (before, expected)
    else:
        assert not update
        with pytest.raises(ImageCacheError, match="no image cache in"):
            open_image_cache(folder)
    rerun = run(command, cwd=tmp_path)  # (c)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert contents(open_image_cache(folder)) == expected
    assert_clean(folder)


@pytest.mark.slow
def test_a_cache_update_over_the_file_size_limit_is_one_line_and_keeps_the_previous_cache(benchmark, tmp_path):
    cache_dir = tmp_path / "cache"
    folder = cache_dir / "eval-synthetic-128"
    command = cache_command(benchmark, cache_dir, "--workers", "2")
    assert run(command, cwd=tmp_path).returncode == 0
    before = files(folder)
    changed(benchmark, 60)
    outcome = run(command, cwd=tmp_path, file_size=1_000_000, timeout=120)  # the pixels are ~4.6 MB
    assert outcome.returncode == 2 and not outcome.traceback, outcome.stderr[-2000:]
    assert len(outcome.error_lines) == 1 and re.fullmatch(
        rf"error: the file-size limit was reached writing {re.escape(str(folder))}/pixels-[0-9a-f]{{32}}\.u8 \(the "
        rf"image cache in {re.escape(str(folder))}\): free space .*; the previous cache is kept and nothing "
        r"half-written is used",
        outcome.error_lines[0],
    ), outcome.stderr
    assert files(folder) == before


@pytest.mark.slow
def test_two_cache_builders_the_second_waits_for_the_first_and_reuses_its_work(benchmark, tmp_path):
    cache_dir = tmp_path / "cache"
    folder = cache_dir / "eval-synthetic-128"
    command = cache_command(benchmark, cache_dir, "--workers", "2")
    first = subprocess.Popen(command, cwd=tmp_path, env=environment(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    second = None
    try:
        deadline = time.monotonic() + 60
        while not ((folder / ".lock").exists() and (folder / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)  # it holds the lock
        log = tmp_path / "second.err"
        with open(log, "w") as err:
            second = subprocess.Popen(command, cwd=tmp_path, env=environment(), start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        waiting = f"image cache {folder}: another process (pid {first.pid}) is building it; waiting"
        while waiting not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
        assert second.wait(timeout=120) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert "decoding 127 images" in first.stderr.read()
    assert "decoding" not in log.read_text()  # the second found the first's cache fresh
    assert second.stdout.read().startswith("eval cache: 127 images at long side 128")
    assert_clean(folder)
