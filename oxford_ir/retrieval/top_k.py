"""The k best database rows of each query: the result every search backend returns, and exact top-k in NumPy.

:class:`SearchResult` is what :class:`~oxford_ir.retrieval.search.Searcher` and the search of an exported ONNX
model (:mod:`oxford_ir.retrieval.onnx_queries`) give back. :func:`exact_top_k` is brute-force cosine search without
PyTorch, for that ONNX search: it ranks as :class:`~oxford_ir.retrieval.exact_search.ExactSearch` does on the CPU
(best first, equal scores by the lower database row, NaN scores last as -inf), with NumPy's float32 products (its
BLAS may round a sum's last bit differently from torch's, so two rows within 1e-7 of each other can swap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from oxford_ir.errors import ConfigError

#: float32 scores of one block of rows x queries (64 MiB)
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SearchResult:
    """Top-k of each query: ``scores`` (nq x k float32) and database rows ``indices`` (nq x k int64), best
    first. An approximate backend may find fewer than k: those slots hold index -1 and score -inf."""

    scores: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return self.indices.shape[0]

    def hits(self, query: int) -> list[tuple[int, float]]:
        """``(database row, score)`` pairs of query ``query``, best first, missing slots left out."""
        return [(int(i), float(s)) for i, s in zip(self.indices[query], self.scores[query], strict=True) if i >= 0]


def check_k(k: Any) -> int:
    """``k`` as an int, or a ConfigError when it is not a whole number >= 1."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"k={k!r}: the number of results must be a whole number >= 1")
    return int(k)


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
    """The ``min(k, N)`` best rows of ``database`` (N x D, float16 or float32, a memory map works) for each
    L2-normalised query (nq x D), by inner product, in blocks of rows upcast to float32."""
    queries = np.asarray(queries, dtype=np.float32)
    n, dim = database.shape
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be nq x {dim} (the database's dimension), got {queries.shape}")
    k = min(check_k(k), n)
    nq = queries.shape[0]
    best_s = np.empty((nq, 0), np.float32)
    best_i = np.empty((nq, 0), np.int64)
    block = max(1, _BLOCK_ELEMENTS // max(1, nq))
    for start in range(0, n, block):
        rows = np.asarray(database[start : start + block], dtype=np.float32)
        scores = queries @ rows.T
        scores[np.isnan(scores)] = -np.inf
        rows_i = np.broadcast_to(np.arange(start, start + rows.shape[0], dtype=np.int64), scores.shape)
        best_s, best_i = _best(np.concatenate([best_s, scores], 1), np.concatenate([best_i, rows_i], 1), k)
    return SearchResult(scores=best_s, indices=best_i)


def _best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the ``k`` columns with the highest score, equal scores by the lower row, best first."""
    if scores.shape[1] > k:  # keep every column at least as good as the k-th score (ties included), then sort
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
        order = np.argsort(scores < kth, axis=1, kind="stable")[:, : max(k, int((scores >= kth).sum(1).max()))]
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
