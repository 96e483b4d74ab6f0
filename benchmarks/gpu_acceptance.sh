#!/usr/bin/env bash
# Issue 17's acceptance run on one GPU: the CUDA tests, then every throughput benchmark; all output goes to
# bench-gpu-<date>/ (paste the tables into README's benchmark section with the date and the device).
#   bash benchmarks/gpu_acceptance.sh            # about 15-25 minutes on an H100/H200
set -uo pipefail
PY=${PY:-python}
OUT=${OUT:-bench-gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
HF_HUB_OFFLINE=1 DIFFIT_TEST_CUDA=1 $PY -m pytest -q tests/test_cuda.py 2>&1 | tail -30 | tee "$OUT/test_cuda.txt"
$PY benchmarks/bench_attention.py 2>&1 | tee "$OUT/bench_attention.txt"
$PY benchmarks/bench_networks.py 2>&1 | tee "$OUT/bench_networks.txt"
$PY benchmarks/bench_train.py --full --quick --workers 8 2>&1 | tee "$OUT/bench_train.txt"
$PY benchmarks/bench_samplers.py --batch 256 2>&1 | tee "$OUT/bench_samplers.txt"
echo "figures in $OUT/"
