"""Log a grid of fixed queries and their top-k results after each full evaluation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from oxford_ir.callbacks import artifact_stem, evaluations
from oxford_ir.fs import replace_file
from oxford_ir.retrieval.visualize import fixed_query_indices, render_retrieval_grid

if TYPE_CHECKING:
    from oxford_ir.models.validation import Evaluation


class RetrievalGridCallback(pl.Callback):
    """Query + top-k results, framed green / red / grey for positive / negative / junk.

    Written as a PNG under ``<run>/retrieval_grids/`` with any logger, and as a W&B image
    (key ``val/retrieval_grid``) when W&B is on; an extra evaluated benchmark's under ``<name>/``
    (``val/<name>/retrieval_grid``). Skips the sanity check and evaluations that
    did not cover the whole benchmark.
    """

    def __init__(self, num_queries: int = 4, top_k: int = 8, thumbnail_size: int = 128) -> None:
        self.num_queries = num_queries
        self.top_k = top_k
        self.thumbnail_size = thumbnail_size

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for name, evaluation in evaluations(pl_module):
            self._log_grid(trainer, evaluation, name)

    def _log_grid(self, trainer: pl.Trainer, evaluation: Evaluation, name: str | None) -> None:
        """The grid of one benchmark: ``retrieval_grids/`` and ``val/retrieval_grid`` for the monitored one,
        ``retrieval_grids/<name>/`` and ``val/<name>/retrieval_grid`` for an extra one."""
        benchmark = evaluation.benchmark
        queries = fixed_query_indices(benchmark.n_queries, self.num_queries)
        grid = render_retrieval_grid(benchmark, evaluation.ranks, queries, self.top_k, self.thumbnail_size)
        folder = Path(trainer.default_root_dir) / "retrieval_grids"
        folder = folder / name if name else folder
        folder.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        grid.save(png, format="PNG")
        replace_file(folder / f"{artifact_stem(trainer)}.png", png.getvalue())
        captions = ", ".join(benchmark.qimlist[q] for q in queries)
        key = f"val/{name}/retrieval_grid" if name else "val/retrieval_grid"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[grid], caption=[captions], step=trainer.global_step)
