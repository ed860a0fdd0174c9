"""Library notices that tell a user of this project nothing they can act on, silenced for every command.

- Lightning's tip to install ``litlogger`` (an advertisement, printed at every ``Trainer`` start);
- Lightning 2.6's ``isinstance(treespec, LeafSpec)`` deprecation warning under torch >= 2.10 (printed every epoch:
  it is Lightning's own call into torch, fixed in Lightning, not here);
- W&B's "The anonymous setting has no effect" warning, caused by Lightning's WandbLogger always passing
  ``anonymous`` (see :func:`without_anonymous_setting`).

Only these exact messages are dropped; every other warning and log line passes.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

#: Lightning's logger for rank-zero notices (``rank_zero_info``)
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.getMessage())


def silence_library_notices() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    for name in (_RANK_ZERO_LOGGER, "lightning.pytorch", "lightning"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
            logger.addFilter(_DropLitLoggerTip())


def without_anonymous_setting(logger: Any) -> Any:
    """A Lightning WandbLogger without the ``anonymous: None`` it always passes to ``wandb.init`` (W&B warns that
    the setting has no effect whenever it is given at all)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger
