"""A CPU recipe on the Google Landmarks v2 miniature: the real downloader, the real reader, the real training.

The miniature (:mod:`oxford_ir.benchmarks.miniature_gldv2`, here 30 landmarks of 2 to 8 photos in the official
server tree, 3 TARs with their md5 files) is fetched from a ``file://`` mirror by ``download_gldv2`` (md5 checked,
unpacked, ids recorded), as ``oxford-ir-data download gldv2 --base-url file://... --parts 0-2`` would, and trained
on with ``data=gldv2`` and the subset ``gldv2:min3:val6`` (the landmarks with at least 3 photos; 6 of them held
out as split val, each of their photos a query against the others): a scratch CNN with GeM, triplet loss with
semi-hard mining, P 4 landmarks x K 3 photos a batch, validated before training and after each epoch. The numbers
show that every step runs and that the network learns the miniature's landmarks; they say nothing about the real
dataset.

    .venv/bin/python experiments/gldv2_miniature.py                  # 5 epochs x 10 batches, seeds 0 1
    .venv/bin/python experiments/gldv2_miniature.py --epochs 3 --seeds 42 --out /tmp/gldv2
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from miniature_recipe import QUICKSTART_ON_CPU, train_run  # experiments/, beside this script

from oxford_ir.benchmarks.gldv2_download import download_gldv2
from oxford_ir.benchmarks.miniature_gldv2 import write_miniature_gldv2

#: the quickstart recipe, shrunk to the miniature's size
RECIPE = [
    "data=gldv2",
    "data.benchmark=gldv2:min3:val6",
    *QUICKSTART_ON_CPU,
    "data.image_size=48",
    "data.eval_image_size=64",
    "data.classes_per_batch=4",
    "data.images_per_class=3",
    "data.eval_batch_size=8",
]


def run(out: Path, data: Path, name: str, *overrides: str) -> tuple[dict[str, float], float]:
    metrics, _, seconds = train_run(out, data, name, RECIPE, *overrides)
    return metrics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="training batches per epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None, help="runs and data go here (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gldv2_miniature_"))
    mirror = write_miniature_gldv2(out / "mirror", landmarks=30)
    start = time.perf_counter()
    download_gldv2(out / "data", list(range(mirror.parts)), base_url=mirror.folder.as_uri(), progress=False)
    fetched = time.perf_counter() - start
    rows = []
    for seed in args.seeds:
        common = [f"trainer.max_epochs={args.epochs}", f"data.batches_per_epoch={args.batches}", f"seed={seed}"]
        rows.append((seed, *run(out, out / "data", f"seed{seed}", *common)))
    print(f"\n{args.epochs} epochs x {args.batches} batches; download of the 3 parts {fetched:.1f} s; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; runs in {out}\n")  # fmt: skip
    print("| seed | untrained val/mAP | trained val/mAP | other final metrics | wall time |")
    print("|---:|---:|---:|---|---:|")
    for seed, metrics, seconds in rows:
        others = ", ".join(
            f"{k.removeprefix('final/val/')} {v:.3f}"
            for k, v in sorted(metrics.items())
            if k.startswith("final/val/") and k != "final/val/mAP" and ("R@" in k or "mP@" in k)
        )
        print(f"| {seed} | {metrics['untrained/val/mAP']:.4f} | {metrics['final/val/mAP']:.4f} | {others} "
              f"| {seconds:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
