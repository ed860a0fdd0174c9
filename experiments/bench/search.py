"""Search queries/s over an N x D float16 database, and faiss IVF-PQ recall@10 against exact search.

The vectors are a mixture of clusters, each a low-dimensional (``rank``) patch around its centre plus
isotropic noise, L2-normalised: nearest neighbours are then a property of the data (close in the patch)
instead of the ties of concentrated random Gaussian vectors, so recall@10 means something. The database
rows are grouped by cluster (the order matters to no method measured here); queries are fresh draws from
the same mixture. Every timing is the best of ``repeats`` after a warm-up, the device synchronised before
each clock reading.

- ``exact_cpu``: the project's :class:`~oxford_ir.retrieval.exact_search.ExactSearch` on the CPU (float16
  rows upcast chunk by chunk in cache, float32 products, grouped top-k merged across blocks), ``cpu_queries``
  queries (default ``queries``). Ceiling: the float32 products of the same shapes (queries x N rows) on one
  float32 block reused for all N rows, so nothing but the block's products: no upcast, no reading of the
  database from RAM, no top-k; the faster of blocks of the rows ExactSearch multiplies at once and of 8192.
- ``exact_cuda``: the project's ``ExactSearch(device="cuda")``: the float16 database uploaded once (from host
  memory, as the searcher holds it) and resident; each call uploads the queries, multiplies them in float16
  with float32 accumulation and float32 scores, selects the top-k on the device and copies it back. Ceiling:
  the bare product of the same shapes (queries x database in float16 -> float32, accumulated in float32), the
  best of one call and the query batches x blocks ours uses; the row's note gives the roofline.
- ``ivfpq``: the project's :class:`~oxford_ir.retrieval.faiss_backend.FaissSearch` (``index_type=ivfpq``;
  faiss on the GPU where the installed faiss has GPU support, else on the CPU cores), trained on
  ``train_size`` database vectors; recall@10 = share of exact search's top 10 found in its top 10, averaged
  over the queries (exact search on the GPU when there is one). ``total_seconds``: the whole measurement,
  vectors drawn to queries answered.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
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


def data(
    settings: Mapping[str, Any], n: int, device: torch.device, queries: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(database N x D float16, queries nq x D float32) on ``device``, and the seconds it took to draw them."""
    vectors = mixture(settings)
    start = time.perf_counter()
    database = vectors.sample(n, seed=1, device=device)
    drawn = vectors.sample(int(queries or settings["queries"]), seed=2, device=device).float()
    return database, drawn, common.now(device) - start


def generation_device(settings: Mapping[str, Any]) -> torch.device:
    """Where the vectors are drawn: the GPU when the profile has one (1M x 2048 in a second, not a minute)."""
    device = torch.device(settings.get("device", "cpu"))
    return device if device.type == "cuda" and torch.cuda.is_available() else torch.device("cpu")


def best_time(
    run: Callable[[], Any], repeats: int, device: torch.device, warmup: Callable[[], Any] | None = None
) -> tuple[float, list[float], Any]:
    """``warmup()`` (default: ``run()``) once, then ``run()`` ``repeats`` times: (best seconds, all seconds, last
    result), the device synchronised before each clock reading."""
    (warmup or run)()
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = common.now(device)
        result = run()
        times.append(common.now(device) - start)
    return min(times), times, result


# -- exact search on the CPU ------------------------------------------------------------------------------------
def measure_exact_cpu(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    cpu = torch.device("cpu")
    n, k = int(settings["n"]), int(settings["k"])
    database, queries, generated = data(settings, n, generation_device(settings), settings.get("cpu_queries"))
    db, q = database.cpu().numpy(), queries.cpu().numpy()
    del database, queries
    engine = ExactSearch(db)
    repeats = int(settings.get("repeats", 3))
    warmup = functools.partial(engine.search, q[:1], k)  # the thread pool and first allocations
    seconds, times, (_, indices) = best_time(functools.partial(engine.search, q, k), repeats, cpu, warmup)
    return {
        "value": len(q) / seconds,
        "queries": len(q),
        "seconds": seconds,
        "all_seconds": times,
        "n": n,
        "dim": int(db.shape[1]),
        "k": k,
        "block_rows": engine.block_rows,
        "chunk_rows": engine.chunk_rows,
        "streamed": engine.streamed,
        "database_gib": db.nbytes / 2**30,
        "generation_seconds": generated,
        "threads": torch.get_num_threads(),
        "gflops": 2 * len(q) * n * db.shape[1] / seconds / 1e9,
        "first_query_top3": indices[0, :3].tolist(),
        "note": (
            f"{len(q)} queries, top {k}: float16 rows upcast {engine.chunk_rows:,} at a time in cache, float32 "
            f"products, top-k per block of {engine.block_rows:,} rows; {torch.get_num_threads()} threads"
        ),
    }


def measure_exact_cpu_ceiling(settings: dict[str, Any]) -> dict[str, Any]:
    """The float32 products of ExactSearch's shapes alone, ``rows @ queries.T`` on one float32 block reused for
    all N rows: the faster of blocks of the rows ExactSearch multiplies at once and of 8192 rows. (The former
    ExactSearch's ``queries @ rows.T`` was slower than both in every measurement on the 2-core machine.)"""
    common.set_threads(settings)
    cpu = torch.device("cpu")
    n, dim = int(settings["n"]), int(settings["dim"])
    nq = int(settings.get("cpu_queries") or settings["queries"])
    chunk = ExactSearch(np.empty((0, dim), dtype=np.float16)).chunk_rows
    vectors = mixture(settings)
    queries = vectors.sample(nq, seed=2).float()
    drawn = vectors.sample(min(max(chunk, 8192), n), seed=1).float()
    layouts = {}
    for rows in sorted({min(chunk, n), min(8192, n)}):
        block = drawn[:rows]
        sizes = [min(rows, n - start) for start in range(0, n, rows)]

        def run(block: torch.Tensor = block, sizes: list[int] = sizes) -> None:
            for size in sizes:
                block[:size] @ queries.T

        warmup = functools.partial(torch.mm, block, queries.T)
        seconds, times, _ = best_time(run, int(settings.get("repeats", 3)), cpu, warmup)
        layouts[f"blocks of {rows} rows"] = {"seconds": seconds, "all_seconds": times, "queries_per_s": nq / seconds}
    best = min(layouts, key=lambda name: layouts[name]["seconds"])
    seconds = layouts[best]["seconds"]
    return {
        "value": nq / seconds,
        "queries": nq,
        "seconds": seconds,
        "layout": best,
        "layouts": layouts,
        "gflops": 2 * nq * n * dim / seconds / 1e9,
        "threads": torch.get_num_threads(),
        "note": (
            f"ceiling: float32 products of the same shapes on one float32 block in memory, best layout {best} "
            f"({2 * nq * n * dim / seconds / 1e9:.0f} GFLOP/s)"
        ),
    }


# -- exact search on the GPU ------------------------------------------------------------------------------------
#: what the H200 allows (dense fp16 tensor cores with float32 accumulation; HBM3e)
H200_FP16_FLOPS = 989e12
H200_BYTES_PER_S = 4.8e12


def _require_cuda(settings: Mapping[str, Any]) -> torch.device:
    device = torch.device(settings["device"])
    if device.type != "cuda" or not torch.cuda.is_available():
        raise common.Skipped("exact search on CUDA needs a CUDA device (this run has none)")
    return device  # (the measurements below also run on the CPU, for the tests)


def roofline(nq: int, n: int, dim: int) -> dict[str, Any]:
    """Bytes, FLOPs and the H200's bound for ``nq`` half-precision queries against ``n`` x ``dim`` half rows with
    float32 scores: the bare product writes the scores once, ours also reads them back once (group maxima)."""
    flops = 2 * nq * n * dim
    read = 2 * (n + nq) * dim
    scores = 4 * nq * n
    moved = read + 2 * scores
    compute_s, memory_s = flops / H200_FP16_FLOPS, moved / H200_BYTES_PER_S
    return {
        "flops": flops,
        "bytes_read": read,
        "bytes_scores": scores,
        "bytes_moved": moved,
        "bytes_moved_bare_product": read + scores,
        "intensity_flop_per_byte": flops / moved,
        "ridge_flop_per_byte": H200_FP16_FLOPS / H200_BYTES_PER_S,
        "compute_bound_s": compute_s,
        "memory_bound_s": memory_s,
        "bound": "compute" if compute_s >= memory_s else "memory",
        "queries_per_s": nq / max(compute_s, memory_s),
    }


def roofline_note(r: Mapping[str, Any], seconds: float) -> str:
    """The roofline of the row, and what ours reached."""
    return (
        f"roofline per pass: {r['flops'] / 1e12:.2f} TFLOP; reads {r['bytes_read'] / 1e9:.2f} GB of float16 rows and "
        f"queries, writes {r['bytes_scores'] / 1e9:.2f} GB of float32 scores (the bare product) and reads them back "
        f"once (ours): {r['bytes_moved'] / 1e9:.2f} GB, {r['intensity_flop_per_byte']:.0f} FLOP/byte against the "
        f"H200's ridge of {r['ridge_flop_per_byte']:.0f} (~{H200_FP16_FLOPS / 1e12:.0f} dense fp16 TFLOP/s, "
        f"~{H200_BYTES_PER_S / 1e12:.1f} TB/s HBM3e): {r['bound']}-bound, at best {r['compute_bound_s'] * 1e3:.2f} "
        f"ms of compute vs {r['memory_bound_s'] * 1e3:.2f} ms of memory = {r['queries_per_s']:,.0f} queries/s; "
        f"ours {r['flops'] / seconds / 1e12:.0f} TFLOP/s"
    )


def measure_exact_cuda(settings: dict[str, Any]) -> dict[str, Any]:
    device = _require_cuda(settings)
    n, k = int(settings["n"]), int(settings["k"])
    database, queries, generated = data(settings, n, device)
    db, q = database.cpu().numpy(), queries.cpu().numpy()  # the index as the searcher holds it: host memory
    del database, queries
    torch.cuda.empty_cache()
    start = common.now(device)
    engine = ExactSearch(db, device=device)
    build = common.now(device) - start
    seconds, times, (_, indices) = best_time(lambda: engine.search(q, k), int(settings.get("repeats", 3)), device)
    # the CPU path on a few queries rounded to float16 as the GPU's are: the same top-k up to near-ties
    few = q[:8].astype(np.float16).astype(np.float32)
    _, on_cpu = ExactSearch(db).search(few, k)
    _, on_gpu = engine.search(few, k)
    r = roofline(len(q), n, int(db.shape[1]))
    return {
        "value": len(q) / seconds,
        "queries": len(q),
        "seconds": seconds,
        "all_seconds": times,
        "n": n,
        "dim": int(db.shape[1]),
        "k": k,
        "block_rows": engine.block_rows,
        "query_batch": engine.query_batch,
        "dtype": str(engine.dtype),
        # False: a torch before 2.8, whose products upcast both sides first (correct, not tensor-core speed)
        "float32_output_products": hasattr(torch.ops.aten.mm, "dtype"),
        "build_seconds": build,
        "generation_seconds": generated,
        "tflops": r["flops"] / seconds / 1e12,
        "roofline": r,
        "same_top_k_as_cpu": float(np.mean(on_cpu == on_gpu)),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "first_query_top3": indices[0, :3].tolist(),
        "note": roofline_note(r, seconds),
    }


def measure_exact_cuda_ceiling(settings: dict[str, Any]) -> dict[str, Any]:
    """The bare float16 x float16 -> float32 product of the same shapes (float32 accumulation): one call, and the
    query batches x blocks ExactSearch uses; the faster of the two. With float16 output as a side number."""
    from oxford_ir.retrieval.exact_search import exact_half_products, half_product

    device = _require_cuda(settings)
    n, dim, nq = int(settings["n"]), int(settings["dim"]), int(settings["queries"])
    vectors = mixture(settings)
    rows = vectors.sample(n, seed=1, device=device)
    queries = vectors.sample(nq, seed=2, device=device)
    shape = ExactSearch(torch.empty(0, dim, dtype=torch.float16, device=device), device=device)
    width, batch = shape.block_rows, shape.query_batch
    repeats = int(settings.get("repeats", 3))

    def blocks() -> None:
        for q0 in range(0, nq, batch):
            for start in range(0, n, width):
                half_product(queries[q0 : q0 + batch], rows[start : start + width])

    with exact_half_products():
        variants = {"blocks": best_time(blocks, repeats, device)[:2]}
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else math.inf
        if 4 * nq * n < free / 3:  # the whole score matrix at once
            variants["one call"] = best_time(lambda: half_product(queries, rows), repeats, device)[:2]
            variants["one call, float16 scores"] = best_time(lambda: queries @ rows.T, repeats, device)[:2]
    candidates = {name: v for name, v in variants.items() if "float16" not in name}
    best = min(candidates, key=lambda name: candidates[name][0])
    seconds = candidates[best][0]
    r = roofline(nq, n, dim)
    return {
        "value": nq / seconds,
        "queries": nq,
        "seconds": seconds,
        "variant": best,
        "variants": {
            name: {"seconds": v[0], "all_seconds": v[1], "queries_per_s": nq / v[0]} for name, v in variants.items()
        },
        "block_rows": width,
        "query_batch": batch,
        "tflops": r["flops"] / seconds / 1e12,
        "roofline": r,
        "note": f"ceiling: the bare float16 x float16 -> float32 product, {best} ({r['flops'] / seconds / 1e12:.0f} "
        "TFLOP/s)" + "".join(f"; {name}: {nq / v[0]:,.0f} queries/s" for name, v in variants.items() if name != best),
    }


# -- both variants of a row in one process -----------------------------------------------------------------------
def measure_exact_cuda_row(settings: dict[str, Any]) -> dict[str, Any]:
    """The GPU row's ceiling and ours in one process (one CUDA start): ``{"variants": {...}}`` for run.py, each
    with its own CUDA allocator peak."""
    device = _require_cuda(settings)
    ceiling = measure_exact_cuda_ceiling(settings)
    if device.type == "cuda":  # (the tests run this on the CPU)
        ceiling["peak_memory"] = common.peak_memory(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ours = measure_exact_cuda(settings)
    if device.type == "cuda":
        ours["peak_memory"] = common.peak_memory(device)
    return {"variants": {"ours": ours, "ceiling": ceiling}}


def measure_exact_cpu_row(settings: dict[str, Any]) -> dict[str, Any]:
    """The CPU row's ours and ceiling in one process: ``{"variants": {...}}`` for run.py. The process's peak
    resident memory is ours' (measured first: the database); the ceiling's is not separable from it."""
    ours = measure_exact_cpu(settings)
    ours["peak_memory"] = common.peak_memory(torch.device("cpu"))
    return {"variants": {"ours": ours, "ceiling": measure_exact_cpu_ceiling(settings)}}


# -- faiss IVF-PQ -----------------------------------------------------------------------------------------------
def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


def measure_ivfpq(settings: dict[str, Any]) -> dict[str, Any]:
    clock = time.perf_counter()
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
    device = generation_device(settings)
    database, queries, generated = data(settings, n, device, settings.get("ivfpq_queries"))
    start = common.now(device)
    _, truth = ExactSearch(database, device=device).search(queries, k)
    exact_seconds = common.now(device) - start
    db, q = database.cpu().numpy(), queries.cpu().numpy()
    del database, queries
    if device.type == "cuda":
        torch.cuda.empty_cache()
    options = FaissOptions.from_config(dict(settings["ivfpq"], index_type="ivfpq"))
    start = time.perf_counter()
    engine = FaissSearch(db, options, device=device)
    build_seconds = time.perf_counter() - start
    seconds, times, (_, found) = best_time(lambda: engine.search(q, k), int(settings.get("repeats", 3)), device)
    return {
        "value": len(q) / seconds,
        "queries": len(q),
        "seconds": seconds,
        "all_seconds": times,
        "recall_at_10": recall_at(found, truth, 10),
        "n": n,
        "dim": int(db.shape[1]),
        "k": k,
        "options": dataclasses.asdict(options),
        "bytes_per_vector": options.m * options.nbits / 8,
        "faiss_on_gpu": engine.on_gpu,
        "build_seconds": build_seconds,
        "generation_seconds": generated,
        "exact_device": device.type,
        "exact_seconds": exact_seconds,
        "exact_queries_per_s": len(q) / exact_seconds,
        "faiss_threads": faiss.omp_get_max_threads(),
        "total_seconds": time.perf_counter() - clock,
    }
