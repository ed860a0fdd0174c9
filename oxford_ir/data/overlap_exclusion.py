"""``data.exclude_overlap``: leave out of training the images that are (nearly) evaluated images.

The guard itself, which embeds images, lives above this layer (:mod:`oxford_ir.extraction.overlap`). The data module
holds an :class:`OverlapGuard` (the mode and settings, checked when it is built) whose ``finder`` a higher layer
attaches (``oxford-ir-train`` attaches :func:`~oxford_ir.extraction.overlap.find_overlap`), and applies it to the
training split once it is built and its missing images dropped, before the sampler is made; the guard keeps the
summary of what it found (``metrics.json`` and ``overlap.json`` of the run). Modes:

- ``false``: the guard does not run;
- ``report``: it runs and its findings are recorded (``metrics.json``, ``overlap.json``), nothing is dropped;
- ``true``: the overlapping training images are dropped;
- ``landmarks``: every training class holding an overlapping image is dropped whole (a landmark that shares one
  photo with the evaluation likely shares the building: Song et al., CVPR 2024). A distractor is its own class.

The ``seed`` and ``landmarks`` splits train on the evaluated database itself (that is what they are), so the guard
would drop every training image: it is refused there; use it with ``cross`` or a collection's training split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from oxford_ir.benchmarks.splits import TrainSplit
from oxford_ir.errors import ConfigError

log = logging.getLogger(__name__)

#: ``data.exclude_overlap`` values
EXCLUDE_OVERLAP = (False, "report", True, "landmarks")
#: split kinds that train on the evaluated database by design
_SAME_DATABASE = ("seed", "landmarks")
_SHOWN = 5


@dataclass(frozen=True)
class OverlapSettings:
    """``data.overlap``: how the guard looks for near copies (:mod:`oxford_ir.extraction.overlap`).

    ``threshold``: cosine similarity from which two images are near copies; ``image_size``: long side the images
    are embedded at; ``grid``: cells per side of the thumbnail embedding; ``batch_size`` / ``num_workers``: of the
    extraction; ``block_bytes``: memory of one block of the similarity matrix; ``max_pairs``: pairs kept in the
    report's JSON (all are counted); ``near``: false looks for exact copies only (no image is decoded).
    """

    threshold: float = 0.95
    image_size: int = 64
    grid: int = 16
    batch_size: int = 64
    num_workers: int = 0
    block_bytes: int = 64 << 20
    max_pairs: int = 1000
    near: bool = True

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None) -> OverlapSettings:
        """Checked settings; a :class:`ConfigError` naming the ``data.overlap`` key otherwise."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"data.overlap.{unknown[0]} is not a setting of the overlap guard; "
                f"the settings are {', '.join(cls.__dataclass_fields__)}"
            )
        settings = cls(**values)
        threshold = settings.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ConfigError(f"data.overlap.threshold={threshold!r}: a cosine similarity in (0, 1]")
        for name in ("image_size", "grid", "batch_size", "block_bytes", "max_pairs", "num_workers"):
            value = getattr(settings, name)
            low = 0 if name == "num_workers" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.overlap.{name}={value!r}: an integer of at least {low}")
        if not isinstance(settings.near, bool):
            raise ConfigError(f"data.overlap.near={settings.near!r}: true or false")
        if settings.grid > settings.image_size:
            raise ConfigError(
                f"data.overlap.grid={settings.grid} is finer than image_size={settings.image_size} pixels; "
                "lower grid or raise image_size"
            )
        return settings


def check_exclude_overlap(mode: Any) -> bool | str:
    """``mode`` if it is a ``data.exclude_overlap`` value; a :class:`ConfigError` naming the values otherwise."""
    if not any(mode is value or (isinstance(value, str) and mode == value) for value in EXCLUDE_OVERLAP):
        raise ConfigError(f"data.exclude_overlap={mode!r}: choose false, report, true or landmarks")
    return mode


#: ``finder(training paths, evaluated benchmarks, settings)`` -> a report with ``overlapping`` (a boolean mask over
#: the training images) and ``summary()`` (JSON): :func:`oxford_ir.extraction.overlap.find_overlap`
OverlapFinder = Callable[[Sequence[Any], Sequence[Any], OverlapSettings], Any]


def exclude_overlap(
    split: TrainSplit,
    mode: bool | str,
    finder: OverlapFinder | None,
    settings: Mapping[str, Any] | None,
    extra: Sequence[Any] = (),
) -> tuple[TrainSplit, dict[str, Any] | None]:
    """``(split without its overlap, the guard's summary)`` for ``data.exclude_overlap=mode`` (module docstring):
    overlap with the split's evaluated benchmark and with the ``extra`` benchmarks evaluated beside it
    (``data.extra_eval_benchmarks``); ``(split, None)`` when ``mode`` is false."""
    if check_exclude_overlap(mode) is False:
        return split, None
    if split.kind in _SAME_DATABASE:
        raise ConfigError(
            f"data.exclude_overlap={mode}: the {split.kind} split trains on {split.eval_benchmark.name}'s own "
            "database, so every training image is an evaluated one; use it with split=cross (or a collection's "
            "training split), or set data.exclude_overlap=false"
        )
    if finder is None:
        raise ConfigError(
            f"data.exclude_overlap={mode} needs the overlap guard: set the data module's overlap_finder to "
            "oxford_ir.extraction.overlap.find_overlap (oxford-ir-train does), or data.exclude_overlap=false"
        )
    evaluated = [split.eval_benchmark, *extra]
    report = finder(split.paths, evaluated, OverlapSettings.from_config(settings))
    overlapping = np.asarray(report.overlapping, dtype=bool)
    if mode == "landmarks":
        drop = np.isin(split.labels, np.unique(split.labels[overlapping]))
    elif mode is True:
        drop = overlapping
    else:
        drop = np.zeros(len(split), dtype=bool)
    summary = {**report.summary(), "exclude_overlap": mode, "dropped": int(drop.sum())}
    per_landmark = ", ".join(f"{k}: {v['exact']} exact + {v['near']} near" for k, v in summary["per_landmark"].items())
    log.warning(
        "overlap guard: %d of %d training images are copies of evaluated images of %s (%s)%s",
        int(overlapping.sum()),
        len(split),
        " and ".join(benchmark.name for benchmark in evaluated),
        per_landmark or "none",
        f"; {int(drop.sum())} left out of training (data.exclude_overlap={mode})" if drop.any() else "",
    )
    if drop.any():
        note = f"{int(drop.sum())} training images overlapping the evaluated images left out ({mode})"
        split = split.without(drop, "overlap", note)
    return split, summary


class OverlapGuard:
    """``data.exclude_overlap`` and ``data.overlap`` of a data module, checked when built; ``finder`` is attached by
    a layer that can embed images; ``summary`` is what :meth:`apply` found (None until then, or when off)."""

    def __init__(self, mode: bool | str = False, settings: Mapping[str, Any] | None = None) -> None:
        self.mode = check_exclude_overlap(mode)
        self.settings = OverlapSettings.from_config(settings)
        self.finder: OverlapFinder | None = None
        self.summary: dict[str, Any] | None = None

    def apply(self, split: TrainSplit, extra: Sequence[Any] = ()) -> TrainSplit:
        """:func:`exclude_overlap` of ``split`` against its evaluated benchmark and ``extra`` ones (the split itself
        when the guard is off)."""
        split, self.summary = exclude_overlap(split, self.mode, self.finder, asdict(self.settings), extra)
        return split

    def metrics(self) -> dict[str, float]:
        """What was found as flat numbers for ``metrics.json`` (:func:`overlap_metrics`); empty when off."""
        return {} if self.summary is None else overlap_metrics(self.summary, self.settings.threshold)


def overlap_metrics(summary: Mapping[str, Any], threshold: float) -> dict[str, float]:
    """A guard's summary as flat numbers: ``overlap/exact``, ``overlap/near``, ``overlap/dropped`` (when it dropped
    any), ``overlap/threshold`` and ``overlap/<landmark>/exact|near``."""
    found = {f"overlap/{k}": float(summary[k]) for k in ("exact", "near", "dropped") if k in summary}
    found["overlap/threshold"] = float(threshold)
    for landmark, counts in summary["per_landmark"].items():
        found.update({f"overlap/{landmark}/{kind}": float(n) for kind, n in counts.items()})
    return found
