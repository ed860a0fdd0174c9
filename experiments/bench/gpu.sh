#!/usr/bin/env bash
# The GPU part of the benchmarks, for a lent H100 / H200, every row in under 6 minutes: training (ResNet-50,
# 362 px, bf16, 1024 px JPEGs), data loading, extraction on images with the size mix of Oxford/Paris (default
# bucket and exact shape modes, 1024 px), evaluation, exact search over 1M x 2048 float16 on the GPU and on the
# CPU cores, faiss IVF-PQ over 1M. Run from anywhere:
#
#   bash experiments/bench/gpu.sh                 # writes $OUT/bench_gpu.json and bench_gpu.log ($OUT or .)
#   bash experiments/bench/gpu.sh --only search   # any option of experiments/bench/run.py
#
# Time: run.py gets what is left of BENCH_SECONDS (default 340) after installing the wheels; each group of rows
# has its share of it (PROFILES["gpu"]["budgets"] in run.py: training 120 s, loading 35, extraction 65,
# evaluation 45, search 55), time a group leaves unused goes to the next, and a process still running when
# its group's time is spent is stopped and its row reported "over budget" while the run goes on. The JPEGs are
# written by a process pool into BENCH_IMAGES (default /tmp/oxford-ir-bench-images) and reused by a later run
# on the same machine. run.py rewrites its JSON after every row, so a killed run still leaves what it measured.
#
# That machine has torch, torchvision, lightning, pillow and numpy, but not hydra-core, omegaconf,
# antlr4-python3-runtime, pytorch-metric-learning or faiss-cpu: they travel as wheels in .whl/ (Python
# 3.12; how to download them: experiments/README.md, "GPU benchmark"). They are installed into BENCH_SITE
# (default /tmp/site). A check of every code path on a machine without a GPU (tiny sizes, no numbers; under
# a minute on 2 cores):
#   PYTHON=.venv/bin/python BENCH_SITE=$(mktemp -d) bash experiments/bench/gpu.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    SITE="${BENCH_SITE:-/tmp/site}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import hydra, omegaconf, pytorch_metric_learning" 2>/dev/null; then
    echo "gpu.sh: hydra-core, omegaconf or pytorch-metric-learning cannot be imported; put their wheels in .whl/" \
        "(experiments/README.md, 'GPU benchmark') or install the project (pip install -e '.[faiss]')" >&2
    exit 2
fi
"$PYTHON" -c "import faiss" 2>/dev/null || echo "gpu.sh: faiss is missing: the IVF-PQ row will say skipped" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

BUDGET=$(( ${BENCH_SECONDS:-340} - SECONDS ))
echo "gpu.sh: ${SECONDS} s of setup; run.py gets ${BUDGET} s" >&2
status=0
"$PYTHON" experiments/bench/run.py --profile gpu --out "$OUT/bench_gpu.json" --budget "$BUDGET" \
    --images "${BENCH_IMAGES:-/tmp/oxford-ir-bench-images}" "$@" 2>&1 | tee "$OUT/bench_gpu.log" || status=$?
echo "gpu.sh: ${SECONDS} s in all (exit status ${status})" | tee -a "$OUT/bench_gpu.log"
exit "$status"
