"""Exact (brute-force) cosine search: ``queries @ database.T`` by blocks, top-k merged across blocks.

Index rows and query embeddings are L2-normalised, so the inner product is the cosine similarity. Ties are
broken by the lower database row, so results are deterministic and equal to the full ranking of
:func:`~oxford_ir.retrieval.ranking.rank_database`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from oxford_ir.retrieval.ranking import rank_database

#: floats held by one block of exact-search scores (and by one upcast block of database rows)
_BLOCK_ELEMENTS = 1 << 24


class ExactSearch:
    """Brute-force cosine search: ``queries @ database.T`` by blocks, top-k merged across blocks.

    ``database`` is N x D with L2-normalised rows, float16 or float32 (a memory map works: only one block of
    rows is upcast to float32 at a time). Ties are broken by the lower row, so results are deterministic.
    """

    def __init__(self, database: np.ndarray, *, block_rows: int | None = None) -> None:
        if database.ndim != 2:
            raise ValueError(f"database must be N x D, got shape {database.shape}")
        self.database = database
        self.n, self.dim = (int(s) for s in database.shape)
        self.block_rows = int(block_rows or max(1, _BLOCK_ELEMENTS // max(1, self.dim)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, indices)``, each nq x min(k, N), best first."""
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        nq, k = q.shape[0], min(int(k), self.n)
        best_s = torch.empty(nq, 0)
        best_i = torch.empty(nq, 0, dtype=torch.int64)
        if nq == 0 or k == 0:
            return np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
        query_block = max(1, _BLOCK_ELEMENTS // self.block_rows)
        for start in range(0, self.n, self.block_rows):
            rows = _float32_rows(self.database[start : start + self.block_rows])
            block_s, block_i = [], []
            for q0 in range(0, nq, query_block):
                s, i = _top_k(q[q0 : q0 + query_block] @ rows.T, k)
                block_s.append(s)
                block_i.append(i + start)
            best_s, best_i = _merge(best_s, best_i, torch.cat(block_s), torch.cat(block_i), k)
        return best_s.numpy(), best_i.numpy()

    def rank_all(self, queries: np.ndarray) -> np.ndarray:
        """All rows per query (n_db x nq), by ``rank_database``: the ranking code of ``oxford-ir-eval``."""
        return rank_database(np.asarray(self.database, dtype=np.float32), np.asarray(queries, dtype=np.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n} x {self.dim}, {self.database.dtype})"


def _float32_rows(block: np.ndarray) -> torch.Tensor:
    """A block of database rows as a float32 tensor: torch's vectorised, multi-threaded upcast (faster than
    numpy's for float16); a read-only memory map is only read, so torch's warning about it does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(block)).float()


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of a score block, best first, equal scores in increasing column order.

    ``torch.topk`` gives the k-th best score; every column above it is taken, and of the columns equal to
    it the first ones, as many as are still needed. A stable sort of those k then orders them.
    """
    k = min(k, scores.shape[1])
    scores = torch.nan_to_num(scores, nan=-math.inf)  # a NaN would otherwise outrank everything
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(dim=1, keepdim=True)
    if bool((equal.sum(dim=1, keepdim=True) == need).all()):
        selected = greater | equal
    else:
        selected = greater | (equal & (torch.cumsum(equal, dim=1) <= need))
    columns = selected.nonzero()[:, 1].view(scores.shape[0], k)  # increasing column order within a row
    values = scores.gather(1, columns)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def _merge(
    best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor, new_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of two sorted candidate lists; ``best`` holds lower rows than ``new``, so a stable sort keeps
    the lower-row-first tie-break."""
    scores = torch.cat([best_s, new_s], dim=1)
    indices = torch.cat([best_i, new_i], dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), indices.gather(1, order)
