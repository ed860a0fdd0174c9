"""The train/test overlap guard on request in ``oxford-ir-eval`` (``overlap.train=<the data a model trained on>``).

Training runs the guard before the first batch (``data.exclude_overlap``: :mod:`oxford_ir.data.overlap_exclusion`);
an evaluation of a model trained elsewhere (a published checkpoint trained on GLDv2, say) can only report it: the
training images of ``overlap.train`` (a collection's ``train`` rows, or a benchmark's database) are compared with
every image the evaluated benchmarks hold, by content hash and by near-copy similarity
(:func:`oxford_ir.extraction.overlap.find_overlap`), and the counts per evaluated landmark go beside the table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.registry import is_collection, load_benchmark, read_collection
from oxford_ir.data.overlap_exclusion import OverlapSettings, overlap_metrics
from oxford_ir.errors import ConfigError
from oxford_ir.extraction.overlap import find_overlap

log = logging.getLogger(__name__)


def training_images(name: str, data_dir: Path) -> list[Path]:
    """The images a model trained on ``name`` saw: a collection's ``train`` rows (all its rows when it has no
    split), or a benchmark's whole database."""
    if is_collection(name):
        collection = read_collection(name, data_dir)
        rows = collection.rows("train")
        return collection.image_paths(rows if len(rows) else None)
    return load_benchmark(name, data_dir, allow_missing_images=True).db_paths


def check_overlap(
    node: Mapping[str, Any] | None, benchmarks: Sequence[Benchmark], data_dir: Path
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """``(flat overlap/... metrics, the report as JSON)`` for ``overlap`` (``cfg.overlap``: ``train`` and the guard's
    settings); ``({}, None)`` when ``overlap.train`` is unset."""
    values = dict(node or {})
    train = values.pop("train", None)
    if not train:
        return {}, None
    if not isinstance(train, str):
        raise ConfigError(
            f"overlap.train={train!r}: the name of the training data, e.g. gldv2:min4 or collection:<path>"
        )
    settings = OverlapSettings.from_config(values)
    paths = training_images(train, data_dir)
    report = find_overlap(paths, benchmarks, settings)
    summary = {**report.summary(), "train": train}
    per_landmark = ", ".join(f"{k}: {v['exact']} exact + {v['near']} near" for k, v in summary["per_landmark"].items())
    log.warning(
        "overlap: %d of %d training images of %s are copies of evaluated images (%s)",
        summary["overlapping"],
        len(paths),
        train,
        per_landmark or "none",
    )
    return overlap_metrics(summary, settings.threshold), summary
