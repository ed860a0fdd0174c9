"""The benchmark's output: one table for people, one JSON file with every raw number, and the machine.

A row compares ``ours`` with two references measured in the same run, ``ceiling`` (the same computation
on data already on the device) and ``original`` (the original project's method). Each ratio is exactly the
quotient of the raw numbers stored beside it (``ours / ceiling``, ``ours / original``), so the JSON can be
checked and recomputed; a missing reference leaves its ratio null.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
VARIANTS = ("ours", "ceiling", "original")
COLUMNS = (
    "measurement",
    "unit",
    "ours",
    "ceiling",
    "original",
    "ours/ceiling",
    "ours/original",
    "peak MiB o/c/x",
    "mem o/c",
    "mem o/x",
)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def make_row(
    key: str,
    label: str,
    unit: str,
    results: Mapping[str, Mapping[str, Any] | None],
    *,
    metric: str = "value",
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """A table row from the measurements (``results[variant]`` as returned by ``run_isolated``, None = not
    measured); ``metric`` is the key of each result holding the number compared."""
    values: dict[str, float | None] = {}
    memory: dict[str, float | None] = {}
    status: dict[str, str] = {}
    for variant in VARIANTS:
        result = results.get(variant)
        if result is None:
            values[variant], memory[variant] = None, None
            continue
        failed = next((k for k in ("skipped", "over_budget", "error") if k in result), None)
        if failed is not None:
            values[variant], memory[variant] = None, None
            status[variant] = f"{failed.replace('_', ' ')}: {result[failed]}"
            continue
        values[variant] = float(result[metric])
        memory[variant] = float(result["peak_memory"]["mib"]) if "peak_memory" in result else None
    kinds = {r["peak_memory"]["kind"] for r in results.values() if r and "peak_memory" in r}
    return {
        "key": key,
        "label": label,
        "unit": unit,
        **values,
        "ours_over_ceiling": ratio(values["ours"], values["ceiling"]),
        "ours_over_original": ratio(values["ours"], values["original"]),
        "peak_memory_mib": memory,
        "memory_ours_over_ceiling": ratio(memory["ours"], memory["ceiling"]),
        "memory_ours_over_original": ratio(memory["ours"], memory["original"]),
        "memory_kind": kinds.pop() if len(kinds) == 1 else sorted(kinds) or None,
        "status": status,
        "notes": list(notes),
        "measurements": {v: dict(r) for v, r in results.items() if r is not None},
    }


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_gib": _memory_gib(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    for package in ("torchvision", "lightning", "faiss", "PIL"):
        try:
            module = __import__(package)
            info[package if package != "PIL" else "pillow"] = getattr(module, "__version__", "?")
        except ImportError:
            info[package if package != "PIL" else "pillow"] = None
    return info


def gpu_info(device: torch.device) -> dict[str, Any] | None:
    """Name and memory of the GPU (only called when the profile runs on one: it initialises CUDA)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- the table -----------------------------------------------------------------------------------------------
def format_number(value: float | None) -> str:
    """Three significant digits, thousands separated; '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 10 else f"{value:,.0f}x")


def _memory_cell(row: Mapping[str, Any]) -> str:
    memory = row["peak_memory_mib"]
    cells = ["-" if memory.get(v) is None else f"{memory[v]:,.0f}" for v in VARIANTS]
    while len(cells) > 1 and cells[-1] == "-":
        cells.pop()
    return " / ".join(cells)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table, followed by each row's notes and skipped references."""
    lines = [list(COLUMNS)]
    for row in rows:
        lines.append(
            [
                row["label"],
                row["unit"],
                format_number(row["ours"]),
                format_number(row["ceiling"]),
                format_number(row["original"]),
                format_ratio(row["ours_over_ceiling"]),
                format_ratio(row["ours_over_original"]),
                _memory_cell(row),
                format_ratio(row.get("memory_ours_over_ceiling")),
                format_ratio(row.get("memory_ours_over_original")),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(line[2:], widths[2:], strict=True)]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = []
    for row in rows:
        for variant, message in row.get("status", {}).items():
            notes.append(f"- {row['label']}, {variant}: {message.splitlines()[0]}")
        for note in row.get("notes", ()):
            notes.append(f"- {row['label']}: {note}")
    if notes:
        out += ["", *notes]
    return "\n".join(out)


def format_timing(timing: Mapping[str, Any]) -> str:
    """Seconds of each group of rows against its share, the setup's and the total, as one line of text."""
    parts = [f"setup (JPEGs, processes) {timing['setup_seconds']:.0f} s"]
    for group, spent in timing["groups"].items():
        over = " OVER" if spent["seconds"] > spent["share"] else ""
        parts.append(f"{group} {spent['seconds']:.0f} s (share {spent['share']:.0f}{over})")
    bound = timing.get("total_budget")
    total = f"total {timing['total_seconds']:.0f} s" + (f" of {bound:.0f}" if bound is not None else "")
    return "time: " + ", ".join(parts) + "; " + total


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON, written atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to the benchmark JSON")
