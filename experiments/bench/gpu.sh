#!/usr/bin/env bash
# The GPU part of the benchmarks, for a lent H100 / H200, in a few minutes (about 5 expected, under 8):
# training (ResNet-50, 362 px, bf16, 1024 px JPEGs), extraction and evaluation at 1024 px, exact search over
# 1M x 2048 float16 on the GPU and on the CPU cores, faiss IVF-PQ recall@10. Run from anywhere:
#
#   bash experiments/bench/gpu.sh                 # writes $OUT/bench_gpu.json and bench_gpu.log ($OUT or .)
#   bash experiments/bench/gpu.sh --only search   # any option of experiments/bench/run.py
#
# That machine has torch, torchvision, lightning, pillow and numpy, but not hydra-core, omegaconf,
# antlr4-python3-runtime, pytorch-metric-learning or faiss-cpu: they travel as wheels in .whl/ (Python
# 3.12; how to download them: experiments/README.md, "GPU benchmark"). They are installed into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import hydra, omegaconf, pytorch_metric_learning" 2>/dev/null; then
    echo "gpu.sh: hydra-core, omegaconf or pytorch-metric-learning cannot be imported; put their wheels in .whl/" \
        "(experiments/README.md, 'GPU benchmark') or install the project (pip install -e '.[faiss]')" >&2
    exit 2
fi
"$PYTHON" -c "import faiss" 2>/dev/null || echo "gpu.sh: faiss is missing: the IVF-PQ row will say skipped" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

"$PYTHON" experiments/bench/run.py --profile gpu --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
