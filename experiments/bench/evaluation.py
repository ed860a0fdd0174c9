"""Evaluation speed, as (query, database image) pairs scored per second.

- ``ours``: the whole evaluation of the benchmark as ``oxford-ir-eval`` does it: every database image and
  query embedded once (``extract_benchmark``), one matrix product and sort (``rank_database``), the
  protocol's mAP (``Benchmark.evaluate``). Pairs/s = Nq x Ndb / its wall time.
- ``original``: :func:`experiments.bench.original.pairwise_distances`, both images of every pair through the
  network; measured on a random sample of pairs after a few warm-up pairs and extrapolated to all Nq x Ndb
  pairs (the JSON holds the sample size and the extrapolated time).

The ratio ours / original is the speed-up of the evaluation on the same model, images and preprocessing.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from experiments.bench import common
from experiments.bench.extraction import benchmark_and_model, effective_settings
from experiments.bench.original import all_pairs, pairwise_distances
from oxford_ir.extraction.embedding import extract_benchmark, extract_embeddings
from oxford_ir.retrieval.ranking import rank_database


def measure_ours(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    benchmark, model = benchmark_and_model(settings)
    device = torch.device(settings["device"])
    options, effective = effective_settings(settings)
    size, batch, workers = int(settings["eval_image_size"]), int(settings["batch_size"]), int(settings["num_workers"])
    kwargs = {"batch_size": batch, "num_workers": workers, "device": device, **options}
    extract_embeddings(model, benchmark.db_paths[:2], size, **kwargs)  # warm-up
    start = common.now(device)
    database, queries = extract_benchmark(model, benchmark, size, **kwargs)
    ranks = rank_database(database, queries)
    metrics = benchmark.evaluate(ranks)
    elapsed = common.now(device) - start
    pairs = benchmark.n_queries * benchmark.n_db
    return {
        "value": pairs / elapsed,
        "pairs": pairs,
        "seconds": elapsed,
        "queries": benchmark.n_queries,
        "database_images": benchmark.n_db,
        "network_images": benchmark.n_queries + benchmark.n_db,
        "metrics": {k: float(v) for k, v in metrics.items()},
        **effective,
    }


def measure_original(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    benchmark, model = benchmark_and_model(settings)
    device = torch.device(settings["device"])
    _, effective = effective_settings(settings)
    model = model.to(memory_format=common.memory_format(effective["channels_last"]))
    size, workers = int(settings["eval_image_size"]), int(settings["num_workers"])
    warmup, sample = int(settings["pair_warmup"]), int(settings["pair_sample"])
    everything = all_pairs(benchmark.n_queries, benchmark.n_db)
    rng = np.random.default_rng(int(settings.get("seed", 0)))
    chosen = everything[rng.choice(len(everything), size=min(warmup + sample, len(everything)), replace=False)]
    if len(chosen) <= warmup:
        raise RuntimeError(f"{len(everything)} pairs: not enough for {warmup} warm-up pairs and a sample")
    times: dict[int, float] = {}

    def on_pair(n: int) -> None:
        if n in (warmup, len(chosen)):
            times[n] = common.now(device)

    pairwise_distances(
        model,
        benchmark,
        size,
        chosen,
        device=device,
        num_workers=workers,
        autocast=functools.partial(common.autocast, device, effective["precision"]),
        channels_last=effective["channels_last"],
        on_pair=on_pair,
    )
    measured = len(chosen) - warmup
    elapsed = times[len(chosen)] - times[warmup]
    rate = measured / elapsed
    total = benchmark.n_queries * benchmark.n_db
    return {
        "value": rate,
        "pairs_measured": measured,
        "warmup_pairs": warmup,
        "seconds": elapsed,
        "pairs_total": total,
        "extrapolated": True,
        "extrapolated_seconds": total / rate,
        "network_passes_per_pair": 2,
        **effective,
    }
