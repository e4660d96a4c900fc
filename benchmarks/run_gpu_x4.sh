#!/usr/bin/env bash
# Every GPU check and benchmark of the project on one 4-GPU host, in two calls of < 10 minutes:
#
#   PLAN=tests bash benchmarks/run_gpu_x4.sh    (~5 min)
#       GPUs 0-3  `pytest -m gpu tests/parallel` (2- and 4-rank NCCL checks)
#       GPU 3     every other GPU test, beside it (correctness only: sharing the card is harmless)
#   PLAN=bench bash benchmarks/run_gpu_x4.sh    (~PHASE1_S + EP4_S + PHASE2_S = 360 + 110 + 220 s)
#       phase 1, side by side: GPU 0 benchmarks/core_bench.py (all peers), GPU 1 moe_bench.py
#                single-GPU variants, GPUs 2,3 moe_bench.py ep2
#       phase 2: GPUs 0-3 moe_bench.py ep4, then benchmarks/parallel_bench.py (4 ranks)
#       (PARALLEL=0 skips the parallel bench)
#
# Each job's output lands in $LOGS (default /tmp/gpu_logs); everything is tarred to $OUT/logs.tgz
# and the jobs' summaries are printed last. Benchmarks on different cards of one host do not
# share a GPU; they share the host's CPUs (16 per GPU here), which their launch rates do not exhaust.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
LOGS=${LOGS:-/tmp/gpu_logs}
PLAN=${PLAN:-tests}
mkdir -p "$OUT" "$LOGS"
P1=${PHASE1_S:-$([ "$PLAN" = bench ] && echo 360 || echo 300)} P2=${PHASE2_S:-220} EP4=${EP4_S:-110}
OUT=$LOGS/setup bash benchmarks/run_gpu_suite.sh >"$LOGS/setup.txt" 2>&1  # unpack wheels once

job() {  # job NAME GPUS SECONDS VAR=VALUE... -- STAGES...
  local name=$1 gpus=$2 secs=$3; shift 3
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env CUDA_VISIBLE_DEVICES="$gpus" OUT="$LOGS/$name" "${envs[@]}" timeout -k 5 "$secs" \
    bash benchmarks/run_gpu_suite.sh "$@" >"$LOGS/$name.txt" 2>&1
  echo "[$name] exit $? after $SECONDS s" >>"$LOGS/$name.txt"
}
case $PLAN in
  tests)
    job parallel_tests 0,1,2,3 "$P1" PARALLEL_TESTS_TIMEOUT=$((P1 - 10)) -- parallel_tests &
    job gpu_tests 3 "$P1" TESTS_TIMEOUT=$((P1 - 10)) \
      "GPU_TESTS=tests/core tests/e2e tests/recipes tests/integrations tests/kernels tests/ckpt" -- tests &
    wait
    names="parallel_tests gpu_tests" ;;
  bench)
    job core_bench 0 "$P1" CORE_BUDGET=$((P1 - 20)) -- core &
    job moe_bench 1 "$P1" MOE_VARIANTS=${MOE_SINGLE:-automodel,transformers,nemo,transformers_eager_loop} \
      MOE_VARIANT_TIMEOUT=$(((P1 - 20) / 4)) -- moe &
    job moe_ep2 2,3 "$P1" MOE_VARIANTS=ep2 MOE_VARIANT_TIMEOUT=$((P1 - 20)) -- moe &
    wait
    job moe_ep4 0,1,2,3 "$EP4" MOE_VARIANTS=ep4 MOE_VARIANT_TIMEOUT=$((EP4 - 10)) -- moe
    names="core_bench moe_bench moe_ep2 moe_ep4"
    if [ "${PARALLEL:-1}" = 1 ]; then
      # automodel's FSDP2 first, the plain torch loop second: the order cannot favour automodel.
      job parallel_bench 0,1,2,3 "$P2" PARALLEL_VARIANT_TIMEOUT=$(((P2 - 15) / 4)) \
        PARALLEL_VARIANTS=${PARALLEL_VARIANTS:-fsdp,torch_fsdp2,fsdp_tp2,fsdp_pp2} -- parallel
      names="$names parallel_bench"
    fi ;;
  *) echo "PLAN=$PLAN: expected tests or bench"; exit 2 ;;
esac

tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
for name in $names; do
  echo "=== $name"; grep -E "passed|failed|error|\|" "$LOGS/$name.txt" | tail -14
done
