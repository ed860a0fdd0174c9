"""Ranking by similarity: one matrix product and a sort, never a loop over pairs."""

from __future__ import annotations

import numpy as np
import torch


def rank_database(db: torch.Tensor | np.ndarray, queries: torch.Tensor | np.ndarray) -> np.ndarray:
    """Database indices ordered by decreasing cosine similarity, one column per query.

    ``db`` (n_db x D) and ``queries`` (n_q x D) are L2-normalised embeddings; the
    result has shape (n_db, n_q), the layout the Oxford evaluation code expects.
    Ties keep database order (stable sort), so rankings are deterministic.
    """
    db_t = torch.as_tensor(db, dtype=torch.float32)
    q_t = torch.as_tensor(queries, dtype=torch.float32)
    if db_t.ndim != 2 or q_t.ndim != 2 or db_t.shape[1] != q_t.shape[1]:
        raise ValueError(f"embeddings must be N x D with the same D, got {tuple(db_t.shape)} and {tuple(q_t.shape)}")
    scores = db_t @ q_t.T
    return torch.argsort(scores, dim=0, descending=True, stable=True).cpu().numpy()
