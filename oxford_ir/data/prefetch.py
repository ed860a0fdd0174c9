"""The next training batches prepared on the device while the current step runs.

:class:`DevicePrefetchLoader` is a ``DataLoader`` (Lightning handles it as one: the sampler and its
``set_epoch``, DDP, the length, the workers) whose iterator hands each batch the workers made to a background
thread. The thread moves it to the device and finishes it there on a side CUDA stream (``prepare(batch,
device)``: the colour jitter and normalisation, or decoding and augmenting with ``data.decode=gpu``), up to
``depth`` batches ahead of the training loop. Each batch comes out as a :class:`ReadyBatch`; its
:meth:`~ReadyBatch.wait` makes the consumer's current stream wait for the side stream's work on it (a CUDA event,
so the host does not wait), records the consumer's stream on its tensors (``record_stream``: their memory is not
handed to the side stream again before the step that reads them has run) and returns what ``prepare`` made.
``RetrievalDataModule.on_after_batch_transfer`` calls it right before the training step.

Why a thread and not only a stream: the host's part of preparing a batch (copies to issue, a few dozen kernel
launches, and with ``data.decode=gpu`` the draws and nvJPEG, which returns only once the batch is decoded)
takes milliseconds that would otherwise stall the training loop; PyTorch and torchvision release the GIL while
they run, so the two threads overlap on the host, and the two streams on the device.

Order, errors and resuming: batches come out in the order of the DataLoader, which only the consuming thread
iterates (Lightning's resets and worker shutdown see a plain DataLoader); an error while preparing batch n (a
corrupt JPEG's :class:`~oxford_ir.errors.DataError`) or from the workers is raised when batch n is asked for,
as without prefetching. What is trained on depends only on the sampler, so resuming is unaffected. Starting a
new pass (the next epoch) closes the previous one's prefetching first.

Without ``prepare`` (training on the CPU, where the workers finish their batches) it is a plain DataLoader.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch
from torch.utils.data import DataLoader

#: batches prepared ahead of the one the training loop takes (each holds its images on the device)
DEFAULT_DEPTH = 2


class ReadyBatch:
    """A batch prepared on a side stream; :meth:`wait` hands it to the current stream of its device."""

    __slots__ = ("_device", "_event", "_value")

    def __init__(self, value: Any, event: torch.cuda.Event | None = None, device: torch.device | None = None) -> None:
        self._value = value
        self._event = event
        self._device = device

    def wait(self) -> Any:
        """What ``prepare`` returned, safe to use on the current stream (the host does not wait)."""
        if self._event is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(self._event)
            for tensor in _tensors(self._value):
                if tensor.is_cuda:
                    tensor.record_stream(stream)
            self._event = None
        return self._value

    def to(self, *args: Any, **kwargs: Any) -> ReadyBatch:
        """Already on its device (Lightning's ``batch_to_device`` calls this)."""
        return self

    def __repr__(self) -> str:
        state = "pending" if self._event is not None else "ready"
        return f"{type(self).__name__}({state} on {self._device})"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class DevicePrefetchLoader(DataLoader):
    """A DataLoader whose batches are prepared on ``device`` by ``prepare(batch, device)`` in a background
    thread, ``depth`` batches ahead, on a side stream when ``device`` is a CUDA device; they come out as
    :class:`ReadyBatch`. Without ``prepare`` it is a plain DataLoader. Other arguments: ``DataLoader``'s."""

    def __init__(
        self,
        dataset: Any,
        *args: Any,
        prepare: Callable[[Any, torch.device], Any] | None = None,
        device: torch.device | str | None = None,
        depth: int = DEFAULT_DEPTH,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive number of batches, got {depth!r}")
        self.prepare = prepare
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.depth = depth
        self._stream: torch.cuda.Stream | None = None
        self._prefetcher: _Prefetcher | None = None

    @property
    def prefetches(self) -> bool:
        return self.prepare is not None

    def __iter__(self) -> Iterator[Any]:
        self.close()
        batches = super().__iter__()
        if self.prepare is None:
            return batches
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        self._prefetcher = _Prefetcher(batches, self.prepare, self.device, self.depth, self._stream)
        return self._prefetcher

    def close(self) -> None:
        """Stop the current pass's prefetching (its prepared batches are dropped)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


class _Prefetcher:
    """Iterator of :class:`ReadyBatch`: pulls batches from ``batches`` in the calling thread and prepares them in
    its own thread, ``depth`` ahead; errors are raised at their batch's turn."""

    def __init__(
        self,
        batches: Iterator[Any],
        prepare: Callable[[Any, torch.device], Any],
        device: torch.device,
        depth: int,
        stream: torch.cuda.Stream | None,
    ) -> None:
        self._batches = batches
        self._depth = depth
        self._pending: deque[Future] = deque()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._exhausted = False
        # the thread holds no reference to this object: dropping the iterator closes it (__del__)
        self._thread = threading.Thread(
            target=_prepare_jobs,
            args=(self._jobs, self._closed, prepare, device, stream),
            name="oxford-ir-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> ReadyBatch:
        if self._closed.is_set():
            raise StopIteration
        self._fill()
        if not self._pending:
            self.close()
            raise StopIteration
        return self._pending.popleft().result()

    def _fill(self) -> None:
        """Hand batches to the thread until ``depth`` are ahead of the one asked for now."""
        while not self._exhausted and len(self._pending) < self._depth + 1:
            future: Future = Future()
            try:
                batch = next(self._batches)
            except StopIteration:
                self._exhausted = True
                return
            except Exception as error:  # noqa: BLE001 - a worker's error, raised at its batch's turn
                future.set_exception(error)
                self._pending.append(future)
                continue
            self._pending.append(future)
            self._jobs.put((batch, future))

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._pending.clear()
            self._jobs.put(None)

    def __del__(self) -> None:
        self.close()


def _prepare_jobs(
    jobs: queue.SimpleQueue,
    closed: threading.Event,
    prepare: Callable[[Any, torch.device], Any],
    device: torch.device,
    stream: torch.cuda.Stream | None,
) -> None:
    """The prefetch thread: prepare each job's batch and complete its future, until ``None`` or closed."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        while True:
            job = jobs.get()
            if job is None or closed.is_set():
                return
            _prepare_job(*job, prepare, device, stream)
            del job


def _prepare_job(
    batch: Any,
    future: Future,
    prepare: Callable[[Any, torch.device], Any],
    device: torch.device,
    stream: torch.cuda.Stream | None,
) -> None:
    """``prepare(batch, device)`` on ``stream`` (no autograd), then an event after its work; the result, or the
    error, goes to ``future``."""
    try:
        with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            value = prepare(batch, device)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised at the batch's turn
        future.set_exception(error)
        return
    future.set_result(ReadyBatch(value, event, device))
