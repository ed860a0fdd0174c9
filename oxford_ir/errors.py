"""Errors a user can fix.

Every exception raised at a boundary (files, ground truth, config values,
checkpoints, downloads) derives from :class:`OxfordIRError`; its message names
the file or key at fault and what to do. Command-line entry points print such
errors as one line instead of a traceback.
"""

from __future__ import annotations

import re


class OxfordIRError(Exception):
    """Base class: a problem with the user's input, with a message that says how to fix it."""


class DataError(OxfordIRError):
    """A dataset folder, image or image list is missing or unreadable."""


class GroundTruthError(DataError):
    """A ground-truth file is missing, malformed or inconsistent with the image list."""


class UnsafePickleError(GroundTruthError):
    """A pickle asked to build something other than plain data; it was refused, not executed."""


class DownloadError(OxfordIRError):
    """A download, checksum or archive extraction failed."""


class ConfigError(OxfordIRError):
    """A configuration value is invalid."""


class UntrustedConfigError(ConfigError):
    """A config read back from a file names something to build that only code may name; it was refused, not built."""


class CheckpointError(OxfordIRError):
    """A checkpoint is corrupt or belongs to another model."""


class IndexFormatError(OxfordIRError):
    """An image index folder is missing, corrupt, busy, or was built with another model or settings."""


class ResourceError(OxfordIRError):
    """The disk is full, a file-size or quota limit was hit, or a worker process died or stopped answering."""


#: environment variables that ask for the full traceback of a user error (Hydra's own, and ours for every command)
DEBUG_VARIABLES = ("OXFORD_IR_DEBUG", "HYDRA_FULL_ERROR")

#: errno values of a write that failed for want of room: the fix is the same for all of them
NO_ROOM = {"ENOSPC": "no space left on the device", "EFBIG": "the file-size limit was reached",
           "EDQUOT": "the disk quota is exhausted"}  # fmt: skip


def exit_on_user_error(func):
    """Wrap a command-line entry point: print a user error as one line and exit 2, no traceback.

    User errors are :class:`OxfordIRError` (anywhere in the chain of causes, as libraries wrap them) and writes that
    failed for want of room (ENOSPC, EFBIG, EDQUOT). ``OXFORD_IR_DEBUG=1`` or ``HYDRA_FULL_ERROR=1`` re-raises
    them with their traceback.
    """
    import functools
    import os
    import sys

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            cause = user_error_in(error)
            if cause is None or any(os.environ.get(v, "") not in ("", "0") for v in DEBUG_VARIABLES):
                raise
            print(f"error: {cause}", file=sys.stderr)
            if isinstance(cause, ResourceError):
                _kill_child_processes()
            raise SystemExit(2) from None

    return wrapper


def _kill_child_processes() -> None:
    """SIGKILL this process's worker processes: after a worker failure some may be stopped or hung, and the
    interpreter's exit would wait for them forever (a stopped process does not act on SIGTERM)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


def no_room_error(error: BaseException) -> ResourceError | None:
    """A :class:`ResourceError` naming the file and the fix when ``error`` is a write that ran out of room."""
    import errno

    if not isinstance(error, OSError) or error.errno is None:
        return None
    reason = NO_ROOM.get(errno.errorcode.get(error.errno, ""))
    if reason is None:
        return None
    where = f" writing {error.filename}" if error.filename else ""
    return ResourceError(
        f"{reason}{where}: free space (or raise the limit) and run the same command again; "
        "complete results written before are kept and nothing half-written is used"
    )


def user_error_in(error: BaseException) -> OxfordIRError | None:
    """The :class:`OxfordIRError` behind ``error``, also when a library wrapped it (Hydra's instantiate does); a
    write that ran out of room (:func:`no_room_error`) and a DataLoader worker that died or stopped answering
    (:func:`worker_error`) count as one."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OxfordIRError):
            return error
        resource = no_room_error(error) or worker_error(error)
        if resource is not None:
            return resource
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


#: what torch's DataLoader says when a worker process died or stopped delivering batches, and what to do
WORKER_FAILURES = (
    (
        re.compile(
            r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\)? (?:is killed by signal: ([\w ]+)|exited unexpectedly)"
        ),
        "a data-loading worker process (pid {0}) died{1}: it was killed (out of memory? see `dmesg`) or crashed; "
        "run the same command again, with fewer workers (num_workers=0 shows the worker's own error)",
    ),
    (
        re.compile(r"DataLoader timed out after ([\d.]+) seconds"),
        "no batch came from the data-loading workers for {0} s: a worker hangs (an unreadable file, a network "
        "mount?) or could not hand its batch over (shared memory /dev/shm full or a file-size limit); run the same "
        "command with num_workers=0 to see the worker's own error, or raise the timeout "
        "(data.worker_timeout, extraction.worker_timeout)",
    ),
)


def worker_error(error: BaseException) -> ResourceError | None:
    """A :class:`ResourceError` with the fix when ``error`` is torch's report of a dead or silent DataLoader worker."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    for pattern, message in WORKER_FAILURES:
        found = pattern.search(text)
        if found:
            if pattern.groups == 1:  # the timeout, in seconds: 3.0 reads 3
                return ResourceError(message.format(f"{float(found.group(1)):g}"))
            pid, signal = found.groups()
            return ResourceError(message.format(pid.strip() if pid else "?", f" ({signal})" if signal else ""))
    return None
