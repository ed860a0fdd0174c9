#!/usr/bin/env bash
# Loss / miner comparison on the quickstart (synthetic benchmark, scratch CNN, CPU); the table in
# experiments/README.md ("Mining from scratch") came from these runs. Each run prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=.venv/bin/oxford-ir-train
QUICK="experiment=quickstart logger=csv"
OUT=logs/experiments/mining_comparison
$TRAIN -m $QUICK trainer.max_epochs=6 miner=triplet_semihard,triplet_hard loss.margin=0.2 hydra.sweep.dir=$OUT/triplet
$TRAIN $QUICK trainer.max_epochs=6 miner=multi_similarity loss=multi_similarity hydra.run.dir=$OUT/multi_similarity
$TRAIN $QUICK trainer.max_epochs=10 miner=batch_hard loss.margin=0.1 hydra.run.dir=$OUT/batch_hard
