"""Evaluation speed, as (query, database image) pairs scored per second.

- ``ours``: the whole evaluation of the benchmark as ``oxford-ir-eval`` does it, in the default extraction
  mode (bucket batches, the profile's precision, memory format and decode: ``auto`` decodes on the GPU): every
  database image and query embedded once (``extract_benchmark``, planning included), one matrix product and
  sort (``rank_database``), the protocol's mAP (``Benchmark.evaluate``). Timed warm: the same evaluation runs
  once before (cuDNN's plans for the network's few input shapes, the allocator; its time is in the JSON as
  ``first_run_seconds``), then a second time, timed. Pairs/s = Nq x Ndb / its wall time.
- ``original``: :func:`experiments.bench.original.pairwise_distances`, both images of every pair through the
  network, on a random sample of pairs of ``pair_queries`` random queries (all when None), extrapolated to all
  Nq x Ndb pairs. Timed warm as well: warm-up pairs first pass every input shape of the sample through the
  network (the original, too, pays for a shape once per run, which 2 Nq Ndb passes amortise), then the
  sample is timed.

The ratio ours / original is the speed-up of the evaluation on the same model, images and preprocessing.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from experiments.bench import common
from experiments.bench.extraction import benchmark_and_model, effective_settings, recorded_forwards, shapes_summary
from experiments.bench.original import all_pairs, pairwise_distances
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.extraction.benchmark import extract_benchmark, plan_benchmark, plans_summary
from oxford_ir.extraction.planning import plan_extraction


def measure_ours(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    benchmark, model = benchmark_and_model(settings)
    device = torch.device(settings["device"])
    options, effective = effective_settings(settings)
    size, batch, workers = int(settings["eval_image_size"]), int(settings["batch_size"]), int(settings["num_workers"])
    kwargs = {"batch_size": batch, "num_workers": workers, "device": device, **options}

    def evaluate() -> dict[str, float]:
        database, queries = extract_benchmark(model, benchmark, size, **kwargs)
        return benchmark.evaluate(rank_database(database, queries))

    with recorded_forwards(model) as seen:
        start = common.now(device)
        evaluate()  # warm-up: the whole evaluation once
        first = common.now(device) - start
        seen.clear()
        start = common.now(device)
        metrics = evaluate()
        elapsed = common.now(device) - start
        forwards = list(seen)
    plans = plans_summary(plan_benchmark(model, benchmark, size, batch))
    pairs = benchmark.n_queries * benchmark.n_db
    return {
        "value": pairs / elapsed,
        "pairs": pairs,
        "seconds": elapsed,
        "first_run_seconds": first,
        "queries": benchmark.n_queries,
        "database_images": benchmark.n_db,
        "network_images": benchmark.n_queries + benchmark.n_db,
        "batching": plans["mode"],
        "padded_over_valid_pixels": plans["padded_over_valid_pixels"],
        "buckets": plans.get("buckets"),
        **shapes_summary(forwards),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "options_used": {k: str(v) for k, v in options.items()},
        **effective,
    }


def warmup_pairs(sample: np.ndarray, query_shapes: list, db_shapes: list) -> np.ndarray:
    """Pairs of the sample's queries and database images that together hold each input shape of ``sample``
    (P x 2) at least once: one pair per distinct query shape, database shapes taken in turn."""
    queries: dict[Any, int] = {}
    database: dict[Any, int] = {}
    for q, d in sample:
        queries.setdefault(query_shapes[q], int(q))
        database.setdefault(db_shapes[d], int(d))
    q_list, d_list = list(queries.values()), list(database.values())
    n = max(len(q_list), len(d_list))
    return np.array([(q_list[k % len(q_list)], d_list[k % len(d_list)]) for k in range(n)], dtype=np.int64)


def measure_original(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    benchmark, model = benchmark_and_model(settings)
    device = torch.device(settings["device"])
    _, effective = effective_settings(settings)
    model = model.to(memory_format=common.memory_format(effective["channels_last"]))
    size, workers = int(settings["eval_image_size"]), int(settings["num_workers"])
    warmup, sample_size = int(settings["pair_warmup"]), int(settings["pair_sample"])
    rng = np.random.default_rng(int(settings.get("seed", 0)))
    n_queries = int(settings.get("pair_queries") or benchmark.n_queries)
    chosen = np.sort(rng.choice(benchmark.n_queries, size=min(n_queries, benchmark.n_queries), replace=False))
    everything = all_pairs(benchmark.n_queries, benchmark.n_db)
    candidates = everything[np.isin(everything[:, 0], chosen)]
    if not len(candidates) or sample_size < 1:
        raise RuntimeError(f"{len(candidates)} pairs of the chosen queries, sample of {sample_size}: nothing to time")
    sample = candidates[rng.choice(len(candidates), size=min(sample_size, len(candidates)), replace=False)]
    # the preprocessed shape of every image, from the headers (the network sees each pair's two at batch 1)
    query_shapes = plan_extraction(benchmark.query_paths, size, 1, bboxes=benchmark.query_bboxes, batching="shape")
    db_shapes = plan_extraction(benchmark.db_paths, size, 1, batching="shape")
    covering = warmup_pairs(sample, query_shapes.shapes, db_shapes.shapes)
    extra = candidates[rng.choice(len(candidates), size=max(0, warmup - len(covering)), replace=True)]
    warm = np.concatenate([covering, extra.reshape(-1, 2)]).astype(np.int64)
    times: dict[int, float] = {}
    first, last = len(warm), len(warm) + len(sample)

    def on_pair(n: int) -> None:
        if n in (first, last):
            times[n] = common.now(device)

    pairwise_distances(
        model,
        benchmark,
        size,
        np.concatenate([warm, sample]),
        device=device,
        num_workers=workers,
        autocast=functools.partial(common.autocast, device, effective["precision"]),
        channels_last=effective["channels_last"],
        on_pair=on_pair,
    )
    elapsed = times[last] - times[first]
    rate = len(sample) / elapsed
    total = benchmark.n_queries * benchmark.n_db
    return {
        "value": rate,
        "pairs_measured": len(sample),
        "queries_sampled": len(chosen),
        "warmup_pairs": len(warm),
        "warmup_input_shapes": len({query_shapes.shapes[q] for q, _ in warm} | {db_shapes.shapes[d] for _, d in warm}),
        "seconds": elapsed,
        "pairs_total": total,
        "extrapolated": True,
        "extrapolated_seconds": total / rate,
        "network_passes_per_pair": 2,
        **effective,
    }
