"""Checks of ``data.*`` config values shared by the DataModule, the sampler and the image cache settings: each
returns the value as a plain ``int`` or raises one :class:`~oxford_ir.errors.ConfigError` naming ``data.<key>``."""

from __future__ import annotations

from typing import Any

import numpy as np

from oxford_ir.errors import ConfigError


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1; anything else (a bool, a float, 0) raises ConfigError naming ``data.<name>``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0; anything else raises ConfigError naming ``data.<name>``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"data.{name} must be a non-negative integer, got {value!r}")
    return int(value)
