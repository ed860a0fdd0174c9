"""What the ground truth says and how a ranking is scored: the evaluation protocol of Oxford / Paris and their
Revisited versions (:mod:`~oxford_ir.benchmarks.metrics`) and the ranking it scores
(:mod:`~oxford_ir.benchmarks.ranking`). The lowest layer above errors and config: it imports nothing of the
package's other layers, so the data, models and retrieval layers can all use it.
"""
