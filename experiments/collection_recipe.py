"""A CPU recipe on a folder of one's own photos: ``data=collection`` end to end, a few epochs.

The folder is made from the offline synthetic benchmark (:mod:`oxford_ir.benchmarks.synthetic`, the default preset:
8 landmarks, 160 px JPEGs) regrouped one sub-folder per landmark: each landmark's queries and positives (easy and
hard views; junk views and distractors are left out), ``photos/<landmark>/<image>.jpg``, as a user would sort their
own photos. Every image is in the train split, so ``data.n_held_out`` landmarks (drawn with the seed) are held out
and evaluated, each of their photos against the others (mAP, mP@k, recall@k), before training and after each
epoch; training never sees them. The quickstart's network (a scratch CNN with GeM, triplet loss, semi-hard mining).
Then ``oxford-ir-eval benchmarks=[collection:<photos>]`` evaluates the trained checkpoint on the whole folder
(seen and held-out landmarks: not a held-out number). The numbers show that every step runs and that the network
learns; they say nothing about real photos.

    .venv/bin/python experiments/collection_recipe.py                      # 5 epochs x 10 batches
    .venv/bin/python experiments/collection_recipe.py --epochs 3 --out /tmp/collection
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from miniature_recipe import QUICKSTART_ON_CPU, REPO, train_run  # experiments/, beside this script

from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.synthetic import write_synthetic_benchmark
from oxford_ir.cli.evaluate import evaluate

#: the quickstart recipe on a collection
RECIPE = [
    "data=collection",
    *QUICKSTART_ON_CPU,
    "data.image_size=96",
    "data.eval_image_size=128",
    "data.classes_per_batch=5",
    "data.images_per_class=4",
    "data.eval_batch_size=16",
]


def photo_folder(data: Path, photos: Path) -> Path:
    """The synthetic benchmark's landmark photos copied to ``photos/<landmark>/<name>.jpg``."""
    benchmark = load_benchmark("synthetic", data)
    for q, landmark in enumerate(benchmark.query_landmarks):
        names = [benchmark.qimlist[q], *(benchmark.imlist[i] for i in benchmark.positives(q))]
        for name in names:
            target = photos / landmark / f"{name}.jpg"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(benchmark.image_path(name), target)
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="training batches per epoch")
    parser.add_argument("--held-out", type=int, default=3, help="landmarks held out and evaluated")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="runs and data go here (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="collection_recipe_"))
    data = out / "data"
    write_synthetic_benchmark(data / "synthetic")
    photos = photo_folder(data, out / "photos")
    n_photos = sum(1 for _ in photos.rglob("*.jpg"))
    metrics, objects, seconds = train_run(
        out, data, "train", RECIPE, f"data.benchmark=collection:{photos}", f"data.n_held_out={args.held_out}",
        f"trainer.max_epochs={args.epochs}", f"data.batches_per_epoch={args.batches}", f"seed={args.seed}",
    )  # fmt: skip
    split = objects["datamodule"].split
    checkpoint = objects["trainer"].checkpoint_callback.best_model_path
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        eval_cfg = compose(
            "eval",
            overrides=[
                f"paths.data_dir={data}", f"paths.output_dir={out / 'eval'}", f"ckpt_path={checkpoint}",
                f"benchmarks=[collection:{photos}]", "extraction.image_size=128", "extraction.num_workers=0",
            ],
        )  # fmt: skip
    start = time.perf_counter()
    whole, _ = evaluate(eval_cfg)
    eval_seconds = time.perf_counter() - start

    name = photos.name
    print(f"\n{n_photos} photos of {split.num_classes + len(split.held_out_landmarks)} landmarks in {photos}; held out "
          f"(evaluated, never trained on): {', '.join(split.held_out_landmarks)}; {args.epochs} epochs x "
          f"{args.batches} batches, seed {args.seed}; {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores; runs in {out}\n")  # fmt: skip
    print("| evaluated | network | mAP | mP@1 | R@1 | R@5 | wall time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for prefix, network, wall in (("untrained/val", "untrained", ""), ("final/val", "trained", f"{seconds:.0f} s")):
        m = {k: metrics[f"{prefix}/{name}/{k}"] for k in ("mAP", "mP@1", "R@1", "R@5")}
        print(f"| held-out landmarks ({split.eval_benchmark.n_queries} photos) | {network} | {100 * m['mAP']:.2f} | "
              f"{100 * m['mP@1']:.2f} | {100 * m['R@1']:.2f} | {100 * m['R@5']:.2f} | {wall} |")  # fmt: skip
    m = {k: whole[f"{name}/{k}"] for k in ("mAP", "mP@1", "R@1", "R@5")}
    print(f"| whole folder, oxford-ir-eval ({n_photos} photos; trained landmarks included) | trained | "
          f"{100 * m['mAP']:.2f} | {100 * m['mP@1']:.2f} | {100 * m['R@1']:.2f} | {100 * m['R@5']:.2f} | "
          f"{eval_seconds:.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
