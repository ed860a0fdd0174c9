"""Time to the first training batch and memory, for a 1.6-million-image, 81k-class manifest (issue 17 item 5).

What training does before its first step on a GLDv2-sized collection, image files aside (they need not exist):
read the CSV manifest into a :class:`~oxford_ir.benchmarks.collection.Collection`
(:mod:`oxford_ir.benchmarks.collection_manifest`: the first parse, then from its cache), make the
:class:`~oxford_ir.benchmarks.splits.TrainSplit` (paths as a
:class:`~oxford_ir.benchmarks.path_array.PathArray`, labels sorted by class, as
:func:`~oxford_ir.benchmarks.collection_split.collection_split` builds it), pick the classes a P x K batch can
draw (``classes_for_batches``), build the :class:`~oxford_ir.data.sampler.ClassBalancedSampler` and draw its first
batch; then the first batch through a DataLoader with forked workers over a dataset that holds the split's paths
and labels as training does (``TrainImageDataset`` holds the same two arrays; its items here return the path
instead of decoding it). Each reading runs in a fresh process, so that its resident memory is its own:
``VmRSS`` of the main process at the first batch, its peak (``VmHWM``), and of one DataLoader worker when it
delivers. For scale, the same paths as a list of ``Path`` objects (what ``TrainSplit`` held before).

    python experiments/bench/scale_manifest.py                      # 1.6M rows, 81k classes, P=8 K=4, 2 workers
    python experiments/bench/scale_manifest.py --rows 200000 --classes 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb(field: str = "VmRSS") -> float:
    """``field`` of /proc/self/status in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_manifest(path: Path, rows: int, classes: int, seed: int = 0) -> None:
    """A GLDv2-like CSV: ``train/a/b/c/<16 hex>.jpg`` paths, class sizes skewed (log-normal, at least 2)."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(2, rng.lognormal(2.5, 0.9, classes))
    sizes = np.maximum(2, np.round(sizes * (rows / sizes.sum()))).astype(np.int64)
    sizes[np.argmax(sizes)] += rows - sizes.sum()
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    hashes = [f"{x:016x}" for x in rng.integers(0, 2**63, rows)]
    lines = (f"train/{h[0]}/{h[1]}/{h[2]}/{h}.jpg,{label}\n" for h, label in zip(hashes, labels.tolist(), strict=True))
    with open(path, "w") as handle:
        handle.write("path,label\n")
        handle.writelines(lines)


class PathsOnly:
    """A training dataset's state (the split's paths and labels) whose items name the file instead of decoding
    it, and say the resident memory of the worker that made them."""

    def __init__(self, paths, labels) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, _seed = item
        return str(self.paths[index]), int(self.labels[index]), rss_mb()


def measure(manifest: Path, p: int, k: int, workers: int) -> dict:
    """One reading, in this process (see the module docstring)."""
    start = time.perf_counter()
    from torch.utils.data import DataLoader

    from oxford_ir.benchmarks.collection_manifest import load_manifest
    from oxford_ir.benchmarks.path_array import PathArray
    from oxford_ir.benchmarks.splits import TrainSplit
    from oxford_ir.data.sampler import ClassBalancedSampler

    times = {"imports_s": time.perf_counter() - start}
    imports_rss = rss_mb()  # torch and the package: the floor of any training process
    t = time.perf_counter()
    collection = load_manifest(manifest, warn=False).collection
    times["manifest_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = collection.rows("train")
    trained, labels = np.unique(collection.labels[rows], return_inverse=True)
    order = np.argsort(labels, kind="stable")
    rows, labels = rows[order], labels.reshape(-1)[order].astype(np.int64)
    split = TrainSplit(
        kind="collection",
        paths=PathArray(collection.root, collection.paths, rows),  # rows of the names: none copied
        labels=labels,
        label_names=collection.label_names[trained].tolist(),
        num_landmark_classes=len(trained),
        eval_benchmark=None,  # type: ignore[arg-type]  (not evaluated here)
        train_benchmark=str(manifest),
    )
    times["train_split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    classes = split.classes_for_batches(p, k)
    num_batches = max(1, int(np.isin(split.labels, classes).sum()) // (p * k))
    sampler = ClassBalancedSampler(split.labels, classes, p, k, num_batches, seed=0)
    times["sampler_s"] = time.perf_counter() - t
    t = time.perf_counter()
    it = iter(sampler)
    first = [next(it) for _ in range(sampler.batch_size)]
    times["first_batch_ms"] = 1000 * (time.perf_counter() - t)
    times["to_first_batch_s"] = time.perf_counter() - start
    main_rss = rss_mb()
    t = time.perf_counter()
    loader = DataLoader(
        PathsOnly(split.paths, split.labels),
        batch_size=sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
    )
    paths, batch_labels, worker_rss = next(iter(loader))
    times["loader_first_batch_s"] = time.perf_counter() - t
    assert len(set(first)) == sampler.batch_size and len(paths) == sampler.batch_size
    assert sorted(np.bincount(batch_labels.numpy()).tolist())[-p:] == [k] * p
    return {
        **{key: round(value, 3) for key, value in times.items()},
        "images": len(split),
        "classes": split.num_classes,
        "batches_per_epoch": num_batches,
        "imports_rss_mb": round(imports_rss, 1),
        "main_rss_mb": round(main_rss, 1),
        "main_peak_mb": round(rss_mb("VmHWM"), 1),
        "worker_rss_mb": round(float(worker_rss.max()), 1),
    }


def path_list(manifest: Path) -> dict:
    """The same training paths as a list of ``Path`` objects (what TrainSplit held before), in this process."""
    from oxford_ir.benchmarks.collection_manifest import load_manifest

    collection = load_manifest(manifest, warn=False).collection
    before = rss_mb()
    t = time.perf_counter()
    paths = collection.image_paths()
    _ = [str(path) for path in paths[: len(paths) // 10]]
    return {"path_list_s": round(time.perf_counter() - t, 3), "path_list_mb": round(rss_mb() - before, 1)}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_600_000)
    parser.add_argument("--classes", type=int, default=81_000)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", choices=["measure", "paths"])
    parser.add_argument("--manifest", type=Path)
    args = parser.parse_args()
    if args.child == "measure":
        print(json.dumps(measure(args.manifest, args.p, args.k, args.workers)))
        return
    if args.child == "paths":
        print(json.dumps(path_list(args.manifest)))
        return
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "manifest.csv"
        t = time.perf_counter()
        write_manifest(manifest, args.rows, args.classes)
        written = time.perf_counter() - t
        common = ["--manifest", str(manifest), "--p", str(args.p), "--k", str(args.k), "--workers", str(args.workers)]
        first = run_child("--child", "measure", *common)  # parses the CSV and writes its cache
        cached = run_child("--child", "measure", *common)  # reads the cache
        paths = run_child("--child", "paths", "--manifest", str(manifest))
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {platform.processor()}",
        "manifest": {"rows": args.rows, "classes": args.classes, "write_s": round(written, 1)},
        "first_parse": first,
        "cached": cached,
        "list_of_path": paths,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
