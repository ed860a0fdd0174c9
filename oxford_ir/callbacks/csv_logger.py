"""A CSV logger that a resumed run continues instead of erasing.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it finds one, so ``oxford-ir-train resume=<run>`` with
``logger=csv`` lost every epoch logged before the interruption. :class:`RunCSVLogger` keeps the rows logged before
the step the run resumes from and drops the later ones (those of the epoch the interruption cut short, which the
resumed run logs again), so the file ends as an uninterrupted run's would.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows of steps before ``keep_before_step`` (the resumed checkpoint's step).

    ``keep_before_step=None`` (a new run) starts the file afresh, as Lightning's logger does.
    """

    def __init__(self, *args: Any, keep_before_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedWriter(self.log_dir, self._keep_before_step)
        return self._experiment


class ContinuedWriter(ExperimentWriter):
    """Lightning's writer, but an existing ``metrics.csv`` is cut to the rows before ``keep_before_step``."""

    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._keep_before_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        path = Path(self.metrics_file_path)
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _step(row) is not None and _step(row) < self._keep_before_step]
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self.metrics_keys = header  # later rows append under the same header (a new key rewrites it)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None
