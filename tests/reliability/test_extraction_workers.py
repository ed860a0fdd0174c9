"""DataLoader workers of the extraction that fail for real: a shared-memory write over the file-size limit, a
worker killed by SIGKILL, a worker blocked on a FIFO (hang), a worker that raises. Each ends the call within
bounded time with one ResourceError naming the worker, its images and the fix, and leaves no worker behind.

Real worker processes of this test process (forked by the DataLoader), real limits and signals; the network
and the images are tiny, so every case takes about a second (the hang: its 1 s timeout).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from oxford_ir.errors import ResourceError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.fs import WorkerTraceback, worker_call, worker_items
from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import GeM
from tests.reliability.processes import children

HINT = "rerun with fewer workers (extraction.num_workers), or 0 to read the images in the main process"


def write_images(folder: Path, n: int, size: tuple[int, int] = (64, 48)) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"im{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_model() -> Embedder:
    torch.manual_seed(0)
    return Embedder(ScratchCNN(channels=[8, 16]), GeM())


#: child processes this test process had before these tests (of other tests: a server, persistent workers)
_OTHERS: set[int] = set()


@pytest.fixture(autouse=True)
def _other_children() -> None:
    _OTHERS.clear()
    _OTHERS.update(children())


def workers() -> list[int]:
    """The live child processes this test started (DataLoader workers while a loader runs)."""
    return [pid for pid in children() if pid not in _OTHERS]


def blocked_on_fifo(pid: int) -> bool:
    """Whether ``pid`` waits in ``open`` for the other end of a FIFO."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() == "wait_for_partner"
    except OSError:
        return False


def when_worker(predicate, act) -> threading.Thread:
    """Run ``act(pid)`` from a thread as soon as a worker of this process satisfies ``predicate(pid)``."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            chosen = [pid for pid in workers() if predicate(pid)]
            if chosen:
                act(chosen[0])
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def fifo_folder(tmp_path: Path) -> list[Path]:
    """Three images and, second in the list, a FIFO named like an image: reading it blocks forever."""
    paths = write_images(tmp_path / "images", 3)
    fifo = tmp_path / "images" / "im01b.png"
    os.mkfifo(fifo)
    return [paths[0], fifo, paths[1], paths[2]]


def test_a_batch_over_the_file_size_limit_in_shared_memory_is_one_error_not_a_hang(tmp_path):
    paths = write_images(tmp_path / "images", 8)
    model = tiny_model()
    expected = extract_embeddings(model, paths, 64, batch_size=4, num_workers=0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))  # a batch is 4 x 3 x 48 x 64 x 4 bytes = 147 kB
    started = time.monotonic()
    try:
        with pytest.raises(ResourceError) as caught:
            extract_embeddings(model, paths, 64, batch_size=4, num_workers=2, worker_timeout=60)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    seconds = time.monotonic() - started
    message = str(caught.value)
    assert re.fullmatch(
        rf"DataLoader worker [01] \(pid \d+\) could not hand batch [12] of 2 \({re.escape(str(tmp_path))}/images/"
        r"im0\d\.png, .* and 1 more\) to the main process: shared memory is full or over the file-size limit "
        r"\(RuntimeError: unable to .*File too large.*\); free space in /dev/shm or raise the limit \(ulimit -f\), "
        rf"or {re.escape(HINT)}",
        message,
    ), message
    assert "\n" not in message and seconds < 20
    assert isinstance(caught.value.__cause__, WorkerTraceback) and "share_memory" in str(caught.value.__cause__)
    assert workers() == []
    # the limit lifted, the same call works and gives the rows of the main process
    again = extract_embeddings(model, paths, 64, batch_size=4, num_workers=2)
    assert torch.equal(again, expected)


def test_a_worker_killed_by_sigkill_is_named_with_the_image_it_was_reading(fifo_folder):
    model = tiny_model()
    killer = when_worker(blocked_on_fifo, lambda pid: os.kill(pid, signal.SIGKILL))
    started = time.monotonic()
    with pytest.raises(ResourceError) as caught:
        extract_embeddings(model, fifo_folder, 64, batch_size=1, num_workers=2, worker_timeout=60)
    seconds = time.monotonic() - started
    killer.join()
    message = str(caught.value)
    assert re.fullmatch(
        rf"DataLoader worker [01] \(pid \d+\) was killed by SIGKILL before delivering (batch \d of 4 \(\S+\), )?"
        rf"batch 4 of 4 \({re.escape(str(fifo_folder[1]))}\): the system may have run out of memory \(see `dmesg`\) "
        rf"or something killed it; {re.escape(HINT)}",
        message,
    ), message
    assert seconds < 15 and workers() == []


def test_a_worker_blocked_on_a_fifo_times_out_and_is_stopped(fifo_folder):
    model = tiny_model()
    started = time.monotonic()
    with pytest.raises(ResourceError) as caught:
        extract_embeddings(model, fifo_folder, 64, batch_size=1, num_workers=2, worker_timeout=1)
    seconds = time.monotonic() - started
    message = str(caught.value)
    assert re.fullmatch(
        rf"DataLoader worker [01] \(pid \d+\) delivered nothing for 1 s while reading batch \d of 4 "
        rf"\({re.escape(str(fifo_folder[1]))}\): it hangs \(a stalled network file system, or a FIFO or device "
        r"among the images\?\); check those files, raise extraction.worker_timeout for very slow storage, or "
        + re.escape(HINT),
        message,
    ), message
    assert 1 <= seconds < 12, seconds
    assert workers() == []  # the blocked worker was killed: nothing is left to block the exit


class _Failing(Dataset):
    """Item 2 raises in the worker (what a bug or a library error there looks like)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, k: int):
        def make():
            if k == 2:
                raise ValueError("the header says 0 x 0 pixels")
            return torch.full((2,), float(k))

        return worker_call(lambda: f"item {k + 1} of 4", make, "rerun with num_workers=0", share=True)


def test_an_exception_in_a_worker_is_one_error_naming_the_worker_and_item():
    items = worker_items(_Failing(), num_workers=2, timeout=60, describe=str, hint="unused", batch_size=None)
    received = []
    with pytest.raises(ResourceError) as caught:
        for item in items:
            received.append(item.tolist())
    assert received == [[0.0, 0.0], [1.0, 1.0]]  # in order, up to the failing item
    assert re.fullmatch(
        r"DataLoader worker 0 \(pid \d+\) failed on item 3 of 4: ValueError: the header says 0 x 0 pixels; "
        r"rerun with num_workers=0",
        str(caught.value),
    ), str(caught.value)
    assert "ValueError: the header says 0 x 0 pixels" in str(caught.value.__cause__)
    assert workers() == []


def test_the_worker_timeout_is_read_and_checked_with_the_other_extraction_options():
    from oxford_ir.errors import ConfigError
    from oxford_ir.extraction.options import extraction_options

    assert extraction_options({})["worker_timeout"] == 300.0
    assert extraction_options({"worker_timeout": 30})["worker_timeout"] == 30.0
    assert extraction_options({"worker_timeout": None})["worker_timeout"] is None
    for bad in (0, -5, "soon", True):
        with pytest.raises(ConfigError, match=r"^extraction.worker_timeout=.*: seconds a DataLoader worker may take"):
            extraction_options({"worker_timeout": bad})
