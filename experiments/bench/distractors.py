"""Counting distractors above each database image (``<benchmark>+r1m``): seconds per million distractors.

``python -m experiments.bench.distractors [--rows 262144] [--dim 2048] [--queries 70] [--db 4993]``: a float16
N x D distractor matrix (as the index stores it) and random unit database and query embeddings (Revisited
Oxford's 4993 images and 70 queries by default); times
:func:`~oxford_ir.retrieval.distractors.distractors_above` (float32 products by blocks, a binary search of each
score among the database's sorted scores) against its ceiling measured in the same run: the same float32 products
alone, on one float32 block reused (no upcast, no reading of the rows from memory, no search). Best of
``--repeats``; the table says both per million rows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from oxford_ir.retrieval.distractors import BLOCK_ROWS, distractors_above


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def products_only(distractors: np.ndarray, queries: np.ndarray, block: int) -> None:
    """The ceiling: the same float32 products (queries x every row), on one float32 block of rows reused."""
    q = torch.from_numpy(queries)
    rows = torch.from_numpy(np.asarray(distractors[:block], dtype=np.float32))
    for start in range(0, len(distractors), block):
        q @ rows[: min(block, len(distractors) - start)].T


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1 << 18)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--db", type=int, default=4993)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    distractors = np.concatenate(
        [
            unit(rng, min(BLOCK_ROWS, args.rows - s), args.dim).astype(np.float16)
            for s in range(0, args.rows, BLOCK_ROWS)
        ]
    )
    db, queries = unit(rng, args.db, args.dim), unit(rng, args.queries, args.dim)
    counting = best(lambda: distractors_above(db, queries, distractors), args.repeats)
    ceiling = best(lambda: products_only(distractors, queries, BLOCK_ROWS), args.repeats)
    per_million = 1e6 / args.rows
    print(f"{args.rows} x {args.dim} float16 distractors, {args.queries} queries, {args.db} database images, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
    print(f"{'what':<34} {'seconds':>8} {'s per 1M rows':>14} {'vs ceiling':>10}")
    for what, seconds in (("distractors_above (exact counts)", counting), ("ceiling: the products alone", ceiling)):
        print(f"{what:<34} {seconds:8.2f} {seconds * per_million:14.2f} {ceiling / seconds:10.2f}")


if __name__ == "__main__":
    main()
