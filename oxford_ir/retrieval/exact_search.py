"""Exact (brute-force) cosine search: ``queries @ database.T`` by blocks, top-k merged across blocks.

Index rows and query embeddings are L2-normalised, so the inner product is the cosine similarity. Every path
ranks the same way: best first, equal scores by the lower database row, NaN scores last (as -inf); results
are deterministic and, on the CPU, equal to the full ranking of
:func:`~oxford_ir.benchmarks.ranking.rank_database`. The top-k of a block of scores is taken through the maxima
of groups of columns (:func:`_grouped_top_k`: one extra read of the scores, then a selection among a few
thousand values instead of every score), by int64 keys that hold score and row (:func:`_top_k`: no tie is
left to chance, and nothing waits for the host), and merged across blocks the same way.

Where and how the products run (``device``):

- **CPU**: float32 products (``rows @ queries.T``, MKL) of float32 queries and float32 rows, exact up to the
  float32 rounding of the sums. A float32 database is multiplied as it is. A float16 or bfloat16 one (a memory
  map works) is streamed: chunks of :data:`_CHUNK_BYTES` of float32 (16 MiB: 2048 rows of 2048) are upcast by
  torch into one buffer of the call and multiplied at once, while they are still in cache. Before, each block
  of 8192 rows was upcast into a freshly allocated 64 MiB tensor: page faults, a write to RAM and a read back,
  which cost as much as the products.

  Measured on this project's 2-core machine (AMD EPYC, shared with other jobs; 262k x 2048 float16, 64
  queries, top 10, best of 3), against the float32 products of the same shapes on one float32 block of 8192
  rows (the benchmark's ceiling): one thread, ceiling 2.09-2.18 s, streamed 2.21 s (0.95-0.99; chunks of 2
  MiB: 2.01 s), the former fresh blocks 4.82 s (0.45), a float32 copy of the whole database held in RAM 2.15 s.
  Two threads while other jobs loaded the cores (load 7): ceiling 2.6-2.8 s, streamed 2.9-5.9 s, the former
  4.8-8.6 s, a float32 copy 3.1 s; every chunk is a parallel region that waits for a descheduled thread, which
  is why the chunks are not smaller (2-4 MiB: 9.4 s under that load) nor larger (64 MiB: 2.8 s one-threaded).
  No float32 copy is kept: it would triple the memory of a float16 index (and load a memory-mapped one) for
  no gain on cores to itself (also none for 1 and 8 queries on 5k and 50k rows), only on contended ones. Not
  chosen either: bfloat16 products (AVX512-BF16) round float16 rows from 10 to 7 mantissa bits and return
  bfloat16 scores (torch has no float32 output for them on the CPU), which is not exact; overlapping the upcast
  with the products on other threads gains nothing when the upcast is a few percent of the time and every
  core multiplies. ``experiments/bench`` has the row for 1M x 2048 (``exact search CPU``) against the float32
  products of the same shapes, measured in the same run.
- **CUDA**: the database is uploaded once, at construction, and stays on the device in float16 (bfloat16 when
  it is given as a bfloat16 tensor, or with ``dtype``). Queries are cast to the same half type on the host,
  uploaded from pinned memory and multiplied in batches of :data:`_DEVICE_QUERY_BATCH` against blocks of rows
  (float32 scores of at most :data:`_DEVICE_BLOCK_ELEMENTS`) by one cuBLAS call each on tensor cores, with
  float32 accumulation and float32 scores (``torch.mm(..., out_dtype=torch.float32)``; torch's
  reduced-precision reduction switches are off around the search, :func:`exact_half_products`). Top-k and
  merge on the device; one synchronisation, when the k best come back as numpy arrays. Rounding the queries
  to half precision moves scores by about 1e-3, so near-ties may order differently from the CPU path.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.errors import ConfigError

#: CPU: floats held by one block of scores (rows x queries); top-k is taken per block and merged
_BLOCK_ELEMENTS = 1 << 24
#: CPU: bytes of float32 rows upcast and multiplied at a time (2048 rows of 2048); see the module docstring
_CHUNK_BYTES = 1 << 24
#: CUDA: float32 scores of one block (queries x rows): 1 GiB
_DEVICE_BLOCK_ELEMENTS = 1 << 28
#: CUDA: queries multiplied at once (1024 x 2048 half queries: the products are compute-bound)
_DEVICE_QUERY_BATCH = 1024
#: columns per group of the grouped top-k: the power of two nearest sqrt(columns / k), so that the maxima
#: (columns / group) and the candidates (k x group) are about as many, within these bounds
_GROUP_BOUNDS = (8, 256)
#: rows uploaded to the device at a time (float16 copies of this many values)
_UPLOAD_ELEMENTS = 1 << 24
#: scores of finite queries and rows stay finite while |q|max x |row|max x D is below this
_FINITE_PRODUCTS = 1e37
HALF_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ExactSearch:
    """Brute-force cosine search: ``queries @ database.T`` by blocks, top-k merged across blocks.

    ``database``: N x D with L2-normalised rows; a numpy array (float16 or float32; a memory map works) or a
    torch tensor (float16, bfloat16 or float32; on the CPU or already on ``device``). ``device``: a CUDA
    device, or anything else for the CPU (the module docstring says how each searches). ``dtype``: the half
    type the database is held in on a CUDA device (default float16; bfloat16 when the database is a bfloat16
    tensor); unused on the CPU. ``block_rows``: rows per block of scores (default: by memory budget).

    Safe to share between threads: a search keeps its buffers to itself.
    """

    def __init__(
        self,
        database: np.ndarray | torch.Tensor,
        *,
        block_rows: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if database.ndim != 2:
            raise ValueError(f"database must be N x D, got shape {tuple(database.shape)}")
        self.database = database
        self.n, self.dim = (int(s) for s in database.shape)
        if self.n >= 1 << 32:
            raise ValueError(f"database has {self.n} rows; exact search ranks at most 2**32 - 1")
        self.device = torch.device(device)
        if block_rows is not None and int(block_rows) < 1:
            raise ValueError(f"block_rows={block_rows!r}: must be at least 1")
        self._given_block_rows = None if block_rows is None else int(block_rows)
        #: rows per block of scores (on CUDA the default depends on the query batch; this is the one of 1024)
        self.block_rows = self._given_block_rows or (
            _device_block_width(_DEVICE_QUERY_BATCH)
            if self.device.type == "cuda"
            else max(1, _BLOCK_ELEMENTS // max(1, self.dim))
        )
        self._source = _as_tensor(database)  # a CPU view of the rows (None: numpy slices are converted)
        self._float32: torch.Tensor | None = None  # CPU: the rows, when they are float32 already
        self._rows: torch.Tensor | None = None  # CUDA: the resident half-precision rows
        self._abs_max = math.inf
        if self.device.type == "cuda":
            self.dtype = _half_type(dtype, database)
            self._rows, self._abs_max = self._upload()
        else:
            self.device = torch.device("cpu")
            self.dtype = torch.float32
            if self._source is not None and self._source.dtype == torch.float32:
                self._float32 = self._source

    @property
    def query_batch(self) -> int:
        """Queries multiplied at once."""
        return _DEVICE_QUERY_BATCH if self._rows is not None else max(1, _BLOCK_ELEMENTS // self.block_rows)

    @property
    def chunk_rows(self) -> int:
        """CPU: rows multiplied at once within a block (upcast together when the rows are not float32)."""
        if self._float32 is not None or self._rows is not None:
            return self.block_rows
        return max(1, min(self.block_rows, _CHUNK_BYTES // (4 * max(1, self.dim))))

    @property
    def streamed(self) -> bool:
        """CPU: whether the rows are upcast to float32 chunk by chunk in each search (they are not float32)."""
        return self.device.type == "cpu" and self._float32 is None

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, indices)`` as numpy arrays, each nq x min(k, N), best first (float32, int64)."""
        if torch.is_tensor(queries):
            q = queries.detach().to("cpu", torch.float32)
        else:
            q = _as_tensor(np.asarray(queries, dtype=np.float32), required=True)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be nq x {self.dim} (the database's dimension), got {tuple(q.shape)}")
        nq, k = q.shape[0], min(int(k), self.n)
        if nq == 0 or k <= 0:
            return np.zeros((nq, max(k, 0)), np.float32), np.zeros((nq, max(k, 0)), np.int64)
        if self._rows is not None:
            scores, indices = self._search_device(q, k)
        else:
            scores, indices = self._search_cpu(q.contiguous(), k)
        return scores.numpy(), indices.numpy()

    def rank_all(self, queries: np.ndarray) -> np.ndarray:
        """All rows per query (n_db x nq), by ``rank_database``: the ranking code of ``oxford-ir-eval``."""
        rows = self._float32 if self._float32 is not None else self._cpu_float32()
        return rank_database(rows, np.asarray(queries, dtype=np.float32))

    def __repr__(self) -> str:
        held = str(self.dtype if self._rows is not None else self.database.dtype).replace("torch.", "")
        return f"{type(self).__name__}({self.n} x {self.dim}, {held}, {self.device})"

    # -- CPU ---------------------------------------------------------------------------------------------------
    def _search_cpu(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        block_rows, query_batch, chunk = self.block_rows, self.query_batch, min(self.chunk_rows, self.n)
        buffer = torch.empty(chunk, self.dim) if self._float32 is None else None  # this call's own
        found_s, found_i = [], []
        for q0 in range(0, queries.shape[0], query_batch):
            q = queries[q0 : q0 + query_batch]
            best_s, best_i = torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.int64)
            for start in range(0, self.n, block_rows):
                stop = min(start + block_rows, self.n)
                scores = torch.empty(stop - start, len(q))  # rows x queries: MKL's faster orientation here
                for c0 in range(start, stop, chunk):
                    c1 = min(c0 + chunk, stop)
                    torch.mm(self._cpu_rows(c0, c1, buffer), q.T, out=scores[c0 - start : c1 - start])
                scores = _nan_last(scores.T.contiguous())
                s, i = _grouped_top_k(scores, min(k, stop - start))
                best_s, best_i = _merge(best_s, best_i, s, i + start, k)
            found_s.append(best_s)
            found_i.append(best_i)
        return torch.cat(found_s), torch.cat(found_i)

    def _cpu_rows(self, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """Rows ``start:stop`` as float32: a view of the float32 rows, or upcast into ``buffer``."""
        if self._float32 is not None:
            return self._float32[start:stop]
        assert buffer is not None
        out = buffer[: stop - start]
        return out.copy_(self._slice(start, stop))

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the database as a CPU tensor of its own dtype (no copy where possible)."""
        if self._source is not None:
            return self._source[start:stop]
        if torch.is_tensor(self.database):  # on a device: searched on the CPU
            return self.database[start:stop].detach().cpu()
        return _as_tensor(np.ascontiguousarray(self.database[start:stop]), required=True)

    def _cpu_float32(self) -> torch.Tensor:
        """All rows as one float32 CPU tensor (a view when they are float32 already)."""
        if torch.is_tensor(self.database):
            return self.database.detach().to("cpu", torch.float32)
        return _as_tensor(np.asarray(self.database, dtype=np.float32), required=True)

    # -- CUDA --------------------------------------------------------------------------------------------------
    def _upload(self) -> tuple[torch.Tensor, float]:
        """The rows on the device in ``self.dtype``, uploaded in chunks, and their largest magnitude."""
        device, dtype = self.device, self.dtype
        if torch.is_tensor(self.database) and self.database.device == device and self.database.dtype == dtype:
            rows = self.database.detach()
            return rows, float(rows.abs().amax()) if rows.numel() else 0.0
        need = self.n * self.dim * torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise ConfigError(
                f"exact search on {device}: the index ({self.n:,} x {self.dim}, {need / 2**30:.1f} GiB in "
                f"{dtype}) does not fit in its {free / 2**30:.1f} GiB of free memory; search on the CPU "
                "(extraction.device=cpu) or with backend=faiss"
            )
        rows = torch.empty(self.n, self.dim, dtype=dtype, device=device)
        abs_max = torch.zeros((), device=device)
        step = max(1, _UPLOAD_ELEMENTS // max(1, self.dim))
        for start in range(0, self.n, step):
            stop = min(start + step, self.n)
            tensor = torch.is_tensor(self.database)
            part = self.database[start:stop].detach() if tensor else self._slice(start, stop)
            target = rows[start:stop]
            target.copy_(part.to(dtype) if part.device.type == "cpu" else part)  # half on the host: half the bytes
            abs_max = torch.maximum(abs_max, target.abs().amax().float())  # NaN stays NaN
        return rows, float(abs_max)

    def _search_device(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._rows is not None
        half = queries.to(self.dtype)
        bound = self._abs_max * float(half.abs().amax()) * self.dim
        finite = bound < _FINITE_PRODUCTS  # else some scores may be NaN: cleaned per block (NaN < x is False)
        if torch.cuda.is_available():  # pinned: an asynchronous upload, 4 MiB for 1024 queries of 2048
            half = half.pin_memory()
        with exact_half_products():
            scores, indices = search_resident(
                self._rows, half.to(self.device, non_blocking=True), k, block_rows=self._given_block_rows, finite=finite
            )
        return scores.cpu(), indices.cpu()


def search_resident(
    rows: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    block_rows: int | None = None,
    finite: bool = False,
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(scores, rows)`` of half-precision ``queries`` in half-precision ``rows`` on their device.

    The CUDA path of :class:`ExactSearch` (it also runs on the CPU, with float32 products, for the tests).
    ``finite``: the caller knows every score is finite (no NaN cleaning pass). Never synchronises with the host.
    """
    n, device = rows.shape[0], rows.device
    k = min(int(k), n)
    found_s, found_i = [], []
    for q0 in range(0, queries.shape[0], _DEVICE_QUERY_BATCH):
        q = queries[q0 : q0 + _DEVICE_QUERY_BATCH]
        width = block_rows or _device_block_width(len(q))
        best_s = torch.empty(len(q), 0, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.int64, device=device)
        for start in range(0, n, width):
            scores = half_product(q, rows[start : start + width])
            if not finite:
                _nan_last(scores)
            s, i = _grouped_top_k(scores, min(k, scores.shape[1]), group)
            best_s, best_i = _merge(best_s, best_i, s, i + start, k)
        found_s.append(best_s)
        found_i.append(best_i)
    return torch.cat(found_s), torch.cat(found_i)


def half_product(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``queries @ rows.T`` of two half-precision tensors as float32 scores, accumulated in float32.

    On CUDA one cuBLAS call on tensor cores (``out_dtype=torch.float32``; call it inside
    :func:`exact_half_products`); elsewhere, or with a torch without ``out_dtype``, both are upcast first.
    """
    if queries.device.type == "cuda" and _HAS_OUT_DTYPE:
        return torch.mm(queries, rows.T, out_dtype=torch.float32)
    return queries.float() @ rows.float().T


_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
#: cuBLAS switches that would let a half-precision product reduce (split-K) or accumulate in half precision
#: (and, where the products are upcast first, TF32 for the float32 ones)
_REDUCED_PRECISION_FLAGS = (
    "allow_fp16_reduced_precision_reduction",
    "allow_bf16_reduced_precision_reduction",
    "allow_fp16_accumulation",
) + (() if _HAS_OUT_DTYPE else ("allow_tf32",))
_flags_lock = threading.Lock()
_flags_users = 0
_flags_saved: dict[str, Any] = {}


@contextlib.contextmanager
def exact_half_products() -> Iterator[None]:
    """Half-precision matrix products with float32 accumulation throughout: torch's reduced-precision
    reduction flags are off inside, and restored when the last thread using them leaves."""
    global _flags_users
    matmul = torch.backends.cuda.matmul
    with _flags_lock:
        if _flags_users == 0:
            _flags_saved.clear()
            for name in _REDUCED_PRECISION_FLAGS:
                try:
                    value = getattr(matmul, name)
                except AttributeError:  # an older torch without this flag
                    continue
                with contextlib.suppress(AttributeError):  # the split-K half of the setting, where torch has one
                    value = (value, getattr(matmul, f"{name}_split_k"))
                _flags_saved[name] = value
                setattr(matmul, name, False)
        _flags_users += 1
    try:
        yield
    finally:
        with _flags_lock:
            _flags_users -= 1
            if _flags_users == 0:
                for name, value in _flags_saved.items():
                    setattr(matmul, name, value)


# -- ranking -----------------------------------------------------------------------------------------------------
def _top_k(scores: torch.Tensor, k: int, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of a score matrix: ``(values, columns)``, best first, equal scores by the lower column,
    NaN as -inf; ``columns`` (same shape, distinct per row, below 2**32) names the columns, default 0, 1, ...

    One ``topk`` over int64 keys that hold the score in their high half (its float32 bits made to order as
    integers) and the complement of the column in their low half: no two keys are equal, so no tie is left to
    chance, and nothing waits for the host.
    """
    values = _nan_last(scores + 0.0)  # a copy; -0.0 becomes 0.0: equal scores, equal keys
    bits = values.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    if columns is None:
        columns = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    keys = ordered * (1 << 32) + (0xFFFFFFFF - columns)
    top = keys.topk(min(k, scores.shape[1]), dim=1).indices
    return values.gather(1, top), columns.gather(1, top)


def _nan_last(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores replaced by -inf, in place (infinities stay as they are)."""
    return scores.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _merge(
    best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor, new_i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of two candidate lists of the same queries (scores and database rows)."""
    return _top_k(torch.cat([best_s, new_s], dim=1), k, columns=torch.cat([best_i, new_i], dim=1))


def _grouped_top_k(scores: torch.Tensor, k: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_top_k` of NaN-free ``scores`` through the maxima of groups of ``group`` columns (default: see
    :data:`_GROUP_BOUNDS`).

    Each row's k best columns lie in its k best groups, ranked by their maximum with ties to the lower group:
    a column outside them is outranked by the maximum of each of the k groups (a greater score, or an equal
    one in a lower column), so it is not among the k best. The last group is padded with -inf, which ranks
    below every real column (equal ones are in lower columns). Falls back to :func:`_top_k` where the
    groups would not reduce the work (k x group above a quarter of the columns).
    """
    width = scores.shape[1]
    if group is None:
        low, high = _GROUP_BOUNDS
        group = min(high, max(low, 1 << round(math.log2(max(1.0, width / max(1, k))) / 2)))
    if k * group * 4 > width:
        return _top_k(scores, k)
    pad = -width % group
    if pad:
        scores = F.pad(scores, (0, pad), value=-math.inf)
    maxima = scores.view(scores.shape[0], -1, group).amax(dim=2)
    _, groups = _top_k(maxima, k)
    columns = (groups.unsqueeze(2) * group + torch.arange(group, device=scores.device)).flatten(1)
    return _top_k(scores.gather(1, columns), k, columns=columns)


# -- helpers -----------------------------------------------------------------------------------------------------
def _device_block_width(queries: int) -> int:
    """CUDA: rows per block of scores for a batch of ``queries`` (a multiple of the largest group size)."""
    largest = _GROUP_BOUNDS[1]
    return max(largest, _DEVICE_BLOCK_ELEMENTS // max(1, queries) // largest * largest)


def _half_type(dtype: str | torch.dtype | None, database: Any) -> torch.dtype:
    if dtype is None:
        bf16 = torch.is_tensor(database) and database.dtype == torch.bfloat16
        return torch.bfloat16 if bf16 else torch.float16
    if isinstance(dtype, str):
        if dtype not in HALF_TYPES:
            raise ConfigError(f"exact search dtype={dtype!r}: choose one of {', '.join(HALF_TYPES)}")
        return HALF_TYPES[dtype]
    if dtype not in HALF_TYPES.values():
        raise ConfigError(f"exact search dtype={dtype}: on a GPU the database is held in float16 or bfloat16")
    return dtype


def _as_tensor(array: Any, *, required: bool = False) -> torch.Tensor | None:
    """A CPU tensor sharing the memory of a numpy array (or the tensor itself, on the CPU); None where torch
    cannot view it (e.g. negative strides), unless ``required``. A read-only memory map is only read, so
    torch's warning about writing to it does not apply."""
    if torch.is_tensor(array):
        return array.detach() if array.device.type == "cpu" else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        try:
            return torch.from_numpy(array)
        except (TypeError, ValueError):
            if required:
                return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
            return None
