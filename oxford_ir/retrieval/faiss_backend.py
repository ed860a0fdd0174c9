"""The faiss search backend (``backend=faiss``): exact ``flat`` or compressed ``ivfpq`` inner-product search.

Vectors are compared by inner product; index rows and query embeddings are L2-normalised, so this is the
cosine similarity of the exact backend. Like that backend, it takes the rows as stored (a float16 row's norm
is 1 up to its rounding) instead of renormalising them, so that both rank the same vectors.

- ``flat`` (``IndexFlatIP``): exhaustive, the same top-k as exact search; useful where faiss' BLAS kernels
  are faster than torch, and as a reference.
- ``ivfpq`` (``IndexIVFPQ``): a coarse k-means quantiser with ``nlist`` cells, residuals product-quantised
  into ``m`` sub-vectors of ``nbits`` bits each (``m * nbits / 8`` bytes per image instead of ``4 D``); a
  query visits the ``nprobe`` nearest cells. Trained on ``train_size`` database vectors drawn with
  ``seed``. Approximate: ``tests/retrieval/test_search.py`` measures its recall against exact search.

faiss is the optional extra ``faiss`` (``pip install -e '.[faiss]'``); without it, asking for this backend
is a :class:`~oxford_ir.errors.ConfigError` that says so. ``device="cuda"`` builds and searches the index on
the GPU where the installed faiss has GPU support (``faiss.StandardGpuResources``; the ``faiss-gpu`` builds),
and on the CPU otherwise (``FaissSearch.on_gpu`` says which).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from oxford_ir.errors import ConfigError

INDEX_TYPES = ("flat", "ivfpq")
#: database rows added to faiss at once (float16 rows are upcast one block at a time)
_ADD_BLOCK = 65536


def import_faiss() -> Any:
    """The faiss module, or a ConfigError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "backend=faiss needs the faiss package, which is not installed: pip install -e '.[faiss]' "
            "(or pip install faiss-cpu), or use backend=exact"
        ) from None
    return faiss


@dataclass(frozen=True)
class FaissOptions:
    """Settings of the faiss backend (the ``faiss`` config node)."""

    index_type: str = "flat"
    #: IVF: number of k-means cells (at most the number of training vectors; ~sqrt(N) to 16 sqrt(N) is usual)
    nlist: int = 1024
    #: PQ: sub-quantisers (must divide the embedding dimension)
    m: int = 16
    #: PQ: bits per sub-quantiser code (8 = 256 centroids each)
    nbits: int = 8
    #: IVF: cells visited per query (more = better recall, slower)
    nprobe: int = 16
    #: IVF-PQ: database vectors used to train the quantisers
    train_size: int = 100_000
    #: which training vectors are drawn
    seed: int = 0

    @classmethod
    def from_config(cls, options: Mapping | FaissOptions | None) -> FaissOptions:
        if options is None:
            return cls()
        if isinstance(options, FaissOptions):
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"faiss: unknown option(s) {unknown}; known: {sorted(known)}")
        values = {**asdict(cls()), **dict(options)}
        if values["index_type"] not in INDEX_TYPES:
            raise ConfigError(f"faiss.index_type={values['index_type']!r}: choose one of {', '.join(INDEX_TYPES)}")
        for key in ("nlist", "m", "nbits", "nprobe", "train_size", "seed"):
            value, least = values[key], 0 if key == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise ConfigError(f"faiss.{key}={value!r}: must be a whole number >= {least}")
        if values["nbits"] > 16:
            raise ConfigError(f"faiss.nbits={values['nbits']}: PQ codes have at most 16 bits (8 is usual)")
        return cls(**values)


class FaissSearch:
    """Top-k inner-product search over L2-normalised ``database`` rows with a faiss index built on creation."""

    def __init__(
        self, database: np.ndarray, options: FaissOptions | Mapping | None = None, *, device: Any = "cpu"
    ) -> None:
        self.options = FaissOptions.from_config(options)
        faiss = import_faiss()
        self.on_gpu = str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources")
        if database.ndim != 2:
            raise ValueError(f"database must be N x D, got shape {database.shape}")
        n, d = database.shape
        self.n, self.dim = int(n), int(d)
        o = self.options
        if o.index_type == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            n_train = min(o.train_size, n)
            if d % o.m:
                raise ConfigError(f"faiss.m={o.m}: the PQ sub-quantisers must divide the embedding dimension {d}")
            if n_train < max(o.nlist, 2**o.nbits):
                raise ConfigError(
                    f"faiss ivfpq with nlist={o.nlist}, nbits={o.nbits} needs at least {max(o.nlist, 2**o.nbits)} "
                    f"training vectors, but the index holds {n} (train_size={o.train_size}); lower faiss.nlist / "
                    "faiss.nbits or use faiss.index_type=flat (or backend=exact) for a collection this small"
                )
            quantiser = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFPQ(quantiser, d, o.nlist, o.m, o.nbits, faiss.METRIC_INNER_PRODUCT)
            self._quantiser = quantiser  # the IVF index does not own it: keep it alive
        if self.on_gpu:
            self._resources = faiss.StandardGpuResources()  # must outlive the index
            gpu = str(device).partition(":")[2]
            index = faiss.index_cpu_to_gpu(self._resources, int(gpu or 0), index)
        if o.index_type == "ivfpq":
            rows = np.sort(np.random.default_rng(o.seed).choice(n, size=n_train, replace=False))
            index.train(_float32(database[rows]))
            index.nprobe = min(o.nprobe, o.nlist)
        buffer = np.empty((min(n, _ADD_BLOCK), d), dtype=np.float32)  # reused: no page faults per block
        for start in range(0, n, _ADD_BLOCK):
            index.add(_float32(database[start : start + _ADD_BLOCK], buffer))
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, indices)``, each nq x min(k, N), best first; an IVF search that reaches fewer than k
        images pads with index -1 and score -inf."""
        k = min(int(k), self.n)
        queries = _float32(queries)
        if queries.shape[0] == 0 or k == 0:
            return np.zeros((queries.shape[0], k), np.float32), np.zeros((queries.shape[0], k), np.int64)
        scores, indices = self.index.search(queries, k)
        scores = scores.astype(np.float32, copy=False)
        scores[indices < 0] = -np.inf
        return scores, indices.astype(np.int64, copy=False)

    def rank_all(self, queries: np.ndarray) -> np.ndarray:
        """Every database row per query (n_db x nq): faiss' order, then rows it did not reach, in index order."""
        _, indices = self.search(queries, self.n)
        return ranks_with_the_rest(indices, self.n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n} x {self.dim}, {self.options})"


def ranks_with_the_rest(indices: np.ndarray, n: int) -> np.ndarray:
    """Every one of ``n`` rows per query (n x nq): the rows an index returned (``indices``, nq x k, -1 for none), in
    its order, then the rows it did not reach, in index order."""
    ranks = np.empty((indices.shape[0], n), dtype=np.int64)
    for q, row in enumerate(indices):
        found = row[row >= 0]
        seen = np.zeros(n, dtype=bool)
        seen[found] = True
        ranks[q] = np.concatenate([found, np.flatnonzero(~seen)])
    return ranks.T


def _float32(vectors: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """C-contiguous float32 rows, the only layout faiss accepts; float16 rows are upcast, into the first rows of
    ``buffer`` when given. The upcast is torch's (vectorised, multi-threaded): numpy's float16 conversion is
    neither, 7 ns a value on this project's 2-core machine against 0.5 for torch's into a reused buffer."""
    if vectors.dtype == np.float32 and vectors.flags.c_contiguous:
        return vectors
    out = np.empty(vectors.shape, np.float32) if buffer is None else buffer[: len(vectors)]
    with warnings.catch_warnings():  # a read-only memory map is only read: torch's warning does not apply
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        try:
            torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(vectors)))
        except (TypeError, ValueError):  # a dtype or byte order torch cannot view
            out[...] = vectors
    return out
