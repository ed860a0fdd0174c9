"""Fixtures shared by the benchmark and data tests: a tiny synthetic benchmark written once per module, and the
127.0.0.1 file server."""

from __future__ import annotations

from pathlib import Path

import pytest

from oxford_ir.benchmarks.synthetic import write_synthetic_benchmark
from tests.benchmarks.http_server import server  # noqa: F401  (the 127.0.0.1 file server fixture)

#: 5 landmarks x (2 queries + 6 photos, 1 hard, 1 junk) + 8 distractors, 64 px: written in well under a second
TINY = {
    "seed": 0,
    "n_landmarks": 5,
    "images_per_landmark": 6,
    "queries_per_landmark": 2,
    "hard_per_landmark": 1,
    "junk_per_landmark": 1,
    "n_distractors": 8,
    "photo_long_side": 64,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding ``synthetic/``, the TINY benchmark."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_benchmark(root / "synthetic", **TINY)
    return root
