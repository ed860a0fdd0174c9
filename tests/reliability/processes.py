"""Real processes for fault injection: run a console script, SIGKILL it at a chosen point, limit its resources.

Every fault test runs the installed command in a subprocess of its own (its own process group, so that its
DataLoader workers die with it) and injects the fault from outside: SIGKILL when a predicate on what it has
written or printed becomes true, a file-size limit (``RLIMIT_FSIZE``; Python ignores SIGXFSZ, so writes past it
fail with EFBIG), or a small tmpfs is not available here without root, so "disk full" is the file-size limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """The installed console script ``name`` (e.g. ``oxford-ir-index``) of this environment."""
    return str(BIN / name)


def environment(**extra: str) -> dict[str, str]:
    """The test environment for a command: W&B off, no colour, plus ``extra``."""
    return {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **extra}


def _child_setup(file_size: int | None) -> Callable[[], None]:
    """What the command's process starts with: SIGINT at its default (a shell starts background jobs with it ignored,
    which a command inherits: its Ctrl-C tests would then test nothing), and the file-size limit, if any."""

    def apply() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return apply


@dataclass
class Outcome:
    """How a command ended: its exit code (negative: the signal), what it printed, and whether we killed it."""

    returncode: int
    stdout: str
    stderr: str
    killed: bool
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def run(
    args: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    kill_when: Callable[[], bool] | None = None,
    kill_on_output: str | None = None,
    each_poll: Callable[[int], object] | None = None,
    timeout: float = 300,
    file_size: int | None = None,
    poll: float = 0.02,
) -> Outcome:
    """Run ``args``; SIGKILL its whole process group as soon as ``kill_when()`` is true or ``kill_on_output``
    appears in what it has printed (stdout or stderr), polled every ``poll`` s. ``each_poll(pid)`` runs at every
    poll (a fault injected into the running command's processes, e.g. stopping one of its workers).

    ``timeout`` bounds the run: a command still running then is killed and the outcome says so with
    ``returncode == -9`` and ``killed == False`` (a hang, which the tests treat as a failure).
    ``file_size`` sets ``RLIMIT_FSIZE`` (bytes) for the command.
    """
    start = time.monotonic()
    out_path, err_path = cwd / f".out-{os.getpid()}-{time.monotonic_ns()}", cwd / f".err-{time.monotonic_ns()}"
    with open(out_path, "w+") as out, open(err_path, "w+") as err:
        process = subprocess.Popen(
            list(args), cwd=cwd, env=env or environment(), stdout=out, stderr=err,
            start_new_session=True, preexec_fn=_child_setup(file_size),
        )  # fmt: skip
        killed = False
        while process.poll() is None:
            if each_poll is not None:
                each_poll(process.pid)
            due = kill_when is not None and kill_when()
            if kill_on_output is not None and not due:
                out.flush()
                due = any(kill_on_output in p.read_text(errors="replace") for p in (out_path, err_path))
            if due:
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                break
            if time.monotonic() - start > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(poll)
        process.wait()
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a killed command die with its group
            os.killpg(process.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        outcome = Outcome(process.returncode, out.read(), err.read(), killed, time.monotonic() - start)
    out_path.unlink()
    err_path.unlink()
    return outcome


def exists(path: Path) -> Callable[[], bool]:
    """A ``kill_when`` predicate: ``path`` exists (a folder or file the command creates at the point to kill)."""
    return path.exists


def children(pid: int | None = None) -> list[int]:
    """The running (not zombie) child processes of ``pid`` (default: this one), e.g. its DataLoader workers."""
    found = []
    for task in Path(f"/proc/{pid or os.getpid()}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [c for c in found if _running(c)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def lock_held_elsewhere(path: Path, seconds: float = 600):
    """Another process holds the lock on ``path`` with :func:`oxford_ir.fs.exclusive_lock` (its pid written in the
    file) for ``seconds``, then exits 0; yields that process (``.pid``, ``.wait()``), killed after the block. A POSIX
    lock: this process could take its own."""
    code = (
        "import sys, time; from pathlib import Path; from oxford_ir.fs import exclusive_lock\n"
        "with exclusive_lock(Path(sys.argv[1]), wait=False):\n"
        "    print('held', flush=True); time.sleep(float(sys.argv[2]))"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
