"""Re-ranking used in landmark retrieval: alpha query expansion (αQE) and database-side augmentation (DBA).

Both replace a vector by the L2-normalised weighted sum of itself and its top-``n`` database neighbours,
a neighbour weighing its similarity to the vector raised to the power ``alpha`` (Radenović, Tolias and
Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018):

    v' = normalise(v + sum_i max(v . x_i, 0) ** alpha * x_i)

The vector itself weighs 1 (its similarity to itself). Negative similarities weigh 0, so that a fractional
``alpha`` stays defined; ``alpha = 0`` gives every neighbour weight 1, i.e. average query expansion (Chum et
al., ICCV 2007). ``n = 0`` is the identity.

- αQE applies this to each query with its neighbours from a first search, then searches again.
- DBA applies it to every database vector with its neighbours among the other database vectors (the vector
  itself excluded), once, before searching; queries are then compared with the augmented database.

Neighbours are found by whatever search backend is in use; the weights are recomputed exactly from the
vectors, so an approximate backend (IVF-PQ) only changes which neighbours are picked, not their weights.
Everything works on blocks of rows with matrix operations, never a loop over pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from oxford_ir.errors import ConfigError

#: rows of vectors re-weighted at once (bounds the block of gathered neighbours, rows x n x D floats)
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ReRanking:
    """Parameters of αQE or DBA: ``n`` neighbours (0 = off), weights ``similarity ** alpha``."""

    n: int = 0
    alpha: float = 3.0

    @property
    def enabled(self) -> bool:
        return self.n > 0

    @classmethod
    def from_config(cls, options: Mapping | ReRanking | None, key: str) -> ReRanking:
        """Validated parameters from a config node ``key`` (``query_expansion`` or ``database_augmentation``)."""
        if options is None:
            return cls()
        if isinstance(options, ReRanking):
            return options
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"{key}={options!r}: a group of settings, not a value; set {key}.n (neighbours, 0 = off) and "
                f"{key}.alpha, e.g. {key}.n={options!r}"
            )
        unknown = sorted(set(options) - {"n", "alpha"})
        if unknown:
            raise ConfigError(f"{key}: unknown option(s) {unknown}; {key} takes n (neighbours, 0 = off) and alpha")
        n, alpha = options.get("n", 0), options.get("alpha", 3.0)
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ConfigError(f"{key}.n={n!r}: must be a whole number of neighbours >= 0 (0 turns it off)")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            alpha = float("nan")
        if not np.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"{key}.alpha={options.get('alpha')!r}: must be a finite number >= 0 (typically 3)")
        return cls(n=int(n), alpha=alpha)


def augment(vectors: np.ndarray, database: np.ndarray, neighbours: np.ndarray, alpha: float) -> np.ndarray:
    """``normalise(v + sum_i max(v . db[j_i], 0) ** alpha * db[j_i])`` for each row ``v`` of ``vectors``.

    ``neighbours`` (m x n int) holds database rows; -1 marks a missing neighbour (an approximate backend may
    find fewer than n) and adds nothing. ``database`` may be float16: rows are upcast as they are gathered.
    Returns an m x D float32 array.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    neighbours = np.asarray(neighbours, dtype=np.int64)
    if vectors.ndim != 2 or neighbours.ndim != 2 or neighbours.shape[0] != vectors.shape[0]:
        raise ValueError(f"need m x D vectors and m x n neighbours, got {vectors.shape} and {neighbours.shape}")
    m, n = neighbours.shape
    if n == 0 or m == 0:
        return vectors.copy()
    import torch  # here: the settings above are read by the search of an ONNX model, which runs without PyTorch

    out = np.empty_like(vectors)
    block = max(1, _BLOCK_ELEMENTS // max(1, n * vectors.shape[1]))
    for start in range(0, m, block):
        stop = min(m, start + block)
        v = torch.from_numpy(vectors[start:stop])
        ids = neighbours[start:stop]
        valid = torch.from_numpy(ids >= 0)
        x = torch.from_numpy(np.asarray(database[np.where(ids >= 0, ids, 0)], dtype=np.float32))  # b x n x D
        sims = torch.einsum("bd,bnd->bn", v, x)
        weights = sims.clamp_min(0).pow(alpha) * valid
        summed = v + torch.einsum("bn,bnd->bd", weights, x)
        out[start:stop] = torch.nn.functional.normalize(summed, dim=1).numpy()
    return out


def drop_self(indices: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Top-(n+1) neighbours of database items -> their top-n neighbours other than themselves.

    Each row loses the item itself, or its last column when the item is not among its own top n+1 (which
    happens only with more than n exact duplicates ranked before it).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 2 or indices.shape[1] == 0:
        raise ValueError(f"need an m x (n+1) array of neighbours, got shape {indices.shape}")
    is_self = indices == np.asarray(self_ids, dtype=np.int64)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return indices[~is_self].reshape(indices.shape[0], indices.shape[1] - 1)
