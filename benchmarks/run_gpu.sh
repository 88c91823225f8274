#!/usr/bin/env bash
# Everything a lent GPU should tell us, in one call:
#   bash benchmarks/run_gpu.sh [RESULTS_DIR]     (default: $OUT, else benchmarks/results)
# 1. installs padd (no deps: the GPU image brings torch/triton/transformers; optional peers
#    such as liger-kernel travel as wheels in .whl/),
# 2. runs the whole test suite on the GPU (bf16 tests included),
# 3. runs every benchmark against its peers and writes one JSON per suite.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$RESULTS"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/device.txt"
export PYTHONUNBUFFERED=1 PADD_BENCH_OUT="$RESULTS"
# xdist when present: one process per test file would leave the 16 cores of a lent H100 idle
# while Triton compiles (the serial suite did not finish in 6 minutes there).
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
python3 -m pytest tests -q -p no:cacheprovider $XDIST -rfE 2>&1 | tee "$RESULTS/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
# A speed-up is only worth reporting for kernels whose tests pass: the log says which failed.
python3 -m pytest benchmarks -q -s -p no:cacheprovider 2>&1 | tee "$RESULTS/benchmarks.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc benchmarks rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
