#!/usr/bin/env bash
# Baselines of the evaluation protocol, as reported in experiments/README.md:
#   raw pixels, a randomly initialised and an ImageNet MobileNetV2 (+GeM), on the synthetic
#   benchmark and on the real Revisited Paris images available offline (a subset).
# Usage: experiments/eval_baselines.sh [path/to/mobilenet_v2_imagenet_features.pth] [real data dir]
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${1:-../shared/weights/mobilenet_v2_imagenet_features.pth}
REAL=${2:-../shared}
EVAL=.venv/bin/oxford-ir-eval
OUT=logs/experiments/eval_baselines

$EVAL backbone=raw_pixels pooling=flatten hydra.run.dir=$OUT/raw_pixels_synthetic
$EVAL backbone.weights=none hydra.run.dir=$OUT/random_mobilenetv2_synthetic
$EVAL backbone.weights="$WEIGHTS" hydra.run.dir=$OUT/imagenet_mobilenetv2_synthetic
$EVAL benchmarks=[rparis6k] allow_missing_images=true paths.data_dir="$REAL" \
  backbone=raw_pixels pooling=flatten hydra.run.dir=$OUT/raw_pixels_rparis6k_subset
$EVAL benchmarks=[rparis6k] allow_missing_images=true paths.data_dir="$REAL" \
  backbone.weights=none hydra.run.dir=$OUT/random_mobilenetv2_rparis6k_subset
$EVAL benchmarks=[rparis6k] allow_missing_images=true paths.data_dir="$REAL" \
  backbone.weights="$WEIGHTS" hydra.run.dir=$OUT/imagenet_mobilenetv2_rparis6k_subset
for run in "$OUT"/*/; do echo "== $run"; cat "$run/table.txt"; done
