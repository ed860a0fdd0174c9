#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run for a lent H100 / H200 (at most about 10 minutes):
#   1. the CUDA tests (nvJPEG decoding, the batched augmentation and prefetching, exact search on the device,
#      the extraction paths on the device);
#   2. the GPU benchmark, bash experiments/bench/gpu.sh (every row, under 5 minutes);
#   3. oxford-ir-eval on real Paris photos at 1024 px, each run's wall time and its metrics.json "extraction":
#      the defaults (bucket batching, JPEGs decoded on the GPU, float32) and the exact protocol (shape batching,
#      PIL decoding, float32) for the numbers; bucket and exact shape batching in bf16 + channels_last for the
#      speed (one cuDNN plan per input shape: shape batching stalled on real photos before).
#
# Needs, in the repository (git-ignored, carried to the GPU machine with the device tool's `carry`):
#   .whl/   wheels of hydra-core, omegaconf, antlr4-python3-runtime, pytorch-metric-learning, faiss-cpu for the
#           machine's Python (experiments/README.md, "GPU" says how to download them)
#   .gpu/   data/paris6k/{gnd_rparis6k.pkl,jpg/*.jpg} (real Paris photos, a subset) and
#           weights/mobilenet_v2_imagenet_features.pth (copies from ../shared, which does not travel)
# Writes into $OUT (default ./gpu_out): gpu_tests.log, bench_gpu.json, bench_gpu.log, paris.log, paris.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cudnn', torch.backends.cudnn.version())"
started=$SECONDS

echo "== 1. CUDA tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs \
    tests/data/test_gpu_decode.py tests/retrieval/test_exact_search.py \
    tests/extraction/test_embedding.py::test_cuda_extraction_paths_agree_with_the_cpu \
    $(ls tests/data/test_batch_augment.py tests/data/test_prefetch.py 2>/dev/null) \
    -k "cuda or gpu or device" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "tests: $((SECONDS - started)) s"

echo "== 2. benchmark"
timeout 370 env OUT="$OUT" bash experiments/bench/gpu.sh
echo "benchmark done at $((SECONDS - started)) s"

echo "== 3. real Paris photos, 1024 px"
runs=/tmp/paris_runs
rm -rf "$runs"
eval_run() {  # name, timeout, overrides...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" python3 -m oxford_ir.cli.evaluate benchmarks=[rparis6k] allow_missing_images=true \
        paths.data_dir="$PWD/.gpu/data" backbone.weights="$PWD/.gpu/weights/mobilenet_v2_imagenet_features.pth" \
        extraction.image_size=1024 extraction.device=cuda extraction.num_workers=8 extraction.batch_size=16 \
        hydra.run.dir="$runs/$name" "$@" >"$runs.$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s wall (process start, model load, planning, extraction, ranking)"
    [ -f "$runs/$name/table.txt" ] && cat "$runs/$name/table.txt" || tail -3 "$runs.$name.log"
}
{
    eval_run default 40
    eval_run exact_protocol 40 extraction.batching=shape extraction.decode=cpu
    eval_run bucket_bf16 30 extraction.precision=bf16 extraction.channels_last=true
    eval_run shape_bf16 30 extraction.batching=shape extraction.precision=bf16 extraction.channels_last=true
} 2>&1 | tee "$OUT/paris.log"
python3 - "$runs" "$OUT/paris.json" <<'EOF'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
report = {}
for run in sorted(p for p in runs.iterdir() if (p / "metrics.json").exists()):
    saved = json.loads((run / "metrics.json").read_text())
    report[run.name] = {"metrics": saved["metrics"], "extraction": saved.get("extraction")}
pathlib.Path(sys.argv[2]).write_text(json.dumps(report, indent=2))
for name, r in report.items():
    e = r["extraction"] or {}
    print(name, {k: e.get(k) for k in ("mode", "decode", "precision", "distinct_input_shapes", "padded_over_valid_pixels")},
          "M mAP", round(100 * r["metrics"].get("rparis6k/M/mAP", float("nan")), 2))
EOF
echo "all checks: $((SECONDS - started)) s"
