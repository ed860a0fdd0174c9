"""Pool mining (``data.mining=pool``, cnnimageretrieval-pytorch's tuples) against in-batch mining on the
retrieval-SfM-120k miniature, on the CPU.

The miniature of ``sfm120k_miniature.py`` (12 train 3D models x 10 photos, three published query/positive pairs a
model; 6 val models x 8 photos, 18 val queries) trained with the same scratch CNN + GeM, 48 px crops, seed 42, for
the same number of epochs and optimizer steps (10 a epoch), three ways:

- ``batch``: the quickstart's P 4 models x K 4 photos (16 images a step), triplet loss with semi-hard mining;
- ``pool contrastive``: each epoch 20 of the 36 published pairs and a pool of all 120 train photos embedded by the
  current network, 5 negatives a query (one per other model); 2 tuples (14 images) a step; cirtorch's contrastive
  loss (squared, margin 0.7, summed, ``loss=cirtorch_contrastive``);
- ``pool triplet``: the same tuples with the triplet loss (margin 0.2) on each tuple's 5 triplets.

Each row: val/mAP of the untrained network and of the best checkpoint, and the wall time of the whole run (the
mining's share is timed separately: the seconds spent in ``embed_images``, which embeds the queries and the pool).
The numbers show the wiring and the cost; the miniature says nothing about retrieval-SfM-120k itself.

    .venv/bin/python experiments/pool_mining_miniature.py
    .venv/bin/python experiments/pool_mining_miniature.py --epochs 3 --out /tmp/pool
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from miniature_recipe import QUICKSTART_ON_CPU, train_run  # experiments/, beside this script
from sfm120k_miniature import MINIATURE

from oxford_ir.benchmarks.miniature_sfm120k import write_miniature_sfm120k
from oxford_ir.benchmarks.sfm120k import FOLDER
from oxford_ir.models.module import RetrievalModule

RECIPE = [
    "data=sfm120k",
    *QUICKSTART_ON_CPU,
    "data.image_size=48",
    "data.eval_image_size=64",
    "data.classes_per_batch=4",
    "data.images_per_class=4",
    "data.eval_batch_size=8",
]
POOL = ["data.mining=pool", "data.pool.qsize=20", "data.pool.poolsize=120", "data.pool.nnum=5",
        "data.pool.tuples_per_batch=2", "miner=none", "distance=euclidean"]  # fmt: skip
RUNS = {
    "batch (P 4 x K 4, triplet, semi-hard)": ["data.batches_per_epoch=10"],
    "pool contrastive (2 tuples of 7, cirtorch's loss)": [*POOL, "loss=cirtorch_contrastive"],
    "pool triplet (2 tuples of 7, margin 0.2)": [*POOL, "loss=triplet"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="runs and data go here (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="pool_mining_"))
    data = out / "data"
    write_miniature_sfm120k(data / FOLDER, **MINIATURE)
    mining = {"seconds": 0.0, "images": 0}
    embed = RetrievalModule.embed_images

    def timed(self, paths, **settings):
        start = time.perf_counter()
        try:
            return embed(self, paths, **settings)
        finally:
            mining["seconds"] += time.perf_counter() - start
            mining["images"] += len(paths)

    RetrievalModule.embed_images = timed
    rows = []
    for i, (name, overrides) in enumerate(RUNS.items()):
        mining.update(seconds=0.0, images=0)
        common = [f"trainer.max_epochs={args.epochs}", f"seed={args.seed}"]
        metrics, _, seconds = train_run(out, data, f"run{i}", RECIPE, *common, *overrides)
        rows.append((name, metrics, seconds, dict(mining)))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{args.epochs} epochs x 10 steps, seed {args.seed}; {machine}; runs in {out}\n")
    print("| training | untrained val/mAP | trained val/mAP | R@1 | mining: images embedded, seconds | wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, metrics, seconds, mined in rows:
        r1 = next((v for k, v in metrics.items() if k.startswith("final/val/") and k.endswith("/R@1")), float("nan"))
        cost = f"{mined['images']}, {mined['seconds']:.1f} s" if mined["images"] else "-"
        print(
            f"| {name} | {metrics['untrained/val/mAP']:.4f} | {metrics['final/val/mAP']:.4f} | {r1:.3f} | {cost} "
            f"| {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
