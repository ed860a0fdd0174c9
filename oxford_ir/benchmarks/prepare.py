"""Make sure a benchmark's dataset is under the data folder before it is loaded: the one preparation of evaluation
(``oxford-ir-eval``) and training (``RetrievalDataModule.prepare_data``).

The synthetic benchmark is written when absent (or when its parameters changed), from a named preset
(:data:`~oxford_ir.benchmarks.synthetic.SYNTHETIC_PRESETS`) and the parameters given on top of it; a real dataset
is downloaded when asked to and not complete; otherwise a dataset folder without ground truth is an error that
names the fix. Call it from one process (rank 0), then load the benchmark everywhere
(:func:`~oxford_ir.benchmarks.registry.load_benchmark`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oxford_ir.benchmarks.download import STATE_FILE, download_dataset
from oxford_ir.benchmarks.gldv2 import is_gldv2_name
from oxford_ir.benchmarks.gldv2_download import download_gldv2, parse_parts
from oxford_ir.benchmarks.registry import (
    benchmark_spec,
    collection_location,
    dataset_dir,
    find_ground_truth,
    is_collection,
)
from oxford_ir.benchmarks.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark
from oxford_ir.errors import ConfigError

#: the preset of the synthetic benchmark when none is named (the quickstart's)
DEFAULT_PRESET = "default"


def prepare_benchmark(
    name: str,
    data_dir: str | Path,
    *,
    download: bool = False,
    synthetic: Mapping[str, Any] | None = None,
    key: str = "synthetic",
    download_parts: str | None = None,
) -> Path:
    """Make sure benchmark ``name`` is under ``data_dir``; returns its dataset folder.

    The synthetic benchmark and downloads go into ``data_dir`` itself when it is named after the dataset
    (``.../synthetic``), else into ``data_dir/<folder>``. Synthetic benchmarks (``synthetic``, ``rsynthetic``):
    written with :func:`~oxford_ir.benchmarks.synthetic.write_synthetic_benchmark` from ``synthetic``: an optional
    ``preset`` (default ``"default"``) whose parameters the other keys override; a folder already holding the same
    benchmark is kept as is. Real benchmarks: downloaded when ``download`` and the folder is not complete; without
    ``download``, a missing folder or ground truth raises :class:`~oxford_ir.errors.DataError` /
    :class:`~oxford_ir.errors.GroundTruthError` naming how to get it (an unfinished download is left to the loader,
    which names how to resume it). A ``collection:<path>`` is left as it is (its path is returned). ``key`` names the
    ``synthetic`` settings in errors (``data.synthetic``). ``download_parts``: the GLDv2 TARs a download of
    ``gldv2[:options]`` fetches (``"0-19,25"``; None or ``"all"``: the 500), as ``oxford-ir-data download gldv2``.
    """
    if is_collection(name):  # a collection is read where it lies: nothing to write (SfM-120k may be downloaded)
        if download and name == "sfm120k":
            return download_dataset("sfm120k", Path(data_dir).expanduser())  # returns at once when complete
        if download and is_gldv2_name(name):  # resumable: the parts already there are skipped
            return download_gldv2(Path(data_dir).expanduser(), parse_parts(download_parts or "all"))
        return collection_location(name)
    spec = benchmark_spec(name)
    root = Path(data_dir).expanduser()
    if spec.folder == "synthetic":
        target = root if root.name == spec.folder else root / spec.folder  # where downloads go too
        return write_synthetic_benchmark(target, **synthetic_parameters(synthetic, key))
    if download:
        return download_dataset(spec.folder, root)  # returns at once when complete
    folder = dataset_dir(name, root)
    if not (folder / STATE_FILE).exists():
        find_ground_truth(name, folder)
    return folder


def synthetic_parameters(settings: Mapping[str, Any] | None, key: str = "synthetic") -> dict[str, Any]:
    """The arguments of ``write_synthetic_benchmark`` for ``settings``: its ``preset``'s parameters, overridden by
    the other keys; an unknown preset or key raises :class:`~oxford_ir.errors.ConfigError` naming ``key``."""
    values = dict(settings or {})
    preset = values.pop("preset", DEFAULT_PRESET)
    if not isinstance(preset, str) or preset not in SYNTHETIC_PRESETS:
        raise ConfigError(f"{key}.preset={preset!r}: choose one of {sorted(SYNTHETIC_PRESETS)}")
    known = [p for p in inspect.signature(write_synthetic_benchmark).parameters if p != "root"]
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(
            f"unknown {key} parameter(s) {unknown}: the synthetic benchmark takes preset, {', '.join(known)}"
        )
    return {**SYNTHETIC_PRESETS[preset], **values}
