#!/usr/bin/env bash
# Bucket batching (the default: at most 16 padded input shapes, masked) against exact shape batching, as reported
# in experiments/README.md: the ImageNet MobileNetV2 + GeM on the synthetic benchmark and on the real Revisited
# Paris images available offline (a subset) at 1024 px. Prints each run's table and its metrics.json "extraction".
# Usage: experiments/extraction_modes.sh [path/to/mobilenet_v2_imagenet_features.pth] [real data dir]
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${1:-../shared/weights/mobilenet_v2_imagenet_features.pth}
REAL=${2:-../shared}
EVAL=.venv/bin/oxford-ir-eval
OUT=logs/experiments/extraction_modes
COMMON=(backbone.weights="$WEIGHTS" extraction.device=cpu extraction.num_workers=2)

for mode in bucket shape; do
  $EVAL "${COMMON[@]}" extraction.batching=$mode hydra.run.dir=$OUT/synthetic_$mode
  $EVAL "${COMMON[@]}" extraction.batching=$mode benchmarks=[rparis6k] allow_missing_images=true \
    paths.data_dir="$REAL" extraction.image_size=1024 hydra.run.dir=$OUT/rparis6k_subset_$mode
done
for run in "$OUT"/*/; do
  echo "== $run"
  cat "$run/table.txt"
  python3 -c "import json, sys; e = json.load(open(sys.argv[1]))['extraction']; e.pop('benchmarks'); print(e)" \
    "$run/metrics.json"
done
