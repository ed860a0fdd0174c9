"""Log the per-query AP of every protocol as a table after each full evaluation."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import WandbLogger

from oxford_ir.callbacks import artifact_stem, evaluations
from oxford_ir.fs import replace_file

if TYPE_CHECKING:
    from oxford_ir.models.validation import Evaluation


def per_query_rows(evaluation: Evaluation) -> tuple[list[str], list[list]]:
    """Columns and rows: query name, landmark, number of positives, then AP per protocol."""
    benchmark = evaluation.benchmark
    per_query = evaluation.per_query
    keys = sorted(per_query)
    landmarks = benchmark.query_landmarks or [""] * benchmark.n_queries
    columns = ["query", "landmark", "positives", *keys]
    rows = []
    for q, name in enumerate(benchmark.qimlist):
        values = [None if np.isnan(per_query[k][q]) else round(float(per_query[k][q]), 6) for k in keys]
        rows.append([name, landmarks[q], int(benchmark.positives(q).size), *values])
    return columns, rows


class PerQueryTableCallback(pl.Callback):
    """Per-query AP as a W&B table (``val/per_query_ap``) and a CSV under ``<run>/per_query_ap/``."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for name, evaluation in evaluations(pl_module):
            columns, rows = per_query_rows(evaluation)
            folder = Path(trainer.default_root_dir) / "per_query_ap"
            folder = folder / name if name else folder  # an extra evaluated benchmark's: in its own folder
            folder.mkdir(parents=True, exist_ok=True)
            text = io.StringIO(newline="")
            writer = csv.writer(text)
            writer.writerow(columns)
            writer.writerows(rows)
            replace_file(folder / f"{artifact_stem(trainer)}.csv", text.getvalue().encode())
            key = f"val/{name}/per_query_ap" if name else "val/per_query_ap"
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)
