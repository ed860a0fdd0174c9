"""Searching a :class:`~oxford_ir.retrieval.index_format.RetrievalIndex`: embed queries, find the top-k, evaluate.

- Queries (files or uploaded PIL images) are embedded by the index's own model through the one test-time path
  (``extract_embeddings``) with the index's extraction settings (image size, scales, batching and its bucket
  shapes, precision), cropped to their boxes exactly as benchmark queries are, so a search and
  ``oxford-ir-eval`` see the same vectors.
- ``backend="exact"`` (default): :class:`~oxford_ir.retrieval.exact_search.ExactSearch` on the searcher's device
  (on a GPU the database stays resident and is multiplied in half precision with float32 accumulation); top-k
  best first, ties broken by the lower database row.
  ``backend="faiss"``: see :mod:`oxford_ir.retrieval.faiss_backend` (flat or IVF-PQ).
  ``backend="index"``: the search index stored with the index (``oxford-ir-index index.memory=...``,
  :mod:`oxford_ir.retrieval.budgeted_index`), its candidates re-ranked exactly from the stored rows;
  ``backend="auto"``: that one when the index has one, else exact.
- Optional re-ranking (:mod:`oxford_ir.retrieval.reranking`): database-side augmentation (computed once,
  when the searcher first needs the database) and alpha query expansion (per query: search, expand, search).
- :func:`evaluate_benchmark` ranks a benchmark's queries against an index built with
  ``images=benchmark:<name>``; for a float32 index it gives the numbers of ``oxford-ir-eval`` exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.errors import ConfigError, DataError, IndexFormatError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.retrieval.budgeted_index import load_stored_index
from oxford_ir.retrieval.candidate_rerank import StoredIndexSearch
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.faiss_backend import FaissOptions, FaissSearch, import_faiss
from oxford_ir.retrieval.query_images import QueryImage, checked_queries
from oxford_ir.retrieval.reranking import ReRanking, augment, drop_self
from oxford_ir.retrieval.top_k import SearchResult, check_k

if TYPE_CHECKING:
    from oxford_ir.retrieval.index_format import RetrievalIndex

BACKENDS = ("exact", "faiss", "index", "auto")


# -- the searcher -------------------------------------------------------------------------------------------------
class Searcher:
    """Search ``index`` with images, vectors or its own items; the model is built on first use
    (``index.build_model``) and embeds with the index's image size and scales.

    ``backend``: ``exact`` or ``faiss`` (``faiss``: :class:`~oxford_ir.retrieval.faiss_backend.FaissOptions`
    fields). ``query_expansion`` / ``database_augmentation``: ``{"n": neighbours (0 = off), "alpha": power}``.
    Safe to share between threads (the web server does): model building, embedding and the lazy backend
    construction are serialised by a lock.
    """

    def __init__(
        self,
        index: RetrievalIndex,
        *,
        backend: str = "exact",
        faiss: Mapping | None = None,
        query_expansion: Mapping | ReRanking | None = None,
        database_augmentation: Mapping | ReRanking | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend == "auto":
            backend = "index" if index.manifest.get("search_index") else "exact"
        if backend == "index" and not index.manifest.get("search_index"):
            raise ConfigError(
                f"backend=index: the index {index.path} stores no search index; build one with "
                f"`oxford-ir-index ... out={index.path} index.memory=<bytes, e.g. 4G>`, or use backend=exact"
            )
        self.index = index
        self.backend = backend
        self.faiss_options = FaissOptions.from_config(faiss)
        if backend in ("faiss", "index"):
            import_faiss()  # fail now, not at the first query
        self.query_expansion = ReRanking.from_config(query_expansion, "query_expansion")
        self.database_augmentation = ReRanking.from_config(database_augmentation, "database_augmentation")
        if backend == "index" and self.database_augmentation.enabled:
            raise ConfigError(
                "database_augmentation changes the rows the stored search index (backend=index) was built from; "
                "use backend=exact or faiss with database_augmentation"
            )
        self.device = torch.device(device)
        try:
            self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        except (TypeError, ValueError):
            self.batch_size, self.num_workers = 0, -1
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"extraction.batch_size={batch_size!r}, extraction.num_workers={num_workers!r}: "
                "need whole numbers, batch_size >= 1 and num_workers >= 0"
            )
        self._lock = threading.RLock()
        self._model: torch.nn.Module | None = None
        self._engine: ExactSearch | FaissSearch | StoredIndexSearch | None = None
        self._database: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.index)} images, backend={self.backend}, "
            f"query_expansion={self.query_expansion}, database_augmentation={self.database_augmentation})"
        )

    # -- database side --------------------------------------------------------------------------------------
    def _new_engine(self, database: np.ndarray) -> ExactSearch | FaissSearch | StoredIndexSearch:
        """The search backend over ``database``; exact search runs on the searcher's device (on CUDA the
        database is uploaded once, here, and stays there)."""
        if self.backend == "index":
            engine = load_stored_index(self.index)
            assert engine is not None  # checked in __init__
            return engine
        if self.backend == "faiss":
            return FaissSearch(database, self.faiss_options)
        return ExactSearch(database, device=self.device)

    @property
    def database(self) -> np.ndarray:
        """The vectors searched: the index's embeddings as stored, or their DBA (float32) when enabled."""
        self._ensure_engine()
        assert self._database is not None
        return self._database

    def _ensure_engine(self) -> ExactSearch | FaissSearch | StoredIndexSearch:
        with self._lock:
            if self._engine is None:
                stored = self.index.embeddings
                engine = self._new_engine(stored)
                if self.database_augmentation.enabled:
                    augmented = database_side_augmentation(stored, engine, self.database_augmentation)
                    engine = self._new_engine(augmented)
                    self._database = augmented
                else:
                    self._database = stored
                self._engine = engine
            return self._engine

    # -- query side -------------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The index's embedding model on ``device``, in eval mode, built once by ``index.build_model`` (an
        IndexFormatError when its weights changed on disk since the index was built)."""
        with self._lock:
            if self._model is None:
                self._model = self.index.build_model(self.device).eval()
            return self._model

    def embed_images(
        self,
        images: Sequence[QueryImage],
        bboxes: Sequence[Sequence[float] | None] | None = None,
        *,
        check_boxes: bool = True,
    ) -> np.ndarray:
        """N x D float32 L2-normalised embeddings of files or PIL images, each cropped to its box (or None).

        Files and uploads go through ``extract_embeddings`` exactly as benchmark queries do. Boxes are x1,y1,x2,y2 in
        pixels of the image as displayed; one outside the image is a DataError (``check_boxes``; benchmark
        evaluation turns it off to crop exactly as the published code, which tolerates such boxes).
        """
        images, bboxes, labels = checked_queries(images, bboxes, check_boxes=check_boxes)
        if not images:
            return np.empty((0, self.index.embedding_dim), dtype=np.float32)
        index = self.index
        with self._lock:
            vectors = extract_embeddings(
                self.model,
                images,
                index.image_size,
                bboxes=bboxes,
                labels=labels,
                scales=index.scales,
                batch_size=self.batch_size,
                num_workers=self.num_workers if all(not isinstance(i, Image.Image) for i in images) else 0,
                device=self.device,
                batching=getattr(index, "batching", "shape"),  # an index without these settings is exact
                buckets=getattr(index, "buckets", None) or None,
                precision=getattr(index, "precision", "32"),
            )
        return vectors.numpy()

    def _expand(self, queries: np.ndarray) -> np.ndarray:
        qe = self.query_expansion
        if not qe.enabled:
            return queries
        _, neighbours = self._ensure_engine().search(queries, qe.n)
        return augment(queries, self.database, neighbours, qe.alpha)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.embedding_dim:
            raise ValueError(
                f"queries must be nq x {self.index.embedding_dim} (the index's embedding size), got {queries.shape}"
            )
        return queries

    def search_vectors(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k database rows of L2-normalised query vectors (query expansion applied when enabled)."""
        k = check_k(k)
        queries = self._expand(self._check_queries(queries))
        scores, indices = self._ensure_engine().search(queries, k)
        return SearchResult(scores=scores, indices=indices)

    def search_images(
        self, images: Sequence[QueryImage], bboxes: Sequence[Sequence[float] | None] | None = None, k: int = 10
    ) -> SearchResult:
        """Top-k of image files or PIL images, each cropped to its box; all queries in one batched pass."""
        k = check_k(k)
        return self.search_vectors(self.embed_images(images, bboxes), k)

    def search_ids(self, ids: Sequence[int], k: int) -> SearchResult:
        """Top-k with indexed images as queries, by their stored embeddings (no re-embedding)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.index)):
            raise DataError(f"image ids must lie in [0, {len(self.index)}), got {ids.tolist()}")
        return self.search_vectors(np.asarray(self.index.embeddings[ids], dtype=np.float32), k)

    def rank_all(self, queries: np.ndarray) -> np.ndarray:
        """Every database row per query, best first: n_db x nq, the layout of the benchmark protocol."""
        queries = self._expand(self._check_queries(queries))
        return self._ensure_engine().rank_all(queries)


def database_side_augmentation(
    database: np.ndarray, engine: ExactSearch | FaissSearch, options: ReRanking, *, block_rows: int = 4096
) -> np.ndarray:
    """DBA: each row replaced by the weighted sum of itself and its top-n other rows (``engine`` finds them)."""
    n = database.shape[0]
    out = np.empty(database.shape, dtype=np.float32)
    for start in range(0, n, block_rows):
        rows = np.asarray(database[start : start + block_rows], dtype=np.float32)
        ids = np.arange(start, start + rows.shape[0])
        _, neighbours = engine.search(rows, options.n + 1)
        out[start : start + rows.shape[0]] = augment(rows, database, drop_self(neighbours, ids), options.alpha)
    return out


# -- benchmarks -------------------------------------------------------------------------------------------------
def benchmark_rows(index: RetrievalIndex, benchmark: Benchmark) -> np.ndarray:
    """The index row of each of the benchmark's database images; an index lacking some is an error."""
    root = Path(index.root).resolve()
    row_of = {str(root / entry.path): row for row, entry in enumerate(index.entries)}
    image_dir = Path(benchmark.image_dir).resolve()
    rows = np.array([row_of.get(str(image_dir / f"{n}{benchmark.extension}"), -1) for n in benchmark.imlist])
    missing = [benchmark.imlist[i] for i in np.flatnonzero(rows < 0)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise IndexFormatError(
            f"index {index.path} lacks {len(missing)} of the {benchmark.n_db} database images of {benchmark.name} "
            f"({shown}); build it with `oxford-ir-index images=benchmark:{benchmark.name} out={index.path}` "
            "(and the same paths.data_dir / allow_missing_images) to evaluate on the benchmark"
        )
    return rows


def embed_benchmark_queries(searcher: Searcher, benchmark: Benchmark) -> np.ndarray:
    """The benchmark's query images cropped to their boxes, embedded by the searcher's (the index's) model."""
    return searcher.embed_images(benchmark.query_paths, benchmark.query_bboxes, check_boxes=False)


def evaluate_benchmark(
    index: RetrievalIndex,
    benchmark: Benchmark,
    searcher: Searcher | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    *,
    query_vectors: np.ndarray | None = None,
) -> dict[str, float]:
    """The benchmark's metrics when its queries (cropped to their boxes) search ``index``.

    ``index`` must hold the benchmark's database images (built with ``images=benchmark:<name>``). Rows the
    benchmark does not list are dropped from the ranking. The same extraction, ranking and protocol code as
    ``oxford-ir-eval`` runs, so a float32 index gives identical numbers (a float16 one nearly so).
    ``query_vectors``: the queries' embeddings from an earlier call of :func:`embed_benchmark_queries`, to
    compare several searchers (re-ranking settings) without embedding the queries again.
    """
    searcher = searcher if searcher is not None else Searcher(index)
    if searcher.index is not index:
        raise ValueError("the searcher searches another index than the one given")
    rows = benchmark_rows(index, benchmark)
    queries = embed_benchmark_queries(searcher, benchmark) if query_vectors is None else query_vectors
    if queries.shape != (benchmark.n_queries, index.embedding_dim):
        raise ValueError(f"query_vectors must be {benchmark.n_queries} x {index.embedding_dim}, got {queries.shape}")
    ranks = searcher.rank_all(queries)  # index rows, n_index x nq
    to_benchmark = np.full(len(index), -1, dtype=np.int64)
    to_benchmark[rows] = np.arange(benchmark.n_db)
    mapped = to_benchmark[ranks]
    if len(index) != benchmark.n_db:
        keep = mapped >= 0  # the same number of kept rows in every column
        mapped = mapped.T[keep.T].reshape(benchmark.n_queries, benchmark.n_db).T
    return benchmark.evaluate(mapped, kappas=kappas)
