"""The data tests use the benchmark tests' fixtures: the tiny synthetic benchmark and the 127.0.0.1 file server."""

from tests.benchmarks.conftest import TINY, data_dir, server  # noqa: F401
