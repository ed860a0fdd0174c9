#!/usr/bin/env bash
# Fine-tune the ImageNet MobileNetV2 (+GeM, whitening) on the real Paris6k images available
# offline with the landmark-disjoint split: train on defense, eiffel and invalides, evaluate the
# held-out louvre and moulinrouge queries of Revisited Paris against every image on disk.
# The table before training (the pretrained network) and after is printed at the end.
# Arguments after the two paths are extra overrides, e.g. whitening=learned (post-hoc whitening: both tables then
# have a row with it and one without) and hydra.run.dir=logs/experiments/paris_finetune_whitening.
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${1:-../shared/weights/mobilenet_v2_imagenet_features.pth}
REAL=${2:-../shared}
shift $(($# < 2 ? $# : 2))
.venv/bin/oxford-ir-train experiment=gem_mobilenetv2 data=rparis6k paths.data_dir="$REAL" \
  backbone.weights="$WEIGHTS" data.allow_missing_images=true \
  data.split=landmarks data.held_out_landmarks=[louvre,moulinrouge] data.n_held_out=null \
  data.classes_per_batch=3 data.images_per_class=4 data.distractors_per_batch=0 \
  data.image_size=224 data.eval_image_size=512 model.eval_scales=[1.0] data.batches_per_epoch=10 \
  optimizer.lr=1e-4 model.backbone_lr=1e-5 \
  data.num_workers=2 trainer.max_epochs=4 validate_before_training=true logger=csv \
  hydra.run.dir=logs/experiments/paris_finetune "$@"
