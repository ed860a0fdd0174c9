"""A CPU recipe on the retrieval-SfM-120k miniature: the real reader, the real training, a few epochs.

The miniature (:mod:`oxford_ir.benchmarks.miniature_sfm120k`, larger than the tests' one: 12 train 3D models x 10
photos, 6 val models x 8, three query/positive pairs a model, 64 x 48 px JPEGs in the published layout) is written
into ``<data>/retrieval-SfM-120k`` and trained on with ``data=sfm120k``, exactly as the real dataset would be: a
scratch CNN with GeM, triplet loss with semi-hard mining, P 4 models x K 4 photos a batch, validated on the val part
(each of the 18 val queries against the 48 val photos; mAP, mP@k, R@k) before training and after each epoch. A
second run validates on another benchmark (``data.eval_benchmark=rsynthetic``, the offline stand-in of
``roxford5k``) to show the published setting's wiring. The numbers show that every step runs and that the
network learns the miniature's clusters; they say nothing about the real dataset.

    .venv/bin/python experiments/sfm120k_miniature.py                  # 5 epochs x 10 batches, both runs
    .venv/bin/python experiments/sfm120k_miniature.py --epochs 3 --out /tmp/sfm
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from miniature_recipe import QUICKSTART_ON_CPU, train_run  # experiments/, beside this script

from oxford_ir.benchmarks.miniature_sfm120k import write_miniature_sfm120k
from oxford_ir.benchmarks.sfm120k import FOLDER

#: the miniature trained on (the tests use the default, smaller one)
MINIATURE = {"train_clusters": 12, "train_images": 10, "val_clusters": 6, "val_images": 8, "queries_per_cluster": 3}
#: the quickstart recipe, shrunk to the miniature's size
RECIPE = [
    "data=sfm120k",
    *QUICKSTART_ON_CPU,
    "data.image_size=48",
    "data.eval_image_size=64",
    "data.classes_per_batch=4",
    "data.images_per_class=4",
    "data.eval_batch_size=8",
]


def run(out: Path, data: Path, name: str, *overrides: str) -> tuple[dict[str, float], float]:
    metrics, _, seconds = train_run(out, data, name, RECIPE, *overrides)
    return metrics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="training batches per epoch")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="runs and data go here (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sfm120k_miniature_"))
    data = out / "data"
    write_miniature_sfm120k(data / FOLDER, **MINIATURE)
    common = [f"trainer.max_epochs={args.epochs}", f"data.batches_per_epoch={args.batches}", f"seed={args.seed}"]
    rows = []
    for name, evaluated, extra in (
        ("val", "sfm120k val part (18 queries, 48 photos)", []),
        ("rsynthetic", "rsynthetic (stand-in for roxford5k)", ["data.eval_benchmark=rsynthetic"]),
    ):
        metrics, seconds = run(out, data, name, *common, *extra)
        rows.append((evaluated, metrics, seconds))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{args.epochs} epochs x {args.batches} batches, seed {args.seed}; {machine}; runs in {out}\n")
    print("| validated on | untrained val/mAP | trained val/mAP | other final metrics | wall time |")
    print("|---|---:|---:|---|---:|")
    for evaluated, metrics, seconds in rows:
        others = ", ".join(
            f"{k.removeprefix('final/val/')} {v:.4f}"
            for k, v in sorted(metrics.items())
            if k.startswith("final/val/") and k.endswith(("/R@1", "/R@5", "/E/mAP", "/H/mAP"))
        )
        print(
            f"| {evaluated} | {metrics['untrained/val/mAP']:.4f} | {metrics['final/val/mAP']:.4f} | {others} "
            f"| {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
