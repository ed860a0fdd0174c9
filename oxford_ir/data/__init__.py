"""Benchmarks (Oxford5k, Paris6k, their Revisited versions, a synthetic one) and image loading."""

from oxford_ir.data.benchmark import Benchmark
from oxford_ir.data.images import load_image
from oxford_ir.data.loading import BENCHMARKS, load_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "load_benchmark", "load_image"]
