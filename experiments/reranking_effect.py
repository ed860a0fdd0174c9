"""Effect of alpha query expansion (αQE) and database-side augmentation (DBA) on the benchmarks, and the
precision of searching the real Paris images with their query images.

Every number goes through the retrieval tool's code path: ``build_index(images=benchmark:<name>)``, then
``evaluate_benchmark`` with a :class:`~oxford_ir.retrieval.search.Searcher` per re-ranking setting (the
index is built once per model and reused; only the searcher changes).

    .venv/bin/python experiments/reranking_effect.py                        # synthetic + rparis6k at 512 px
    .venv/bin/python experiments/reranking_effect.py --sizes 512 1024       # also the standard 1024 px
    .venv/bin/python experiments/reranking_effect.py --only paris-p5        # just the P@5 of the Paris queries

Sections: ``synthetic`` (default synthetic benchmark, original and revisited protocols; ImageNet
MobileNetV2 + GeM and raw pixels), ``rparis6k`` (the real Revisited Paris images available offline, a
subset: 238 database images, 12 queries; MobileNetV2 + GeM) and ``paris-p5`` (index the whole
``paris6k/jpg`` folder, search with the 12 rparis6k query images cropped to their boxes, P@5 = share of
the top 5 results other than the query image itself that show the same landmark, from the file names).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.synthetic import write_synthetic_benchmark
from oxford_ir.retrieval.image_sources import resolve_images
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import RetrievalIndex
from oxford_ir.retrieval.model_spec import ModelSpec
from oxford_ir.retrieval.search import Searcher, embed_benchmark_queries, evaluate_benchmark

REPO = Path(__file__).resolve().parents[1]
#: (label, query expansion, database augmentation); alpha 3 as in Radenović et al.
SETTINGS = [
    ("none", None, None),
    ("aQE n=1", {"n": 1, "alpha": 3.0}, None),
    ("aQE n=2", {"n": 2, "alpha": 3.0}, None),
    ("aQE n=5", {"n": 5, "alpha": 3.0}, None),
    ("aQE n=10", {"n": 10, "alpha": 3.0}, None),
    ("DBA n=1", None, {"n": 1, "alpha": 3.0}),
    ("DBA n=2", None, {"n": 2, "alpha": 3.0}),
    ("DBA n=5", None, {"n": 5, "alpha": 3.0}),
    ("DBA n=10", None, {"n": 10, "alpha": 3.0}),
    ("DBA n=2 + aQE n=2", {"n": 2, "alpha": 3.0}, {"n": 2, "alpha": 3.0}),
    ("DBA n=5 + aQE n=5", {"n": 5, "alpha": 3.0}, {"n": 5, "alpha": 3.0}),
    ("DBA n=10 + aQE n=10", {"n": 10, "alpha": 3.0}, {"n": 10, "alpha": 3.0}),
]


def embedder(backbone: dict, pooling: dict) -> ModelSpec:
    return ModelSpec(
        embedder={"_target_": "oxford_ir.models.embedder.Embedder", "backbone": backbone, "pooling": pooling}
    )


def mobilenet(weights: Path) -> ModelSpec:
    return embedder(
        {"_target_": "oxford_ir.models.backbones.MobileNetV2", "weights": str(weights.resolve())},
        {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
    )


RAW_PIXELS = embedder(
    {"_target_": "oxford_ir.models.backbones.RawPixels", "grid": 16},
    {"_target_": "oxford_ir.models.pooling.FlattenPooling"},
)


def index_for(model: ModelSpec, images, out: Path, image_size: int, workers: int) -> RetrievalIndex:
    """Build (or reuse, when unchanged) a float32 index of ``images``."""
    start = time.perf_counter()
    report = build_index(
        model, images, out, image_size=image_size, dtype="float32", batch_size=8, num_workers=workers, progress=False
    )
    print(
        f"  index {out.name}: {report.count} images, embedded {report.embedded} in {time.perf_counter() - start:.0f} s"
    )
    return RetrievalIndex.load(out)


def rerank_table(index: RetrievalIndex, benchmark, columns: list[str]) -> dict[str, dict[str, float]]:
    """mAP (and M mP@5) of every setting; prints one row per setting."""
    rows = {}
    header = f"  {'setting':<22}" + "".join(f"{c:>9}" for c in columns)
    print(header + "\n  " + "-" * (len(header) - 2))
    queries = embed_benchmark_queries(Searcher(index, batch_size=8), benchmark)  # once: settings only re-rank
    for label, qe, dba in SETTINGS:
        searcher = Searcher(index, query_expansion=qe, database_augmentation=dba)
        metrics = evaluate_benchmark(index, benchmark, searcher, query_vectors=queries)
        rows[label] = metrics
        print(f"  {label:<22}" + "".join(f"{100 * metrics[c]:9.2f}" for c in columns), flush=True)
    return rows


def columns_of(protocol: str) -> list[str]:
    return ["mAP", "mP@5"] if protocol == "original" else ["E/mAP", "M/mAP", "H/mAP", "M/mP@5"]


def synthetic_section(out: Path, weights: Path, workers: int) -> dict:
    data = out / "data"
    write_synthetic_benchmark(data / "synthetic")  # default parameters, seed 0 (reused when present)
    results = {}
    for model_name, model in (("mobilenetv2_gem", mobilenet(weights)), ("raw_pixels", RAW_PIXELS)):
        for name in ("synthetic", "rsynthetic"):
            benchmark = load_benchmark(name, data)
            print(f"\n{name} ({benchmark.n_db} images, {benchmark.n_queries} queries), {model_name}, 1024 px:")
            source = resolve_images(f"benchmark:{name}", data)
            index = index_for(model, source, out / "indexes" / f"{name}_{model_name}", 1024, workers)
            results[f"{name}/{model_name}"] = rerank_table(index, benchmark, columns_of(benchmark.protocol))
    return results


def rparis_section(out: Path, shared: Path, weights: Path, sizes: list[int], workers: int) -> dict:
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "evaluating a subset": said in the heading below
        benchmark = load_benchmark("rparis6k", shared, allow_missing_images=True)
        source = resolve_images("benchmark:rparis6k", shared, allow_missing_images=True)
    for size in sizes:
        print(
            f"\nrparis6k subset ({benchmark.n_db} images, {benchmark.n_queries} queries), MobileNetV2 + GeM, {size} px:"
        )
        index = index_for(mobilenet(weights), source, out / "indexes" / f"rparis6k_{size}", size, workers)
        results[f"rparis6k/{size}"] = rerank_table(index, benchmark, columns_of("revisited"))
    return results


def landmark(path: str) -> str:
    """``paris_<landmark>_<number>.jpg`` -> ``<landmark>``."""
    stem = Path(path).stem
    return stem[len("paris_") : stem.rindex("_")]


def paris_p5_section(out: Path, shared: Path, weights: Path, sizes: list[int], workers: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark = load_benchmark("rparis6k", shared, allow_missing_images=True)
    results = {}
    for size in sizes:
        print(f"\nparis6k/jpg searched with the {benchmark.n_queries} rparis6k query images (boxes), {size} px:")
        index = index_for(
            mobilenet(weights), shared / "paris6k" / "jpg", out / "indexes" / f"paris6k_jpg_{size}", size, workers
        )
        searcher = Searcher(index, batch_size=8)
        result = searcher.search_images(benchmark.query_paths, benchmark.query_bboxes, k=6)
        precisions, top1 = [], []
        for q, name in enumerate(benchmark.qimlist):
            hits = [index.entries[i].path for i, _ in result.hits(q) if Path(index.entries[i].path).stem != name][:5]
            same = [landmark(h) == landmark(name) for h in hits]
            precisions.append(float(np.mean(same)))
            top1.append(same[0])
            print(f"  {name:<28} top-5 {' '.join(landmark(h) for h in hits)}  P@5 {100 * precisions[-1]:.0f}")
        p5, p1 = 100 * np.mean(precisions), 100 * np.mean(top1)
        print(f"  mean P@5 (same landmark) {p5:.2f}; top-1 same landmark {p1:.1f}%")
        # the folder index holds the 12 query images as extra rows; the protocol drops them from the ranking
        metrics = evaluate_benchmark(index, benchmark, searcher)
        print(
            "  benchmark protocol (query rows dropped): "
            + ", ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("E/mP@5", "M/mP@5", "H/mP@5"))
        )
        results[str(size)] = {"landmark_P@5": float(np.mean(precisions)), "top1": float(np.mean(top1)), **metrics}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights", type=Path, default=REPO.parent / "shared/weights/mobilenet_v2_imagenet_features.pth"
    )
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding paris6k/")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sizes for the Paris sections")
    parser.add_argument("--out", type=Path, default=REPO / "logs/experiments/reranking_effect")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers while indexing")
    parser.add_argument("--only", nargs="+", choices=["synthetic", "rparis6k", "paris-p5"], default=None)
    args = parser.parse_args()
    sections = args.only or ["synthetic", "rparis6k", "paris-p5"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if "synthetic" in sections:
        results["synthetic"] = synthetic_section(args.out, args.weights, args.workers)
    if "rparis6k" in sections:
        results["rparis6k"] = rparis_section(args.out, args.shared, args.weights, args.sizes, args.workers)
    if "paris-p5" in sections:
        results["paris-p5"] = paris_p5_section(args.out, args.shared, args.weights, args.sizes, args.workers)
    path = args.out / "results.json"
    tmp = path.with_name(".results.json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
