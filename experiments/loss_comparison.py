"""Many-class losses against triplet + semi-hard mining on the synthetic benchmark, a few CPU epochs each.

The quickstart (``conf/experiment/quickstart.yaml``: a scratch CNN with GeM on the Revisited synthetic benchmark,
seed split, Adam 1e-3) trained with each loss for the same number of epochs and batches, then evaluated once, after
the last epoch (val/mAP = Revisited Medium mAP):

- triplet (margin 0.2) + semi-hard mining within 0.1, P x K batches (the quickstart as it is);
- ArcFace on P x K batches and on plain shuffled batches (``data.sampler=random``, the same batch size);
- sub-center ArcFace and CosFace on shuffled batches;
- FastAP (listwise, ``distance=euclidean``) on P x K batches.

The classification losses and FastAP use no miner (the quickstart's is left out); the class weights are learned at
the optimizer's lr.
The synthetic benchmark has 8 landmarks (and 40 distractors, each a class of its own for ArcFace): the table says
whether each loss trains this network at all and how far it gets in a few epochs, not how it compares on 81k
landmarks. The quickstart's seed split evaluates the landmarks it trains on (a classification loss learns their
very class weights); ``--landmarks`` trains on 5 landmarks and evaluates the 3 held out (P = 5).

    .venv/bin/python experiments/loss_comparison.py            # 5 epochs x 25 batches each, ~10 min on 2 cores
    .venv/bin/python experiments/loss_comparison.py --landmarks   # landmark-disjoint: 3 landmarks held out
    .venv/bin/python experiments/loss_comparison.py --quick    # a tiny benchmark, 1 epoch x 3 batches: every row runs
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from miniature_recipe import train_run  # experiments/, beside this script

#: what every row trains: the quickstart on the CPU, logged to CSV, validated after its last epoch only
RECIPE = [
    "experiment=quickstart",
    "validate_before_training=false",
    "test=false",
    "logger=csv",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
#: (row, sampler, overrides)
ROWS = [
    ("triplet + semi-hard mining", "P x K", []),
    ("arcface", "P x K", ["loss=arcface"]),
    ("arcface", "random", ["loss=arcface", "data.sampler=random"]),
    ("subcenter_arcface", "random", ["loss=subcenter_arcface", "data.sampler=random"]),
    ("cosface", "random", ["loss=cosface", "data.sampler=random"]),
    ("fastap", "P x K", ["loss=fastap", "distance=euclidean"]),
]
#: --quick: the tiny benchmark and batches of the training tests (4 landmarks, 64 px; 3 landmarks x 2 images a batch)
QUICK = [
    "data.synthetic.n_landmarks=4",
    "data.synthetic.images_per_landmark=6",
    "data.synthetic.queries_per_landmark=2",
    "data.synthetic.n_distractors=8",
    "data.synthetic.photo_long_side=64",
    "data.image_size=32",
    "data.eval_image_size=64",
    "data.classes_per_batch=3",
    "data.images_per_class=2",
    "data.distractors_per_batch=2",
]
#: --landmarks: the landmark-disjoint split (conf/data/synthetic.yaml)
LANDMARKS = ["data.split=landmarks", "data.n_held_out=3", "data.classes_per_batch=5"]
#: the evaluation table's columns (Revisited protocol) and where train() reports them
COLUMNS = {"E mAP": "E/mAP", "M mAP (val/mAP)": "M/mAP", "H mAP": "H/mAP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=25, help="training batches per epoch")
    parser.add_argument("--quick", action="store_true", help="a tiny benchmark, 1 epoch x 3 batches: every row runs")
    parser.add_argument("--landmarks", action="store_true", help="train on 5 landmarks, evaluate the 3 held out")
    parser.add_argument("--out", type=Path, default=None, help="runs and data go here (default: a temp folder)")
    args = parser.parse_args()
    epochs, batches = (1, 3) if args.quick else (args.epochs, args.batches)
    out = args.out or Path(tempfile.mkdtemp(prefix="loss_comparison_"))
    data = out / "data"
    print(f"{epochs} epochs x {batches} batches each; runs in {out}", flush=True)
    results = []
    start = time.perf_counter()
    for n, (name, sampler, overrides) in enumerate(ROWS):
        length = [f"trainer.max_epochs={epochs}", f"data.batches_per_epoch={batches}"]
        length += [f"trainer.check_val_every_n_epoch={epochs}", *(QUICK if args.quick else [])]
        length += LANDMARKS if args.landmarks else []
        metrics, objects, seconds = train_run(out, data, f"run{n}", RECIPE, *overrides, *length)
        benchmark = objects["datamodule"].eval_benchmark.name
        row = {c: 100 * float(metrics[f"val/{benchmark}/{key}"]) for c, key in COLUMNS.items()}
        results.append((name, sampler, row, float(metrics.get("train/loss_epoch", float("nan"))), seconds))
        print(f"{name} ({sampler}): M mAP {row['M mAP (val/mAP)']:.2f} in {seconds:.0f} s", flush=True)
    print(
        f"\n{epochs} epochs x {batches} batches{' (tiny benchmark)' if args.quick else ''}, quickstart (scratch CNN + "
        f"GeM, rsynthetic, {'landmarks split, 3 held out' if args.landmarks else 'seed split'}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s"
    )
    print("| loss | batches | " + " | ".join(COLUMNS) + " | last train/loss_epoch | s |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 2))
    for name, sampler, row, loss, seconds in results:
        cells = " | ".join(f"{row[c]:.2f}" for c in COLUMNS)
        print(f"| {name} | {sampler} | {cells} | {loss:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
