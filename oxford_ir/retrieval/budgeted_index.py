"""An index chosen from a memory budget and tuned to a recall target (``index.memory``, ``index.recall``).

The choice is autofaiss' (``get_optimal_index_keys_v2``, criteo/autofaiss 2.18), implemented on faiss because
the autofaiss package pins numpy < 2 and pulls pandas, pyarrow, fire and embedding-reader:

- fewer than 1,000 vectors: ``Flat``;
- an HNSW graph over the float32 rows when the budget holds it, with ``M = min(32, (budget / 4n - d) / 2)``
  links per vector, and at least 8 (below 10,000 vectors: HNSW or, when no graph fits, ``Flat``);
- below 1M vectors, ``IVF<nlist>,Flat`` (float32 rows in k-means cells) when it fits;
- else ``IVF<nlist>,PQ<2m>x4fs``: rows compressed to ``m`` bytes in k-means cells, with the largest ``m`` of
  256, 128, 64, 48, 32, 24, 16, 8, 4 that fits (and whose ``2m`` sub-quantisers divide ``d``).

Sizes are estimated as autofaiss does (float32 rows, 8-byte ids, centroids, HNSW links) and the built index is
measured (its faiss serialisation) against the budget. The cells: the power of two nearest ``4 sqrt(n)``
(autofaiss below 1M vectors; it takes 16,384 and more above, which costs 4 to 16 times the training here), at
most one per 39 training vectors (faiss' minimum). Where this differs from autofaiss, and why:

- no OPQ rotation in front of the PQ (autofaiss: ``OPQ<m>_<d'>,IVF...``): on this project's 2-core machine
  (shared, load 7-12) training ``OPQ512_2048,IVF256,PQ512x4fs`` on 16,384 vectors of 2048 dimensions did not
  finish in 12 minutes (faiss' 50 OPQ iterations, each a 2048-d rotation of the training set and a PQ
  training), and an OPQ of 10 iterations on 10,000 x 64 took 84 s where the index without it trains in 0.5 s;
  the exact re-ranking of the candidates (below) wins back what the rotation would add to the codes' precision;
- the PQ codes are 4-bit "fast-scan" ones (``2m`` sub-quantisers of 16 centroids, the same ``m`` bytes a vector)
  instead of ``m`` 8-bit ones: a 16-centroid k-means computes 1/16 of the distances of a 256-centroid one (and
  at 4 to 8 dimensions a sub-space, k-means is not BLAS-bound), and fast-scan searches with SIMD lookups; the
  codes are stored in blocks of 32 vectors per cell (counted);
- HNSW's graph links are counted as faiss stores them (``2M`` per vector at level 0, plus levels above);
- where no graph fits below 10,000 vectors, ``Flat`` rather than nothing.

Tuning: ``nprobe`` (IVF) or ``efSearch`` (HNSW) is raised from 1 (HNSW: 16) by doubling, then narrowed by
bisection, to the smallest value whose recall@10 reaches the target on a held-out sample of the collection's
own vectors (left out of the training; each query's own row left out of both answers) against exact search.
The compressed index proposes ``candidates`` rows per query, which are re-scored exactly from the stored float16
rows (:mod:`~oxford_ir.retrieval.candidate_rerank`), so the recall measured is that of the final answer. The
measured recall@10 and queries/s (and those of exact search on the same queries) go into the manifest.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from oxford_ir.errors import ConfigError, IndexFormatError
from oxford_ir.retrieval.candidate_rerank import StoredIndexSearch, recall_at
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.faiss_backend import _ADD_BLOCK, _float32, import_faiss

if TYPE_CHECKING:
    from oxford_ir.retrieval.index_format import RetrievalIndex

#: the stored index's file in an index version folder (checksummed in the manifest's ``files``)
SEARCH_INDEX_FILE = "search.faiss"

#: autofaiss' thresholds: below FLAT_BELOW vectors a flat index; below QUANTISE_FROM no quantiser can be trained
FLAT_BELOW, QUANTISE_FROM, IVF_FLAT_BELOW = 1_000, 10_000, 1_000_000
#: code sizes (bytes per vector) tried, largest first (autofaiss' list)
PQ_BYTES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
#: faiss' minimum of training vectors per k-means centroid
POINTS_PER_CENTROID = 39
#: bytes added to every estimate: faiss headers and per-cell list sizes are counted separately
_HEADER_BYTES = 4096
#: the search parameter tuned per kind, its least and greatest value
_TUNED = {"hnsw": ("efSearch", 16, 4096), "ivf_flat": ("nprobe", 1, None), "ivf_pq": ("nprobe", 1, None)}
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(value: Any, key: str = "index.memory") -> int:
    """Bytes from a number or a string such as ``"512M"``, ``"4G"``, ``"1.5GB"`` (binary units)."""
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B") if not isinstance(value, int) else None
    if isinstance(value, bool):
        text = "?"
    if text is None:
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[0-9]+)?)\s*([KMGT]?)", text)
        if match is None:
            raise ConfigError(f"{key}={value!r}: give bytes or a size such as 512M or 4G")
        number, unit = float(match[1]), match[2]
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"{key}={value!r}: give bytes or a size such as 512M or 4G")
    return size


def format_bytes(size: float) -> str:
    """``"1.3G"``-style: the shortest binary unit under 1024 (how ``index.memory`` is written)."""
    for unit in ("B", "K", "M", "G"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.3g}{unit}"
        size /= 1024
    return f"{size:.3g}T"


# -- the choice -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexChoice:
    """One faiss index for ``n`` x ``d`` vectors: its kind, factory string and estimated bytes."""

    kind: str  # flat | hnsw | ivf_flat | ivf_pq
    key: str
    estimated_bytes: int
    nlist: int = 0
    hnsw_m: int = 0
    code_bytes: int = 0

    @property
    def tuned(self) -> str:
        """The search parameter tuned to the recall target (empty for ``flat``)."""
        return _TUNED.get(self.kind, ("",))[0]


def nlist_for(n: int, train_size: int) -> int:
    """k-means cells: the power of two nearest 4 sqrt(n), at most one per 39 training vectors."""
    cells = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    most = max(1, train_size // POINTS_PER_CENTROID)
    return max(1, min(cells, 2 ** int(math.log2(most))))


def flat_choice(n: int, d: int) -> IndexChoice:
    return IndexChoice("flat", "Flat", 4 * n * d + _HEADER_BYTES)


def hnsw_choice(n: int, d: int, m: int) -> IndexChoice:
    """Rows in float32, ``2m`` int32 links at level 0 plus ~m/(m-1) above, an 8-byte offset and a level each."""
    links = 4 * (2 * m + m / (m - 1)) * 1.02  # levels above 0: a vector reaches level l with probability m ** -l
    return IndexChoice("hnsw", f"HNSW{m}", int(n * (4 * d + links + 12)) + _HEADER_BYTES, hnsw_m=m)


def ivf_flat_choice(n: int, d: int, train_size: int) -> IndexChoice:
    nlist = nlist_for(n, train_size)
    size = n * (4 * d + 8) + nlist * (4 * d + 16) + _HEADER_BYTES
    return IndexChoice("ivf_flat", f"IVF{nlist},Flat", size, nlist=nlist)


def ivf_pq_choice(n: int, d: int, code_bytes: int, train_size: int) -> IndexChoice | None:
    """``code_bytes`` a vector as ``2 code_bytes`` 4-bit codes; None unless they divide ``d``."""
    sub = 2 * code_bytes  # 4-bit sub-quantisers
    if d % sub:
        return None
    nlist = nlist_for(n, train_size)
    size = (
        n * (code_bytes + 8)  # codes and ids
        + nlist * (4 * d + 16 + 32 * code_bytes)  # centroids, list sizes, codes padded to blocks of 32 vectors
        + 4 * d * 16  # PQ codebooks
        + _HEADER_BYTES
    )
    return IndexChoice("ivf_pq", f"IVF{nlist},PQ{sub}x4fs", size, nlist=nlist, code_bytes=code_bytes)


def candidate_indexes(n: int, d: int, memory: int, train_size: int) -> list[IndexChoice]:
    """The indexes autofaiss would consider for ``n`` x ``d`` vectors, best first (see the module docstring)."""
    if n < FLAT_BELOW:
        return [flat_choice(n, d)]
    m = int((memory / (4 * n) - d) // 2)
    graph = [hnsw_choice(n, d, min(m, 32))] if m >= 8 else []
    if n < QUANTISE_FROM:
        return [*graph, flat_choice(n, d)]
    listed = list(graph)
    if n < IVF_FLAT_BELOW:
        listed.append(ivf_flat_choice(n, d, train_size))
    listed += [c for b in PQ_BYTES if b < d and (c := ivf_pq_choice(n, d, b, train_size)) is not None]
    return listed


def choose_index(n: int, d: int, memory: int, train_size: int = 65_536) -> IndexChoice:
    """The first of :func:`candidate_indexes` within ``memory`` bytes; a ConfigError naming the smallest that
    fits when none does."""
    listed = candidate_indexes(n, d, memory, min(train_size, n))
    for choice in listed:
        if choice.estimated_bytes <= memory:
            return choice
    smallest = min(listed, key=lambda c: c.estimated_bytes)
    if n < QUANTISE_FROM and n >= FLAT_BELOW:
        smallest = min([smallest, hnsw_choice(n, d, 8)], key=lambda c: c.estimated_bytes)
    raise ConfigError(
        f"index.memory={format_bytes(memory)} is too small for {n:,} x {d} vectors: the smallest index that fits "
        f"them, {smallest.key}, needs {format_bytes(smallest.estimated_bytes)} ({smallest.estimated_bytes:,} "
        f"bytes); give index.memory={format_bytes(smallest.estimated_bytes * 1.01)} or more"
        + (" (compressed indexes need at least 10,000 vectors)" if n < QUANTISE_FROM else "")
    )


# -- options ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetOptions:
    """``index.memory`` / ``index.recall`` and the tuning settings (conf/index.yaml documents each)."""

    memory: int
    recall: float = 0.95
    #: held-out database rows the search parameter is tuned and measured on
    tune_queries: int = 1000
    #: the top-k that recall is measured at
    k: int = 10
    #: rows the compressed index proposes per query, re-scored exactly (at least k)
    candidates: int = 100
    train_size: int = 65_536
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> BudgetOptions | None:
        """None when ``memory`` is unset (no stored index); a ConfigError naming the bad key otherwise."""
        config = dict(config or {})
        if config.get("memory") in (None, ""):
            return None
        keys = ("memory", "recall", "tune_queries", "candidates", "train_size")  # what conf/index.yaml exposes
        values = {key: config[key] for key in keys if config.get(key) is not None}
        values["memory"] = parse_memory(values["memory"])
        recall = values.get("recall", cls.recall)
        if isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1:
            raise ConfigError(f"index.recall={recall!r}: a recall@10 target in (0, 1], e.g. 0.95")
        for key in ("tune_queries", "k", "candidates", "train_size", "seed"):
            value = values.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
                raise ConfigError(f"index.{key}={value!r}: must be a whole number >= {0 if key == 'seed' else 1}")
        return cls(**{**values, "recall": float(recall)})

    def settings(self) -> dict[str, Any]:
        """What the manifest records: an update rebuilds the stored index when these change."""
        return asdict(self)


# -- building and tuning ----------------------------------------------------------------------------------------
@dataclass
class BuiltIndex:
    """A built and tuned faiss index, its serialisation (made once: it is as large as the index) and what the
    manifest records about it."""

    index: Any
    info: dict[str, Any]
    data: np.ndarray

    def serialize(self) -> np.ndarray:
        """The faiss file's bytes (a uint8 array, not a copy)."""
        return self.data


def build_budgeted_index(database: np.ndarray, options: BudgetOptions, choice: IndexChoice | None = None) -> BuiltIndex:
    """Choose (:func:`choose_index`), train, fill and tune an index over ``database`` (N x D, float16 or float32
    rows, a memory map works) within ``options.memory``; a ConfigError when the budget or the recall target
    cannot be met (naming the smallest index that fits, or the best recall reached). ``choice``: this index
    instead of the chosen one (benchmarks compare them)."""
    faiss = import_faiss()
    started = time.perf_counter()
    n, d = (int(s) for s in database.shape)
    rng = np.random.default_rng(options.seed)
    held_out = np.sort(rng.choice(n, size=min(options.tune_queries, max(1, n // 10)), replace=False))
    rest = np.setdiff1d(np.arange(n), held_out, assume_unique=True)
    train_rows = np.sort(rng.choice(rest, size=min(options.train_size, len(rest)), replace=False))
    choice = choice or choose_index(n, d, options.memory, len(train_rows))
    index = faiss.index_factory(d, choice.key, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(_float32(database[train_rows]))
    train_seconds = time.perf_counter() - started
    buffer = np.empty((min(n, _ADD_BLOCK), d), dtype=np.float32)
    for start in range(0, n, _ADD_BLOCK):
        index.add(_float32(database[start : start + _ADD_BLOCK], buffer))
    del buffer
    build_seconds = time.perf_counter() - started
    data = faiss.serialize_index(index)
    size = int(data.size)
    if size > options.memory:
        raise ConfigError(
            f"index.memory={format_bytes(options.memory)}: the {choice.key} index built holds {format_bytes(size)} "
            f"({size:,} bytes), over the budget although estimated at {format_bytes(choice.estimated_bytes)}; "
            f"give index.memory={format_bytes(size * 1.01)} or more"
        )
    tuning = tune(index, choice, database, held_out, options)
    info = {
        "kind": choice.kind,
        "key": choice.key,
        "params": {k: v for k, v in asdict(choice).items() if k in ("nlist", "hnsw_m", "code_bytes") and v},
        "bytes": size,
        "estimated_bytes": choice.estimated_bytes,
        "settings": options.settings(),
        "train_vectors": int(len(train_rows)) if choice.kind not in ("flat", "hnsw") else 0,
        "build_seconds": round(build_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "tune_seconds": round(time.perf_counter() - started - build_seconds, 3),
        **tuning,
    }
    return BuiltIndex(index, info, data)


def set_search_parameter(index: Any, name: str, value: int) -> None:
    """``nprobe`` or ``efSearch`` of ``index`` (through any pre-transform); nothing for a flat index."""
    if name:
        import_faiss().ParameterSpace().set_index_parameter(index, name, int(value))


def tune(index: Any, choice: IndexChoice, database: np.ndarray, rows: np.ndarray, options: BudgetOptions) -> dict:
    """The smallest search parameter whose recall@k on ``rows`` (as queries) reaches ``options.recall``, with
    the recall and queries/s measured there and those of exact search; a ConfigError with the best recall
    reached when even the greatest value falls short."""
    k = options.k
    queries = _float32(np.asarray(database[rows]))
    started = time.perf_counter()
    _, truth = ExactSearch(database).search(queries, k + 1)
    exact_seconds = time.perf_counter() - started
    truth = _without_self(truth, rows, k)
    engine = StoredIndexSearch(index, database, candidates=options.candidates)
    name, least, most = _TUNED.get(choice.kind, ("", 0, 0))
    most = min(most or choice.nlist, choice.nlist or most or 1)
    if name == "efSearch":
        most = min(most, len(database))

    def measure(value: int) -> tuple[float, float]:
        set_search_parameter(index, name, value)
        begun = time.perf_counter()
        _, found = engine.search(queries, k + 1)
        seconds = time.perf_counter() - begun
        return recall_at(_without_self(found, rows, k), truth, k), seconds

    tried: dict[int, tuple[float, float]] = {}
    value = least
    while True:  # doubling up to the first value that reaches the target
        tried[value] = measure(value)
        if tried[value][0] >= options.recall or value >= most or not name:
            break
        value = min(2 * value, most)
    if tried[value][0] < options.recall:
        best = max(tried, key=lambda v: tried[v][0])
        raise ConfigError(
            f"index.recall={options.recall:g} cannot be met within index.memory={format_bytes(options.memory)} by "
            f"{choice.key}: the best recall@{k} reached is {tried[best][0]:.3f}"
            + (f" ({name}={best})" if name else "")
            + f" on {len(rows)} held-out vectors; lower index.recall or raise index.memory"
        )
    low = max((v for v in tried if tried[v][0] < options.recall), default=None)
    while low is not None and value - low > max(1, value // 8):  # bisection to within 1/8 of the value
        middle = (low + value) // 2
        tried[middle] = measure(middle)
        if tried[middle][0] >= options.recall:
            value = middle
        else:
            low = middle
    set_search_parameter(index, name, value)
    recall, _ = tried[value]
    seconds = min(measure(value)[1], tried[value][1])  # the better of two timings: one may have been preempted
    return {
        "search_parameter": {name: value} if name else {},
        "candidates": options.candidates,
        "recall_at_10" if k == 10 else f"recall_at_{k}": round(recall, 4),
        "queries_per_s": round(len(rows) / seconds, 1),
        "exact_queries_per_s": round(len(rows) / exact_seconds, 1),
        "tune_queries": int(len(rows)),
        "tuning": {str(v): round(r, 4) for v, (r, _) in sorted(tried.items())},
    }


def _without_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's top-k without its own row (queries are database rows)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for q, (hits, own) in enumerate(zip(found, rows, strict=True)):
        kept = hits[(hits != own) & (hits >= 0)][:k]
        out[q, : len(kept)] = kept
    return out


# -- the stored index -------------------------------------------------------------------------------------------
def load_stored_index(index: RetrievalIndex) -> StoredIndexSearch | None:
    """The search over ``index``'s stored budgeted index (None when it has none): the faiss file checked against
    the manifest's sha256, its tuned search parameter set, candidates re-ranked from ``index.embeddings``."""
    info = index.manifest.get("search_index")
    if not info:
        return None
    path = index.path / index.version / SEARCH_INDEX_FILE
    rebuild = f"rebuild it with `oxford-ir-index images=... out={index.path} index.memory=...`"
    try:
        expected = index.manifest["files"][SEARCH_INDEX_FILE]["sha256"]
        data = path.read_bytes()
    except (KeyError, TypeError, OSError) as error:
        raise IndexFormatError(
            f"index {index.path}: its search index {path} is missing or unlisted ({error}); {rebuild}"
        ) from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise IndexFormatError(f"index {index.path}: {path} does not match the sha256 in the manifest; {rebuild}")
    faiss = import_faiss()
    stored = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if stored.ntotal != len(index) or stored.d != index.embedding_dim:
        raise IndexFormatError(f"index {index.path}: {path} holds {stored.ntotal} x {stored.d} vectors; {rebuild}")
    for name, value in (info.get("search_parameter") or {}).items():
        set_search_parameter(stored, str(name), int(value))
    return StoredIndexSearch(stored, index.embeddings, candidates=int(info.get("candidates", 100)))


def describe_stored_index(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """What ``oxford-ir-search --info`` and the web page show of the stored index (None when there is none)."""
    info = manifest.get("search_index")
    if not info:
        return None
    settings = info.get("settings", {})
    return {
        "index": info.get("key"),
        "kind": info.get("kind"),
        "search_parameter": info.get("search_parameter", {}),
        "candidates": info.get("candidates"),
        "bytes": info.get("bytes"),
        "memory_budget": settings.get("memory"),
        "recall_target": settings.get("recall"),
        "recall_at_10": info.get("recall_at_10"),
        "queries_per_s": info.get("queries_per_s"),
        "exact_queries_per_s": info.get("exact_queries_per_s"),
        "tune_queries": info.get("tune_queries"),
        "build_seconds": info.get("build_seconds"),
    }
