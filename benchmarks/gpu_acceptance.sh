#!/usr/bin/env bash
# The GPU acceptance run on one GPU, sized for one device call (at most 600 s; a lent machine has 15 minutes
# in all, its start included): the CUDA tests, then the throughput benchmarks, most wanted first, each under its
# own time cap so a slow one cannot take the rest down. Every output goes to $OUT (the device tool brings it back)
# or bench-gpu-<date>/; paste the tables into docs/performance.md with the date and the device.
#
# On the lent machine (its python3 has torch; nothing can be downloaded there), after `bash benchmarks/gpu_wheels.sh`
# here, one call of the device tool with carry [".whl"] and timeout_s 590:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_acceptance.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
OUT=${OUT:-bench-gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run with a cap, output to the terminal and $OUT/NAME.txt
    local name=$1 cap=$2; shift 2
    echo "== $name (cap ${cap}s): $*" | tee "$OUT/$name.txt"
    timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
step test_cuda 120 env DIFFIT_TEST_CUDA=1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
# compiling (auto on CUDA) takes most of these caps: XL/2 is one block graph, the U-Nets one per resolution
step bench_train 220 $PY benchmarks/bench_train.py --full --quick --workers 8 --presets imagenet256,cifar10,ffhq64
step bench_samplers 70 $PY benchmarks/bench_samplers.py --batch 256 --repeats 1 --xl-steps 25
step bench_cudagraphs 120 $PY benchmarks/bench_cudagraphs.py --steps 10 --cases cifar10,sampling,ffhq64
step bench_attention 25 $PY benchmarks/bench_attention.py
echo "figures in $OUT/"
