#!/bin/bash
# One device call: GPU tests of vlm.kernels at full sizes, then the kernel benchmarks.
# Run from the repo root on the GPU machine (the repo is not pip-installed there: the import shim in
# benchmarks/kernels/sitecustomize.py maps vlm.kernels to kernels/). Needs .whl/ with bitsandbytes.
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/bitsandbytes-*.whl
export PYTHONPATH=/tmp/site:$PWD/benchmarks/kernels:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, bitsandbytes.__version__)"
timeout ${TEST_TIMEOUT:-220} python3 -m pytest -m gpu tests/kernels -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/kernels/bench_kernels.py --out "$OUT" ${BENCH_ARGS} 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
