"""Logging that is not training logic: retrieval grids and per-query tables (STYLE.md rule 7)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn


def artifact_stem(trainer: pl.Trainer) -> str:
    """File name stem of an evaluation's artifacts: ``epoch003_step000120`` while fitting, else ``validate_...``."""
    if trainer.state.fn == TrainerFn.FITTING:
        return f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}"
    return f"validate_step{trainer.global_step:06d}"
