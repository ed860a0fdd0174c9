"""Logging that is not training logic: retrieval grids and per-query tables (STYLE.md rule 7)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn


def artifact_stem(trainer: pl.Trainer) -> str:
    """File name stem of an evaluation's artifacts: ``epoch003_step000120`` while fitting, else ``validate_...``."""
    if trainer.state.fn == TrainerFn.FITTING:
        return f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}"
    return f"validate_step{trainer.global_step:06d}"


def evaluations(pl_module: pl.LightningModule) -> list[tuple[str | None, Any]]:
    """The module's last full evaluations as ``(benchmark name or None, Evaluation)``: None for the monitored
    (first) benchmark, whose artifacts keep their plain keys and folders; the name of each extra benchmark
    (``data.extra_eval_benchmarks``), whose artifacts go to ``<folder>/<name>/`` and ``val/<name>/...``."""
    found = list(getattr(pl_module, "last_evaluations", None) or [])
    if not found:
        first = getattr(pl_module, "last_evaluation", None)
        found = [first] if first is not None else []
    return [(None if k == 0 else e.benchmark.name, e) for k, e in enumerate(found) if e is not None]
