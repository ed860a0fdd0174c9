#!/usr/bin/env bash
# Loss / miner comparison on the quickstart (synthetic benchmark, scratch CNN, CPU), one Hydra
# multirun, one W&B group; the table in README.md ("Mining from scratch") came from these runs.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/oxford-ir-train -m experiment=quickstart logger=csv trainer.max_epochs=6 \
  'miner=triplet_semihard,triplet_hard,batch_hard' loss.margin=0.2 \
  hydra.sweep.dir=logs/experiments/mining_comparison
.venv/bin/oxford-ir-train experiment=quickstart logger=csv trainer.max_epochs=6 \
  miner=multi_similarity loss=multi_similarity hydra.run.dir=logs/experiments/mining_comparison/ms
