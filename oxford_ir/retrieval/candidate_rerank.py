"""Exact re-ranking of an approximate index's candidates: the final top-k carries exact scores.

A compressed index (:mod:`~oxford_ir.retrieval.budgeted_index`) ranks by approximate scores; it proposes
``candidates`` rows per query, whose stored rows (float16 or float32, usually a read-only memory map, so that
only the candidates' pages are read) are multiplied with the query in float32, as exact search does. The top-k
of those is the answer: a returned row's score is its exact score, and the order among the candidates is exact
(equal scores by the lower row). What the approximation can still lose is a true neighbour that was not among
the candidates; ``recall_at`` measures that against exact search.

This is not :mod:`~oxford_ir.retrieval.reranking` (query expansion and database augmentation change the
vectors compared; this changes only how candidates are scored).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from oxford_ir.retrieval.faiss_backend import ranks_with_the_rest

#: queries re-scored at once: at most 64, and their candidates' rows at most this many floats (64 MiB)
_QUERY_BLOCK, _BLOCK_FLOATS = 64, 2**24


def rerank_exact(
    queries: np.ndarray, candidates: np.ndarray, database: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)`` nq x min(k, c): the ``candidates`` (nq x c rows, -1 for none) of each query ordered
    by their exact inner product with it, best first, equal scores by the lower row; missing slots hold -1 and
    -inf."""
    queries = np.asarray(queries, dtype=np.float32)
    nq, c = candidates.shape
    k = min(int(k), c)
    scores_out = np.full((nq, k), -np.inf, dtype=np.float32)
    rows_out = np.full((nq, k), -1, dtype=np.int64)
    block = max(1, min(_QUERY_BLOCK, _BLOCK_FLOATS // max(1, c * database.shape[1])))
    for start in range(0, nq, block):
        ids = candidates[start : start + block]
        valid = ids >= 0
        flat = np.where(valid, ids, 0).reshape(-1)
        order = np.argsort(flat, kind="stable")  # rows read in file order: sequential pages of a memory map
        gathered = np.empty((flat.size, database.shape[1]), dtype=database.dtype)
        gathered[order] = database[flat[order]]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            rows = torch.from_numpy(gathered).float().view(ids.shape[0], c, -1)
        q = torch.from_numpy(queries[start : start + block]).unsqueeze(2)
        scores = torch.bmm(rows, q).squeeze(2).numpy()
        scores[~valid] = -np.inf
        rank = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
        scores_out[start : start + len(ids)] = np.take_along_axis(scores, rank, axis=1)
        rows_out[start : start + len(ids)] = np.where(
            np.isfinite(scores_out[start : start + len(ids)]), np.take_along_axis(ids, rank, axis=1), -1
        )
    return scores_out, rows_out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k (the share of exact search's top k found)."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k) if hits else 1.0


class StoredIndexSearch:
    """Top-k search: ``max(candidates, k)`` rows per query from the faiss ``index``, re-ranked exactly from
    ``database`` (the rows the index was built from, in the same order)."""

    def __init__(self, index: Any, database: np.ndarray, *, candidates: int = 100) -> None:
        self.index, self.database, self.candidates = index, database, int(candidates)
        self.n, self.dim = (int(s) for s in database.shape)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.n)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.shape[0] == 0 or k == 0:
            return np.zeros((queries.shape[0], k), np.float32), np.zeros((queries.shape[0], k), np.int64)
        _, candidates = self.index.search(queries, min(max(self.candidates, k), self.n))
        return rerank_exact(queries, candidates.astype(np.int64, copy=False), self.database, k)

    def rank_all(self, queries: np.ndarray) -> np.ndarray:
        """Every database row per query (n_db x nq): the rows the index reaches, exactly ordered, then the
        others in index order."""
        _, indices = self.search(queries, self.n)
        return ranks_with_the_rest(indices, self.n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n} x {self.dim}, candidates={self.candidates})"
