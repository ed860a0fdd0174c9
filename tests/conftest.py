"""Shared fixtures: W&B off by default, paths to the real data in ../shared (skipped when absent)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _wandb_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test talks to W&B unless it opts in (the offline W&B test sets WANDB_MODE itself)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _logging_restored():
    """Each test leaves logging as it found it: a command run in-process (Hydra's job logging, a console script's
    handler) binds stream handlers to the stream pytest captured for that test; left behind, they write to a closed
    stream in a later test ("--- Logging error ---"), which depends on the order tests run in (pytest-xdist)."""
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in ("oxford_ir", "lightning.pytorch", "lightning.fabric", "hydra")),
    ]
    saved = [(logger, list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        for handler in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(handler)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent")
    return path


@pytest.fixture
def oxford_root() -> Path:
    """../shared/oxford5k: real Oxford5k ground truth (all forms) and 12 real images."""
    return _shared("oxford5k")


@pytest.fixture
def paris_root() -> Path:
    """../shared/paris6k: real Paris6k ground truth (pickles) and 250 real images."""
    return _shared("paris6k")


@pytest.fixture
def mobilenet_weights() -> Path:
    """../shared/weights: real ImageNet MobileNetV2 features in torchvision layout."""
    return _shared("weights/mobilenet_v2_imagenet_features.pth")
