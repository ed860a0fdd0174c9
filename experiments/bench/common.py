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
import importlib
import multiprocessing
import os
import resource
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


def run_isolated(target: str, settings: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """``module:function(settings)`` in a process of its own; its result with ``peak_memory`` added.

    A :class:`Skipped` raised inside comes back as ``{"skipped": reason}``; any other failure, a crash or
    a timeout raises :class:`MeasurementError` with the child's traceback.
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
    try:
        if not receive.poll(timeout):
            raise MeasurementError(f"{target}: no result after {timeout:.0f} s (raise the profile's child_timeout_s)")
        status, payload = receive.recv()
    except EOFError:
        process.join(10)
        raise MeasurementError(
            f"{target}: the process died without a result (exit status {process.exitcode}; killed for memory?)"
        ) from None
    finally:
        if process.is_alive():
            process.join(30)
        if process.is_alive():
            process.terminate()
            process.join(10)
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
def compose_train(overrides: Sequence[str], output_dir: str | Path) -> Any:
    """``conf/train.yaml`` composed with ``overrides`` through Hydra's compose API (as the tests do)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
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
