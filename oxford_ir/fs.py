"""What the index and the image cache need from the operating system to survive faults.

Files: :func:`write_new` and :func:`replace_file` write durably (fsync of the file, then of its folder) and leave
nothing half-written behind when they fail; a write error names the file, so that a full disk or a file-size
limit reads as one line (:func:`~oxford_ir.errors.no_room_error`). :func:`exclusive_lock` lets one process at a
time write a folder: the others wait or are refused, told which process (pid) holds it.

Paths read from files: :func:`path_escape` and :func:`escapes` say whether a relative path that a file holds (an
index entry, an image name of the ground truth) stays inside the folder it is joined to: the one containment check
of the project, so that no file can make a reader open ``/etc/passwd`` or ``../../secret``.

Worker processes: :func:`worker_items` iterates a DataLoader whose workers may fail. A worker that dies (killed,
out of memory), raises, cannot hand its result over (shared memory full, under ``/dev/shm`` or a file-size
limit) or delivers nothing for ``timeout`` seconds ends the iteration with one
:class:`~oxford_ir.errors.ResourceError` naming the worker, what it was working on and what to do, and the other
workers are stopped; nothing waits forever. Datasets run their items in workers through :func:`worker_call`,
which sends a :class:`WorkerFault` (a few bytes through the pipe) instead of raising there.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from oxford_ir.errors import ResourceError


# -- files -----------------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` durable (a new or renamed file survives a power cut)."""
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _named(error: OSError, path: Path) -> OSError:
    """``error`` with ``path`` as its file name (a failed ``write`` does not say which file it was)."""
    if error.filename is not None or error.errno is None:
        return error
    named = OSError(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path))
    named.__cause__ = error
    return named


def write_new(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Create ``path`` (it must not exist), fill it with ``write(file)``, fsync it.

    On any failure the file is removed; an OSError then names ``path`` (``errno`` kept: ENOSPC, EFBIG, ...).
    """
    try:
        with open(path, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except FileExistsError:
        raise
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(error, OSError):
            raise _named(error, path) from None
        raise


def replace_file(path: Path, data: bytes, *, temp: Path | None = None) -> None:
    """Atomically make ``data`` the content of ``path``: write ``temp`` (default ``<path>.tmp``, same folder), fsync,
    ``os.replace``, fsync the folder. A failure leaves the old ``path`` as it was and no ``temp``."""
    temp = temp if temp is not None else path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # left by a process killed here before
    write_new(temp, lambda f: f.write(data))
    try:
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(error, OSError):
            raise _named(error, path) from None
        raise
    fsync_dir(path.parent)


# -- paths read from files -------------------------------------------------------------------------
_SEPARATORS = re.compile(r"[/\\]")


def path_escape(name: str) -> str | None:
    """Why the relative path ``name`` (posix, as files store it) leaves any folder it is joined to, from its text
    alone; None when it cannot. Refused: empty, a NUL byte, absolute (``/x``, ``\\x``), a ``..`` part
    (``\\`` counts as a separator here too: such a name is refused on every platform alike)."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if "\0" in name:
        return "holds a NUL byte"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if ".." in _SEPARATORS.split(name):
        return "climbs out of its folder with '..'"
    return None


def outside_root(root: Path, names: Iterable[str], *, follow_links: bool = True) -> tuple[int, str, str] | None:
    """The first of ``names`` (paths relative to ``root``) that leads outside ``root``, as ``(position, name,
    why)``; None when every one stays inside (:func:`escapes`)."""
    return next(escapes(root, names, follow_links=follow_links), None)


def escapes(root: Path, names: Iterable[str], *, follow_links: bool = True) -> Iterator[tuple[int, str, str]]:
    """``(position, name, why)`` of every one of ``names`` (paths relative to ``root``) that leads outside ``root``.

    Its text is checked first (:func:`path_escape`); with ``follow_links``, symbolic links too: a folder on the way
    (each distinct folder resolved once) or the file itself may not resolve outside ``root`` resolved. A file that
    does not exist cannot be a link and passes. Costs one ``lstat`` per name (9 us on the 2-core test machine).
    """
    base = os.fspath(root)
    real_root = os.path.realpath(base) if follow_links else base
    folders: dict[str, str | None] = {"": None}
    for position, name in enumerate(names):
        why = path_escape(name)
        if why is None and follow_links:
            folder = name.rpartition("/")[0]
            if folder not in folders:
                folders[folder] = _resolves_outside(os.path.join(base, folder), real_root)
            why = folders[folder] or _link_outside(os.path.join(base, name), real_root)
        if why is not None:
            yield position, name, why


def _link_outside(path: str, real_root: str) -> str | None:
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return None
    except (OSError, ValueError):
        return None  # nothing there (or unreadable): nothing to follow
    return _resolves_outside(path, real_root)


def _resolves_outside(path: str, real_root: str) -> str | None:
    resolved = os.path.realpath(path)
    if resolved == real_root or resolved.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    return f"is a symbolic link to {resolved}"


def lock_holder(path: Path) -> int | None:
    """The pid written into the lock file ``path`` by the process holding it, when that process is alive."""
    try:
        pid = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


@contextlib.contextmanager
def exclusive_lock(
    path: Path, *, wait: bool, busy: Callable[[int | None], BaseException] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created when missing) for the block; the holder writes its pid there.

    When another process holds it: ``wait`` blocks until it is free (``busy(pid)`` is called first, its result
    discarded: a place to say who we wait for), else ``busy(pid)`` is raised (``pid``: the holder, None if
    unknown). The lock dies with its process, also a SIGKILLed one: it never goes stale.

    A POSIX record lock (``lockf``), not ``flock``: an ``flock`` is shared with the DataLoader workers the holder
    forks, which outlive a killed holder by seconds and would keep the lock. Caveat of POSIX locks: the holder
    must not open and close ``path`` again while it holds it (closing any descriptor of the file drops the lock).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    handle = open(path, "a+")  # noqa: SIM115 - closed in the finally below
    try:
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = lock_holder(path)
            if not wait:
                refusal = busy(holder) if busy is not None else BlockingIOError(f"{path} is locked by pid {holder}")
                raise refusal from None
            if busy is not None:
                busy(holder)
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # unbuffered: a full disk must not stop the build that will report it
            os.ftruncate(handle.fileno(), 0)
            os.write(handle.fileno(), f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), 0)
            fcntl.lockf(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


# -- worker processes --------------------------------------------------------------------------------
#: how often the main process looks for dead workers while it waits for a batch
POLL_SECONDS = 1.0
#: seconds a DataLoader worker may take to deliver an item before it counts as hung (extraction.worker_timeout)
WORKER_TIMEOUT = 300.0


class WorkerFault(NamedTuple):
    """Sent by a worker instead of an item it could not make or hand over: the one-line message and the
    worker's traceback (shown with ``OXFORD_IR_DEBUG=1``)."""

    message: str
    traceback: str


class WorkerTraceback(Exception):
    """The traceback of an exception in a worker process, as text (the cause of the ResourceError raised)."""


def worker_call(what: Callable[[], str], make: Callable[[], Any], hint: str, *, share: bool = False) -> Any:
    """``make()`` in a DataLoader worker, its tensors moved to shared memory there when ``share``
    (:func:`share_memory`); an exception becomes a :class:`WorkerFault` naming the worker (id and pid), ``what()``
    it was making and ``hint`` (what to do). Outside a worker (``num_workers=0``), ``make()`` runs as is."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return make()
    try:
        item = make()
        return share_memory(item) if share else item
    except Exception as error:
        reason = _one_line(error)
        if _no_room_in_shared_memory(error):
            message = (
                f"DataLoader worker {info.id} (pid {os.getpid()}) could not hand {what()} to the main process: "
                f"shared memory is full or over the file-size limit ({reason}); free space in /dev/shm or raise "
                f"the limit (ulimit -f), or {hint}"
            )
        else:
            message = f"DataLoader worker {info.id} (pid {os.getpid()}) failed on {what()}: {reason}; {hint}"
        return WorkerFault(message, traceback.format_exc())


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text}" if not str(error).startswith(type(error).__name__) else text


def _no_room_in_shared_memory(error: BaseException) -> bool:
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(error)
    return "unable to" in text and any(s in text for s in ("File too large", "No space left", "Disk quota"))


def share_memory(item: Any) -> Any:
    """Move every tensor of ``item`` (nested tuples, lists, dicts) into shared memory, in the worker's own thread:
    a failure then raises there (and becomes a :class:`WorkerFault`), instead of killing the queue's feeder
    thread, which would leave the main process waiting for the item forever."""
    import dataclasses

    import torch

    if isinstance(item, torch.Tensor):
        item.share_memory_()
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for part in dataclasses.fields(item):
            share_memory(getattr(item, part.name))
    elif isinstance(item, tuple | list):
        for part in item:
            share_memory(part)
    elif isinstance(item, dict):
        for part in item.values():
            share_memory(part)
    return item


def share_tensors_by_name() -> None:
    """Make DataLoader workers hand their tensors over as named shared-memory files (torch's ``file_system``
    strategy), not as file descriptors: receiving a descriptor means talking to the worker, and a worker stopped at
    that moment would block this process beyond any timeout. Call it before a loader with workers starts."""
    import torch.multiprocessing

    torch.multiprocessing.set_sharing_strategy("file_system")


def worker_items(
    dataset: Any,
    *,
    num_workers: int,
    timeout: float | None,
    describe: Callable[[int], str],
    hint: str,
    timeout_key: str | None = "extraction.worker_timeout",
    **loader_kwargs: Any,
) -> Iterator[Any]:
    """The items of ``DataLoader(dataset, num_workers=..., **loader_kwargs)`` in order (a sequential sampler:
    item k is ``dataset[k]`` or its batch k), with bounded waits and one clear error per worker failure.

    ``timeout``: seconds without any item before the worker being waited for counts as hung (None: no limit;
    dead workers are still found within :data:`POLL_SECONDS`). ``describe(k)``: what item k holds, for the
    message (e.g. "batch 3 (a.jpg, b.jpg)"); ``hint``: what the user can do, e.g. "rerun with
    extraction.num_workers=0". Workers are SIGKILLed when the iteration ends early (an error, or the caller
    stopping), so that a hung worker cannot block the exit.
    """
    from torch.utils.data import DataLoader

    if num_workers == 0:
        yield from DataLoader(dataset, num_workers=0, **loader_kwargs)
        return
    poll = POLL_SECONDS if timeout is None else min(POLL_SECONDS, timeout)
    share_tensors_by_name()
    loader = DataLoader(dataset, num_workers=num_workers, timeout=poll, **loader_kwargs)
    iterator = iter(loader)
    _unwatch(iterator)
    finished = False
    k = 0
    try:
        while True:
            waiting_since = time.monotonic()
            while True:
                try:
                    item = next(iterator)
                    break
                except StopIteration:
                    finished = True
                    return
                except Exception as error:
                    waited = time.monotonic() - waiting_since
                    if str(error).startswith("DataLoader timed out") and (timeout is None or waited < timeout):
                        continue
                    raise _failure(error, iterator, k, describe, hint, timeout, timeout_key) from error
            if isinstance(item, WorkerFault):
                raise ResourceError(item.message) from WorkerTraceback(item.traceback)
            yield item
            k += 1
    finally:
        if not finished:
            _stop(iterator)


def _unwatch(iterator: Any) -> None:
    """Take the workers off PyTorch's SIGCHLD watch: it raises its RuntimeError wherever the main process happens
    to be (in the caller's code, while it writes a checkpoint, ...); :func:`worker_items` polls instead."""
    with contextlib.suppress(Exception):
        if getattr(iterator, "_worker_pids_set", False):
            from torch.utils.data import _utils

            _utils.signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False


def _stop(iterator: Any) -> None:
    """SIGKILL the workers (a hung or stopped one ignores everything else) and shut the iterator down."""
    for worker in getattr(iterator, "_workers", []):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        iterator._shutdown_workers()


def _worker_of(iterator: Any, k: int) -> tuple[int, int | None] | None:
    """``(worker id, pid)`` of the worker item ``k`` was sent to, when the iterator still knows it."""
    with contextlib.suppress(Exception):
        worker_id = iterator._task_info[k][0]
        return int(worker_id), iterator._workers[worker_id].pid
    return None


def _failure(
    error: BaseException,
    iterator: Any,
    k: int,
    describe: Callable[[int], str],
    hint: str,
    timeout: float | None,
    timeout_key: str | None,
) -> ResourceError:
    """The user's view of a DataLoader error while item ``k`` was awaited."""
    import re

    text = str(error)
    if text.startswith("DataLoader timed out"):
        worker = _worker_of(iterator, k)
        who = "no DataLoader worker" if worker is None else f"DataLoader worker {worker[0]} (pid {worker[1]})"
        return ResourceError(
            f"{who} delivered nothing for {timeout:g} s while reading {describe(k)}: it hangs (a stalled network "
            f"file system, or a FIFO or device among the images?); check those files, raise "
            f"{timeout_key or 'the worker timeout'} for very slow storage, or {hint}"
        )
    dead = re.search(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly", text)
    if dead:
        parts = []
        for pid in (int(p) for p in dead.group(1).split(",")):
            worker_id = next((i for i, w in enumerate(getattr(iterator, "_workers", [])) if w.pid == pid), None)
            exitcode = iterator._workers[worker_id].exitcode if worker_id is not None else None
            how = (
                f"was killed by {signal.Signals(-exitcode).name}"
                if isinstance(exitcode, int) and exitcode < 0 and -exitcode in signal.valid_signals()
                else f"exited with code {exitcode}"
                if exitcode is not None
                else "exited"
            )
            held = _held_by(iterator, worker_id)
            doing = f" before delivering {', '.join(describe(k) for k in held)}" if held else ""
            parts.append(f"DataLoader worker {worker_id} (pid {pid}) {how}{doing}")
        return ResourceError(
            f"{'; '.join(parts)}: the system may have run out of memory (see `dmesg`) or something killed it; {hint}"
        )
    worker = re.search(r"Caught (\w+) in DataLoader worker process (\d+)", text)
    if worker:
        last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
        return ResourceError(
            f"DataLoader worker {worker.group(2)} failed while reading {describe(k)}: {last}; {hint} "
            "(OXFORD_IR_DEBUG=1 shows the traceback)"
        )
    return ResourceError(f"the DataLoader workers failed while reading {describe(k)}: {_one_line(error)}; {hint}")


def _held_by(iterator: Any, worker_id: int | None) -> list[int]:
    """The items sent to ``worker_id`` and not received: what it was working on when it died."""
    if worker_id is None:
        return []
    with contextlib.suppress(Exception):
        return sorted(idx for idx, info in iterator._task_info.items() if len(info) == 1 and info[0] == worker_id)
    return []
