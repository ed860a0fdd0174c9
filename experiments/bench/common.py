"""What every measurement shares: its own process (so peak memory is its own), config composition, device
timing and the precision / memory-format settings that the pipeline and its references must agree on.

A measurement is a function ``measure(settings: dict) -> dict`` in one of the sibling modules, named
``"module:function"`` and run by :func:`run_isolated` in a fresh process forked from a forkserver that has
already imported torch, Lightning and Hydra (a process start costs milliseconds instead of seconds of
imports, and the forkserver never touches CUDA, so every child can). The child adds its peak memory:
``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set size (``ru_maxrss``) of its own process on
the CPU, and the largest peak of its finished child processes (DataLoader workers) beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import multiprocessing
import os
import resource
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "conf"
#: imported once by the forkserver, so that each measurement process starts with them loaded
PRELOAD = [
    "numpy",
    "torch",
    "torchvision",
    "lightning.pytorch",
    "hydra",
    "omegaconf",
    "pytorch_metric_learning",
    "oxford_ir.models.module",
    "oxford_ir.data.datamodule",
    "oxford_ir.extraction.embedding",
    "oxford_ir.retrieval.search",
    "experiments.bench.training",
    "experiments.bench.extraction",
    "experiments.bench.evaluation",
    "experiments.bench.search",
]
#: Lightning precision strings -> the autocast dtype (None: no autocast)
AUTOCAST_DTYPES = {
    "32-true": None,
    "32": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


class MeasurementError(RuntimeError):
    """A measurement process failed; the message holds its traceback or exit status."""


class MeasurementTimeout(MeasurementError):
    """A measurement process gave no result within its time (it is stopped)."""


class Skipped(Exception):  # noqa: N818 - a reason, not a failure
    """Raised by a measurement that cannot run here (no faiss, no CUDA): the row says why instead of a number."""


# -- processes -----------------------------------------------------------------------------------------------
_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def start_forkserver() -> threading.Thread:
    """Start the forkserver (which imports :data:`PRELOAD`, seconds) in a background thread, so that the
    imports overlap other work (writing the JPEGs); the first measurement then starts at once."""
    _context()  # set up in this thread: the forkserver's preload list
    import multiprocessing.popen_forkserver  # noqa: F401 - imported here, not under the thread during a fork

    def start() -> None:
        with contextlib.suppress(MeasurementError):  # the first measurement reports the same failure
            run_isolated(f"{__name__}:noop", {}, 600.0)

    thread = threading.Thread(target=start, name="forkserver start", daemon=True)
    thread.start()
    return thread


def noop(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A measurement that measures nothing (starts the forkserver)."""
    return {}


def run_isolated(target: str, settings: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """``module:function(settings)`` in a process of its own; its result with ``peak_memory`` added.

    A :class:`Skipped` raised inside comes back as ``{"skipped": reason}``; a process without a result after
    ``timeout`` seconds is stopped and raises :class:`MeasurementTimeout`; any other failure or a crash raises
    :class:`MeasurementError` with the child's traceback.
    """
    context = _context()
    receive, send = context.Pipe(duplex=False)
    # the child would otherwise start its DataLoader workers through a forkserver too (the context's method
    # becomes the child's default), each worker importing torch afresh; give it this process's method
    start_method = multiprocessing.get_start_method()
    process = context.Process(
        target=_child_main, args=(send, target, dict(settings), start_method), name=f"bench:{target}"
    )
    process.start()
    send.close()
    timed_out = False
    try:
        if not receive.poll(max(timeout, 0.0)):
            timed_out = True
            raise MeasurementTimeout(f"{target}: no result after {timeout:.0f} s; stopped")
        status, payload = receive.recv()
    except EOFError:
        process.join(10)
        raise MeasurementError(
            f"{target}: the process died without a result (exit status {process.exitcode}; killed for memory?)"
        ) from None
    finally:
        if process.is_alive() and not timed_out:
            process.join(30)  # it has sent its result: let it exit (DataLoader workers, CUDA context)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        receive.close()
    if status == "error":
        raise MeasurementError(f"{target} failed:\n{payload}")
    if status == "skipped":
        return {"skipped": payload}
    return payload


def _child_main(connection: Any, target: str, settings: dict[str, Any], start_method: str) -> None:
    multiprocessing.set_start_method(start_method, force=True)
    try:
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        device = torch.device(settings.get("device", "cpu"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = dict(function(settings))
        result["peak_memory"] = peak_memory(device)
        connection.send(("ok", result))
    except Skipped as reason:
        connection.send(("skipped", str(reason)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which reports it
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process: CUDA allocator peak on a GPU, else resident set size (MiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    memory = {"rss_mib": own, "workers_rss_mib": workers}
    if device.type == "cuda":
        memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        memory["kind"] = "cuda_max_allocated"
        memory["mib"] = memory["cuda_max_allocated_mib"]
    else:
        memory["kind"] = "rss"
        memory["mib"] = own
    return memory


# -- configs -------------------------------------------------------------------------------------------------
#: environment variable naming a folder where :func:`compose_train` keeps each composed config of a run, so
#: that the run's many measurement processes compose each set of overrides once (Hydra takes about 0.5 s)
CONFIG_CACHE_ENV = "OXFORD_IR_BENCH_CONFIGS"


def compose_train(overrides: Sequence[str], output_dir: str | Path) -> Any:
    """``conf/train.yaml`` composed with ``overrides`` through Hydra's compose API (as the tests do); read back
    from the run's config folder (:data:`CONFIG_CACHE_ENV`) when a process of the run composed it already."""
    from omegaconf import OmegaConf, open_dict

    folder = os.environ.get(CONFIG_CACHE_ENV)
    cached = None
    if folder:
        key = hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:24]
        cached = Path(folder) / f"{key}.yaml"
    if cached is not None and cached.is_file():
        cfg = OmegaConf.create(cached.read_text())
        OmegaConf.set_struct(cfg, True)  # as Hydra's
    else:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = cached.with_name(f".{cached.name}.{os.getpid()}")
            temporary.write_text(OmegaConf.to_yaml(cfg))
            os.replace(temporary, cached)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def instantiate_module(cfg: Any) -> Any:
    """The RetrievalModule of ``cfg.model`` (it builds its parts itself)."""
    import hydra

    return hydra.utils.instantiate(cfg.model, _recursive_=False)


# -- devices and timing --------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of Lightning's ``precision`` on ``device`` (a no-op for full precision)."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r}: the benchmark knows {sorted(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def set_threads(settings: Mapping[str, Any]) -> None:
    """Intra-op threads of the measurement process (default: torch's, i.e. the cores available)."""
    threads = settings.get("threads")
    if threads:
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (GPU available, model summary) add nothing to a benchmark table."""
    import logging

    names = ["lightning.pytorch", "lightning.fabric", "lightning"]
    levels = {n: logging.getLogger(n).level for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
