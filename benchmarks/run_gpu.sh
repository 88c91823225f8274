#!/usr/bin/env bash
# Everything a lent GPU should tell us, in priority order, inside one device call (10 minutes):
#   bash benchmarks/run_gpu.sh [RESULTS_DIR]     (default: $OUT, else benchmarks/results)
#
# Every phase runs under `timeout` against one deadline, PADD_GPU_BUDGET_S (default 570) seconds
# after this script starts: a phase gets at most its own limit and never runs past the deadline,
# so a slow phase costs the phases after it, never the whole call. The benchmarks rewrite their
# JSON after every measurement, so a phase cut short keeps what it measured. phases.txt says what
# ran, for how long, with which exit code, and what was skipped for lack of time; each phase's
# full output is in PHASE.log.
#   0. install padd (no deps: the GPU image brings torch/triton/transformers; optional peers such
#      as liger-kernel travel as wheels in .whl/); if .whl/megablocks-*.tar.gz (and the
#      stanford-stk sdist) are there, build them in the background (megablocks-build.log).
#   1. kernel tests: tests/kernels, bf16 included; tests/test_pipeline.py (the stages on CUDA).
#   2. MoE FFN, fwd and fwd+bwd, 5 models, decode (T=1,8,64) then prefill/training
#      (T=512,4096,32768), against transformers eager/grouped_mm/batched_mm;
#      KD loss N=16384 V=128256 (forward KL, JSD); fused-linear JSD N=8192 V=128256 H=4096
#      against LigerFusedLinearJSD (time and peak memory); the fused activation variants
#      (GPT-OSS-20B, DeepSeek-V4 experts) against transformers' grouped_mm.
#   3. PADD step vs MoE-vanilla-GRPO; generate() tokens/s (padd vs transformers' default);
#      MegaBlocks dMoE as a MoE FFN peer (if it built); routing and Liger's fused MoE (two
#      models, T=4096,32768), if time is left.
# With $OUT set (the device tool) and RESULTS elsewhere, everything ends up in $OUT/gpu-results.tgz.
# PADD_GPU_PHASES="moe-prefill,generate" runs only the named phases (names as in phases.txt),
# e.g. to finish in a second call what a first one had no time for. PADD_GPU_DRY_RUN=1 installs
# nothing and only prints each phase's command (after PADD_GPU_DRY_SLEEP seconds): a CPU check of
# the order and the time guard.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
DEADLINE=$(( START + ${PADD_GPU_BUDGET_S:-570} ))
GRACE=8  # seconds kept back per phase for the kill (timeout -k 5) and the bookkeeping
PHASES_TXT="$RESULTS/phases.txt"
: > "$PHASES_TXT"
FAILED=0
DRY=${PADD_GPU_DRY_RUN:-0}

note() { echo "[run_gpu +$(( $(date +%s) - START ))s] $*" | tee -a "$PHASES_TXT"; }
wanted() { [[ -z "${PADD_GPU_PHASES:-}" || ",$PADD_GPU_PHASES," == *",$1,"* ]]; }
left() { echo $(( DEADLINE - $(date +%s) - GRACE )); }

# phase NAME MAX_S MIN_S CMD...: run CMD for at most MAX_S seconds and never past the deadline;
# skip it (said in phases.txt) when fewer than MIN_S seconds are left. SIGTERM at the limit,
# SIGKILL 5 s later; the JSON already on disk stays (written atomically after each measurement).
phase() {
    local name=$1 max=$2 min=$3
    shift 3
    wanted "$name" || return 0
    local budget limit t0 rc
    budget=$(left)
    limit=$(( budget < max ? budget : max ))
    if (( limit < min )); then
        note "SKIP $name: ${budget}s left, it needs at least ${min}s"
        return 0
    fi
    note "START $name (limit ${limit}s)"
    t0=$(date +%s)
    if [[ $DRY == 1 ]]; then
        set -- bash -c 'env | grep ^PADD_BENCH_ | sort; echo "DRY RUN: $*"; sleep "${PADD_GPU_DRY_SLEEP:-0}"' \
            dry "$@"
    fi
    timeout -k 5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    tail -n 30 "$RESULTS/$name.log"
    if (( rc == 124 || rc == 137 )); then
        note "TIMEOUT $name at its ${limit}s limit (results so far are in its JSON)"
    fi
    note "END $name rc=$rc $(( $(date +%s) - t0 ))s"
    (( rc == 0 )) || FAILED=1
    return 0
}

# ---- 0. install ------------------------------------------------------------------------------
if [[ $DRY != 1 ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/device.txt"
fi
# TRITON_CACHE_AUTOTUNING: autotuning results persist on disk, so the MoE phases (separate
# processes) do not re-tune the same kernel at the same key.
export PYTHONUNBUFFERED=1 PADD_BENCH_OUT="$RESULTS" TRITON_CACHE_AUTOTUNING=1
BENCH=(python3 -m pytest -q -s -p no:cacheprovider -rs)

# MegaBlocks (+ stanford-stk, its block-sparse backend) from sdists: compiling its CUDA ops takes
# minutes, so it builds in the background (own process group, 4 compile jobs) while the tests
# and the benchmarks above it run; phase 3 uses it if it is done by then.
MB_SITE=/tmp/megablocks-site
MB_LOG="$RESULTS/megablocks-build.log"
MB_PID=""
if ! wanted moe-megablocks; then
    :  # not asked for: no build
elif compgen -G ".whl/megablocks-*.tar.gz" >/dev/null; then
    mb_sdists=$(ls .whl/stanford[-_]stk-*.tar.gz .whl/megablocks-*.tar.gz 2>/dev/null | tr '\n' ' ')
    setsid bash -c "
        echo 'sdists: $mb_sdists'; command -v nvcc && nvcc --version | tail -n 2
        TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=4 timeout 480 python3 -m pip install --no-build-isolation --no-deps \
            --no-index --target '$MB_SITE' $mb_sdists
        echo \"pip exit code \$?\"
    " > "$MB_LOG" 2>&1 < /dev/null &
    MB_PID=$!  # setsid ran in the background: the build leads its own process group
    export PADD_MEGABLOCKS_BUILD_LOG="$MB_LOG"
    note "MegaBlocks build started in the background (pid $MB_PID): $mb_sdists"
else
    export PADD_MEGABLOCKS_STATUS="no .whl/megablocks-*.tar.gz: MegaBlocks was not built"
    note "MegaBlocks: $PADD_MEGABLOCKS_STATUS (its phase is skipped)"
fi

# ---- 1. kernel tests (a speed-up is only worth reporting for kernels whose tests pass) --------
# xdist when present: one process per test file would leave the CPU cores idle while Triton compiles.
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
# tests/test_pipeline.py runs the stages end to end on CUDA (padd train on the Triton experts).
# PADD_FAIL_LOG (tests/conftest.py): each failure's traceback is written as it happens, so a
# phase cut off at its limit still says why (on 2026-11-27 two cut-off runs named their failures
# but lost every traceback, which pytest prints only at the end).
PADD_FAIL_LOG="$RESULTS/test-failures.log" phase kernel-tests 170 30 python3 -m pytest tests/kernels tests/test_pipeline.py -q -p no:cacheprovider $XDIST -rfE

# ---- 2. MoE FFN, KD loss, fused-linear KD -----------------------------------------------------
# Liger's fused MoE autotunes at every new shape (on an H200, 2026-11-27, one Mixtral T=1 shape
# did not finish in 100 s), so it has its own later phase instead of holding up the others.
MOE_PEERS=grouped_mm,batched_mm,eager
PADD_BENCH_TAG=decode PADD_BENCH_TOKENS=1,8,64 PADD_BENCH_PEERS=$MOE_PEERS \
    phase moe-decode 100 20 "${BENCH[@]}" benchmarks/bench_moe_ffn.py
PADD_BENCH_TAG=prefill PADD_BENCH_TOKENS=512,4096,32768 PADD_BENCH_PEERS=$MOE_PEERS \
    phase moe-prefill 110 30 "${BENCH[@]}" benchmarks/bench_moe_ffn.py
# Issue 25's fused variants (GPT-OSS-20B, DeepSeek-V4) against transformers' grouped_mm, which
# runs the family's own `_apply_gate`; eager is the oracle checked before any timing.
PADD_BENCH_TOKENS=512,4096,16384 phase moe-variants 60 20 "${BENCH[@]}" benchmarks/bench_moe_ffn_variants.py
PADD_BENCH_TAG=logits PADD_BENCH_KD_LOGITS=16384x128256 PADD_BENCH_KD_VARIANTS=0 \
    phase kd-logits 60 20 "${BENCH[@]}" benchmarks/bench_kd_loss.py -k test_bench_kd_logits
PADD_BENCH_TAG=fused-linear PADD_BENCH_KD_LINEAR=8192x128256x4096 \
    phase kd-fused-linear 45 20 "${BENCH[@]}" benchmarks/bench_kd_loss.py -k test_bench_fused_linear_jsd

# ---- 3. PADD step, generate(), MegaBlocks, routing --------------------------------------------
phase padd-step 50 25 "${BENCH[@]}" benchmarks/bench_padd_step.py
phase generate 60 25 "${BENCH[@]}" benchmarks/bench_generate.py

if wanted moe-megablocks && [[ -n "$MB_PID" ]]; then
    # Wait for the build while 40 s would still be left for the benchmark.
    while kill -0 "$MB_PID" 2>/dev/null && (( $(left) > 40 )); do sleep 2; done
    if kill -0 "$MB_PID" 2>/dev/null; then
        note "SKIP moe-megablocks: the MegaBlocks build is still running (see megablocks-build.log)"
    else
        PYTHONPATH="$MB_SITE${PYTHONPATH:+:$PYTHONPATH}" PADD_BENCH_TAG=megablocks \
            PADD_BENCH_TOKENS=4096,32768,8 PADD_BENCH_PEERS=megablocks_sparse,megablocks_grouped \
            phase moe-megablocks 90 25 "${BENCH[@]}" benchmarks/bench_moe_ffn.py
    fi
fi
phase routing 60 45 "${BENCH[@]}" benchmarks/bench_routing.py
PADD_BENCH_TAG=liger PADD_BENCH_TOKENS=4096,32768 PADD_BENCH_MODELS=qwen3-30b-a3b,olmoe-1b-7b \
    PADD_BENCH_PEERS=liger phase moe-liger 90 40 "${BENCH[@]}" benchmarks/bench_moe_ffn.py

if [[ -n "$MB_PID" ]] && kill -0 "$MB_PID" 2>/dev/null; then
    kill -TERM -- "-$MB_PID" 2>/dev/null  # the build's own process group, started above
    note "MegaBlocks build stopped unfinished"
fi
python3 benchmarks/summarize.py "$RESULTS"/*-gpu-*.json > "$RESULTS/summary.md" 2>&1 || true
note "done: failed phases=$FAILED (see phases.txt and the PHASE.log files)"
# The device tool returns at most 8 files from $OUT: with results elsewhere, one tarball of all.
if [[ -n "${OUT:-}" && "$RESULTS" != "$(cd "$OUT" && pwd)" ]]; then
    tar czf "$OUT/gpu-results.tgz" -C "$RESULTS" . && cp "$PHASES_TXT" "$RESULTS/summary.md" "$OUT/"
fi
exit "$FAILED"
