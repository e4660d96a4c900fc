#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one ~9.5-minute call on a 4-GPU host:
#   phase 1, side by side:  GPUs 0,1  `pytest -m gpu tests/parallel` (2-rank NCCL)
#                           GPU 1     the other GPU tests (correctness only: sharing is harmless)
#                           GPU 2     benchmarks/core_bench.py (single GPU, all peers)
#                           GPU 3     benchmarks/moe_bench.py single-GPU variants
#   phase 2, alone:         GPUs 0-3  benchmarks/parallel_bench.py (4 ranks)
# Each job's output lands in $LOGS (default /tmp/gpu_logs); everything is tarred to $OUT/logs.tgz
# and the jobs' summaries are printed last. PHASE1_S and PHASE2_S bound the phases (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
LOGS=${LOGS:-/tmp/gpu_logs}
mkdir -p "$OUT" "$LOGS"
P1=${PHASE1_S:-290} P2=${PHASE2_S:-265}
suite() { bash benchmarks/run_gpu_suite.sh "$@"; }
OUT=$LOGS/setup suite >"$LOGS/setup.txt" 2>&1  # unpack the carried wheels once, before jobs run side by side

job() {  # job NAME GPUS SECONDS VAR=VALUE... -- STAGES...
  local name=$1 gpus=$2 secs=$3; shift 3
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env CUDA_VISIBLE_DEVICES="$gpus" OUT="$LOGS/$name" "${envs[@]}" timeout -k 5 "$secs" \
    bash benchmarks/run_gpu_suite.sh "$@" >"$LOGS/$name.txt" 2>&1
  echo "[$name] exit $? after $SECONDS s" >>"$LOGS/$name.txt"
}
job parallel_tests 0,1 "$P1" PARALLEL_TESTS_TIMEOUT=$((P1 - 10)) -- parallel_tests &
job gpu_tests 1 "$P1" TESTS_TIMEOUT=$((P1 - 10)) \
  "GPU_TESTS=tests/core tests/e2e tests/recipes tests/integrations tests/kernels" -- tests &
job core_bench 2 "$P1" CORE_BUDGET=$((P1 - 20)) -- core &
job moe_bench 3 "$P1" MOE_VARIANTS=automodel,transformers,nemo MOE_VARIANT_TIMEOUT=$(((P1 - 20) / 3)) -- moe &
wait
job parallel_bench 0,1,2,3 "$P2" PARALLEL_VARIANT_TIMEOUT=$(((P2 - 15) / 4)) -- parallel

tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
for name in parallel_tests gpu_tests core_bench moe_bench parallel_bench; do
  echo "=== $name"; grep -E "passed|failed|error|\|" "$LOGS/$name.txt" | tail -14
done
