"""Indexes chosen from a memory budget (``index.memory``, ``index.recall``): recall@10, queries/s, build time and
memory of each choice against exact search, measured in the same run, on N x 2048 clustered float16 vectors.

    .venv/bin/python -m experiments.bench.budgeted_index --n 100000            # quick: every kind of index
    .venv/bin/python -m experiments.bench.budgeted_index --n 1000000 --rows exact,1/8,1/32

The vectors are the search benchmark's mixture (:class:`experiments.bench.search.ClusterMixture`: 1024
clusters, rank-16 patches, isotropic noise, L2-normalised), drawn in chunks of 65,536 into a float16 ``.npy``
under ``--data`` (not the repository; 4 GiB for 1M x 2048) and searched as a read-only memory map, as
``oxford-ir-search`` does. Queries: 1000 fresh draws of the mixture, all searched in one batched call.

Rows (``--rows``): ``exact`` (the project's ExactSearch over the memory map: the baseline and the ground truth),
``<a>/<b>`` (``index.memory`` = that fraction of the float16 rows: the index the project chooses), ``hnsw``,
``ivf_flat`` (that kind forced, with a budget that holds it). Every non-exact row is tuned to ``--recall`` on
1000 held-out database rows by :func:`~oxford_ir.retrieval.budgeted_index.build_budgeted_index` and then
measured on the fresh queries: recall@10 = share of exact search's top 10 in the answer (after the exact
re-ranking of 100 candidates), queries/s = the better of two timed calls after a warm-up, build = train + add
(tuning separately), memory = the faiss index's serialised bytes (what is held in RAM besides the memory map).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.search import ClusterMixture
from oxford_ir.retrieval.budgeted_index import (
    BudgetOptions,
    build_budgeted_index,
    format_bytes,
    hnsw_choice,
    ivf_flat_choice,
)
from oxford_ir.retrieval.candidate_rerank import StoredIndexSearch, recall_at
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.faiss_backend import import_faiss

CHUNK = 65_536


def vectors(n: int, dim: int, folder: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(database memory map N x D float16, queries 1000 x D float32, seconds spent drawing; 0 when cached)."""
    mixture = ClusterMixture(dim, 1024, 16, 0.5, 0.25, 0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"mixture_{n}x{dim}.npy"
    started = time.perf_counter()
    if not path.exists():
        partial = path.with_suffix(".partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(n, dim))
        for number, start in enumerate(range(0, n, CHUNK)):
            rows = min(CHUNK, n - start)
            out[start : start + rows] = mixture.sample(rows, seed=1000 + number).numpy()
        out.flush()
        del out
        partial.rename(path)
    drawn = time.perf_counter() - started
    queries = mixture.sample(1000, seed=2).float().numpy()
    return np.load(path, mmap_mode="r"), queries, drawn


def timed_search(engine: Any, queries: np.ndarray, k: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    engine.search(queries[:50], k)  # warm-up
    best, found = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        _, found = engine.search(queries, k)
        best = min(best, time.perf_counter() - started)
    return best, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rows", default="exact,hnsw,ivf_flat,1/8,1/32")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/oxford_ir_budget_bench"))
    parser.add_argument("--out", type=Path, default=None, help="JSON of every row (default: <data>/results_<n>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)
    k = 10
    database, queries, drawn = vectors(args.n, args.dim, args.data)
    rows_bytes = database.shape[0] * database.shape[1] * 2
    print(f"{args.n:,} x {args.dim} float16 rows ({format_bytes(rows_bytes)}), drawn in {drawn:.0f} s", flush=True)
    exact = ExactSearch(database)
    exact_seconds, truth = timed_search(exact, queries, k, repeats=1)
    results: list[dict[str, Any]] = [
        {
            "row": "exact",
            "index": "exact (float16 memory map, ExactSearch)",
            "recall_at_10": 1.0,
            "queries_per_s": len(queries) / exact_seconds,
            "build_seconds": 0.0,
            "index_bytes": 0,
        }
    ]
    print(f"exact: {len(queries) / exact_seconds:.1f} queries/s", flush=True)
    out = args.out or args.data / f"results_{args.n}.json"
    for row in [r for r in args.rows.split(",") if r != "exact"]:
        memory, choice = 4 * rows_bytes, None
        if "/" in row:
            a, b = (int(v) for v in row.split("/"))
            memory = rows_bytes * a // b
        elif row == "hnsw":
            choice = hnsw_choice(args.n, args.dim, 32)
        elif row == "ivf_flat":
            choice = ivf_flat_choice(args.n, args.dim, min(65_536, args.n))
        options = BudgetOptions(memory=memory, recall=args.recall)
        started = time.perf_counter()
        try:
            built = build_budgeted_index(database, options, choice)
        except Exception as error:  # a row that cannot be built is reported, the others still run
            results.append({"row": row, "error": str(error)})
            print(f"{row}: {error}", flush=True)
            continue
        total = time.perf_counter() - started
        engine = StoredIndexSearch(built.index, database, candidates=options.candidates)
        seconds, found = timed_search(engine, queries, k)
        info = built.info
        results.append(
            {
                "row": row,
                "index": info["key"],
                "memory_budget": memory,
                "recall_at_10": recall_at(found, truth, k),
                "queries_per_s": len(queries) / seconds,
                "speedup": exact_seconds / seconds,
                "build_seconds": info["build_seconds"],
                "train_seconds": info.get("train_seconds"),
                "tune_seconds": info["tune_seconds"],
                "total_seconds": total,
                "index_bytes": info["bytes"],
                "share_of_float16_rows": info["bytes"] / rows_bytes,
                "tuned": info,
            }
        )
        r = results[-1]
        print(
            f"{row}: {r['index']} {info['search_parameter']} recall@10 {r['recall_at_10']:.3f} (tuning "
            f"{info['recall_at_10']:.3f}), {r['queries_per_s']:.0f} queries/s ({r['speedup']:.1f}x exact), build "
            f"{r['build_seconds']:.0f} s + tune {r['tune_seconds']:.0f} s, {format_bytes(r['index_bytes'])} "
            f"({r['share_of_float16_rows']:.3f} of the float16 rows)",
            flush=True,
        )
        del built, engine
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"n": args.n, "dim": args.dim, "queries": len(queries), "threads": args.threads, "peak_rss_mib": peak}
    out.write_text(json.dumps({"settings": summary, "rows": results}, indent=1))
    print(table(results, args.n, args.dim))
    print(f"peak RSS {peak:.0f} MiB; JSON: {out}")


def table(results: list[dict[str, Any]], n: int, dim: int) -> str:
    lines = [
        f"| {n:,} x {dim} | index | recall@10 | queries/s | vs exact | build s | memory | of float16 rows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    exact_qps = results[0]["queries_per_s"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['index']} | {r['recall_at_10']:.3f} | {r['queries_per_s']:.1f} | "
            f"{r['queries_per_s'] / exact_qps:.1f}x | {r['build_seconds']:.0f} | {format_bytes(r['index_bytes'])} | "
            f"{r['index_bytes'] / (n * dim * 2):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
