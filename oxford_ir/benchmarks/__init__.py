"""Everything about "what is the ground truth": the benchmarks (Oxford5k, Paris6k, their Revisited versions, a
synthetic one) in their published formats (:mod:`~oxford_ir.benchmarks.ground_truth`), the registry that loads them
(:mod:`~oxford_ir.benchmarks.registry`), download and verification, training splits, and the evaluation protocol
(:mod:`~oxford_ir.benchmarks.metrics`) with the ranking it scores. It imports nothing above it but image decoding
(:mod:`oxford_ir.images`), so the data, models and retrieval layers can all use it.
"""

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.registry import BENCHMARKS, load_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "load_benchmark"]
