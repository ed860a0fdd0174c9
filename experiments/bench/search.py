"""Search queries/s over an N x D float16 database, and faiss IVF-PQ recall@10 against exact search.

The vectors are a mixture of clusters, each a low-dimensional (``rank``) patch around its centre plus
isotropic noise, L2-normalised: nearest neighbours are then a property of the data (close in the patch)
instead of the ties of concentrated random Gaussian vectors, so recall@10 means something. The database
rows are grouped by cluster (the order matters to no method measured here); queries are fresh draws from
the same mixture.

- ``exact_cpu``: the project's :class:`~oxford_ir.retrieval.search.ExactSearch` (float16 rows upcast one
  block at a time, block matrix products, top-k merged across blocks). Ceiling: the same matrix products on
  one block already in float32, without upcasting or top-k.
- ``exact_cuda``: the same algorithm in torch on the GPU (database resident in float16 on the device,
  each block upcast to float32, products without TF32, top-k per block, merged). Ceiling: the products on a
  float32 block already on the device.
- ``ivfpq``: the project's :class:`~oxford_ir.retrieval.faiss_backend.FaissSearch` (``index_type=ivfpq``);
  recall@10 = share of exact search's top 10 found in its top 10, averaged over the queries.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from experiments.bench import common
from oxford_ir.retrieval.exact_search import ExactSearch

#: std of a uniform byte, to turn random bytes into unit-variance noise (far cheaper than Gaussian draws)
_BYTE_STD = math.sqrt((256**2 - 1) / 12)


class ClusterMixture:
    """``clusters`` components in ``dim`` dimensions: centre (norm ~1) + ``spread`` x a ``rank``-dimensional
    Gaussian patch + ``noise`` x isotropic noise, each row L2-normalised; deterministic in ``seed``."""

    def __init__(self, dim: int, clusters: int, rank: int, spread: float, noise: float, seed: int) -> None:
        self.dim, self.clusters, self.rank = int(dim), int(clusters), int(rank)
        self.spread, self.noise, self.seed = float(spread), float(noise), int(seed)

    def component(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre (D) and patch basis (rank x D) of component ``c`` (float32, CPU)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        centre = torch.randn(self.dim, generator=generator) / math.sqrt(self.dim)
        basis = torch.randn(self.rank, self.dim, generator=generator) / math.sqrt(self.dim)
        return centre, basis

    def sample(self, n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` float16 rows on ``device``, grouped by component."""
        device = torch.device(device)
        rng = np.random.default_rng([self.seed, seed])
        counts = rng.multinomial(n, np.full(self.clusters, 1.0 / self.clusters))
        out = torch.empty(n, self.dim, dtype=torch.float16, device=device)
        cuda_generator = torch.Generator(device).manual_seed(seed) if device.type == "cuda" else None
        noise_scale = self.noise / math.sqrt(self.dim)
        patch_scale = self.spread / math.sqrt(self.rank)
        row = 0
        for c, m in enumerate(counts.tolist()):
            if m == 0:
                continue
            centre, basis = (t.to(device) for t in self.component(c))
            z = torch.from_numpy(rng.standard_normal((m, self.rank), dtype=np.float32)).to(device)
            # few passes over memory: the CPU profile draws a million rows of 2048 floats
            if cuda_generator is not None:
                x = torch.addmm(centre, z, basis, alpha=patch_scale)
                x.add_(torch.randn(m, self.dim, device=device, generator=cuda_generator), alpha=noise_scale)
            else:  # uniform bytes as unit-variance noise: Gaussian draws would take most of the time
                x = torch.addmm(centre - 127.5 * noise_scale / _BYTE_STD, z, basis, alpha=patch_scale)
                noise = torch.from_numpy(rng.integers(0, 256, (m, self.dim), dtype=np.uint8))
                x.add_(noise, alpha=noise_scale / _BYTE_STD)
            torch.div(x, torch.linalg.vector_norm(x, dim=1, keepdim=True), out=out[row : row + m])
            row += m
        return out


def mixture(settings: Mapping[str, Any]) -> ClusterMixture:
    return ClusterMixture(
        int(settings["dim"]),
        int(settings["clusters"]),
        int(settings["rank"]),
        float(settings["spread"]),
        float(settings["noise"]),
        int(settings.get("seed", 0)),
    )


def data(settings: Mapping[str, Any], n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(database N x D float16, queries nq x D float32) on ``device``, and the seconds it took to draw them."""
    vectors = mixture(settings)
    start = time.perf_counter()
    database = vectors.sample(n, seed=1, device=device)
    queries = vectors.sample(int(settings["queries"]), seed=2, device=device).float()
    return database, queries, common.now(device) - start


# -- exact search on the CPU ------------------------------------------------------------------------------------
def measure_exact_cpu(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    device = torch.device("cpu")
    n, k = int(settings["n"]), int(settings["k"])
    database, queries, generated = data(settings, n, device)
    db, q = database.numpy(), queries.numpy()
    engine = ExactSearch(db)
    engine.search(q[:1], k)  # warm-up (thread pool, first allocation of a block)
    start = time.perf_counter()
    _, indices = engine.search(q, k)
    elapsed = time.perf_counter() - start
    return {
        "value": len(q) / elapsed,
        "queries": len(q),
        "seconds": elapsed,
        "n": n,
        "dim": int(db.shape[1]),
        "k": k,
        "block_rows": engine.block_rows,
        "database_gib": db.nbytes / 2**30,
        "generation_seconds": generated,
        "threads": torch.get_num_threads(),
        "first_query_top3": indices[0, :3].tolist(),
    }


def measure_exact_cpu_ceiling(settings: dict[str, Any]) -> dict[str, Any]:
    """The block products of ExactSearch alone: the same shapes, on a float32 block reused for every block."""
    common.set_threads(settings)
    n, dim, nq = int(settings["n"]), int(settings["dim"]), int(settings["queries"])
    block_rows = ExactSearch(np.empty((0, dim), dtype=np.float16)).block_rows
    vectors = mixture(settings)
    block = vectors.sample(min(block_rows, n), seed=1).float()
    queries = vectors.sample(nq, seed=2).float()
    sizes = [min(block_rows, n - start) for start in range(0, n, block_rows)]
    queries @ block[: sizes[0]].T  # warm-up
    start = time.perf_counter()
    for size in sizes:
        queries @ block[:size].T
    elapsed = time.perf_counter() - start
    return {"value": nq / elapsed, "queries": nq, "seconds": elapsed, "blocks": len(sizes), "block_rows": block_rows}


# -- exact search on the GPU ------------------------------------------------------------------------------------
def cuda_exact_search(
    database: torch.Tensor, queries: torch.Tensor, k: int, block_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine scores and rows of ``queries`` (float32) in ``database`` (float16, on the device)."""
    best_s = torch.empty(len(queries), 0, device=queries.device)
    best_i = torch.empty(len(queries), 0, dtype=torch.int64, device=queries.device)
    for start in range(0, len(database), block_rows):
        scores = queries @ database[start : start + block_rows].float().T
        s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        merged_s = torch.cat([best_s, s], dim=1)
        merged_i = torch.cat([best_i, i + start], dim=1)
        best_s, order = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
        best_i = merged_i.gather(1, order)
    return best_s, best_i


def _require_cuda(settings: Mapping[str, Any]) -> torch.device:
    device = torch.device(settings["device"])
    if device.type != "cuda" or not torch.cuda.is_available():
        raise common.Skipped("exact search on CUDA needs a CUDA device (this run has none)")
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products, as on the CPU
    return device


def measure_exact_cuda(settings: dict[str, Any]) -> dict[str, Any]:
    device = _require_cuda(settings)
    n, k, block_rows = int(settings["n"]), int(settings["k"]), int(settings["cuda_block_rows"])
    database, queries, generated = data(settings, n, device)
    cuda_exact_search(database, queries[:1], k, block_rows)  # warm-up
    times = []
    for _ in range(int(settings.get("cuda_repeats", 3))):
        start = common.now(device)
        _, indices = cuda_exact_search(database, queries, k, block_rows)
        times.append(common.now(device) - start)
    elapsed = min(times)
    return {
        "value": len(queries) / elapsed,
        "queries": len(queries),
        "seconds": elapsed,
        "all_seconds": times,
        "n": n,
        "dim": int(database.shape[1]),
        "k": k,
        "block_rows": block_rows,
        "generation_seconds": generated,
        "first_query_top3": indices[0, :3].tolist(),
    }


def measure_exact_cuda_ceiling(settings: dict[str, Any]) -> dict[str, Any]:
    device = _require_cuda(settings)
    n, block_rows = int(settings["n"]), int(settings["cuda_block_rows"])
    vectors = mixture(settings)
    block = vectors.sample(min(block_rows, n), seed=1, device=device).float()
    queries = vectors.sample(int(settings["queries"]), seed=2, device=device).float()
    sizes = [min(block_rows, n - start) for start in range(0, n, block_rows)]
    queries @ block[: sizes[0]].T  # warm-up
    times = []
    for _ in range(int(settings.get("cuda_repeats", 3))):
        start = common.now(device)
        for size in sizes:
            queries @ block[:size].T
        times.append(common.now(device) - start)
    elapsed = min(times)
    return {"value": len(queries) / elapsed, "queries": len(queries), "seconds": elapsed, "all_seconds": times}


# -- faiss IVF-PQ -----------------------------------------------------------------------------------------------
def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


def measure_ivfpq(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    from oxford_ir.errors import ConfigError
    from oxford_ir.retrieval.faiss_backend import FaissOptions, FaissSearch, import_faiss

    try:
        faiss = import_faiss()
    except ConfigError as error:
        raise common.Skipped(f"faiss is not installed ({error})") from None
    if settings.get("threads"):
        faiss.omp_set_num_threads(int(settings["threads"]))
    n, k = int(settings["ivfpq_n"]), int(settings["k"])
    database, queries, generated = data(settings, n, torch.device("cpu"))
    db, q = database.numpy(), queries.numpy()
    start = time.perf_counter()
    _, truth = ExactSearch(db).search(q, k)
    exact_seconds = time.perf_counter() - start
    options = FaissOptions.from_config(dict(settings["ivfpq"], index_type="ivfpq"))
    start = time.perf_counter()
    engine = FaissSearch(db, options)
    build_seconds = time.perf_counter() - start
    engine.search(q[:1], k)  # warm-up
    start = time.perf_counter()
    _, found = engine.search(q, k)
    elapsed = time.perf_counter() - start
    return {
        "value": len(q) / elapsed,
        "queries": len(q),
        "seconds": elapsed,
        "recall_at_10": recall_at(found, truth, 10),
        "n": n,
        "dim": int(db.shape[1]),
        "k": k,
        "options": dataclasses.asdict(options),
        "bytes_per_vector": options.m * options.nbits / 8,
        "build_seconds": build_seconds,
        "generation_seconds": generated,
        "exact_seconds": exact_seconds,
        "exact_queries_per_s": len(q) / exact_seconds,
        "faiss_threads": faiss.omp_get_max_threads(),
    }
