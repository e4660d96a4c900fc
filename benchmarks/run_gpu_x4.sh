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
#   PLAN=bench2 bash benchmarks/run_gpu_x4.sh   (a 2-GPU host, ~PHASE1_S + EP2_S = 360 + 130 s)
#       phase 1, side by side: GPU 0 the GPU tests outside kernels/MoE/parallel (TESTS_S, 150 s),
#                then moe_bench.py automodel, transformers, transformers' per-expert loop;
#                GPU 1 moe_bench.py nemo alone (its first step alone takes minutes)
#       phase 2: GPUs 0,1 moe_bench.py ep2, then the 2-rank expert-parallel NCCL tests
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
P1=${PHASE1_S:-$(case $PLAN in bench*) echo 360 ;; *) echo 300 ;; esac)} P2=${PHASE2_S:-220} EP4=${EP4_S:-110}
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
  bench2)
    T=${TESTS_S:-150}
    { job gpu_tests 0 "$T" TESTS_TIMEOUT=$((T - 5)) \
        "GPU_TESTS=tests/core/test_gpu_parity.py tests/core/peft tests/e2e tests/recipes tests/integrations tests/ckpt" -- tests
      job moe_bench 0 $((P1 - T)) MOE_VARIANTS=${MOE_SINGLE:-automodel,transformers,transformers_eager_loop} \
        MOE_VARIANT_TIMEOUT=$(((P1 - T - 15) / 3)) -- moe; } &
    job moe_nemo 1 "$P1" MOE_VARIANTS=nemo MOE_VARIANT_TIMEOUT=$((P1 - 15)) -- moe &
    wait
    E=${EP2_S:-130}
    job moe_ep2 0,1 "$E" MOE_VARIANTS=ep2 MOE_VARIANT_TIMEOUT=$((E - 10)) -- moe
    job ep_tests 0,1 100 TESTS_TIMEOUT=95 GPU_TESTS=tests/parallel/test_expert.py -- tests
    names="gpu_tests moe_bench moe_nemo moe_ep2 ep_tests" ;;
  *) echo "PLAN=$PLAN: expected tests, bench or bench2"; exit 2 ;;
esac

tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
for name in $names; do
  echo "=== $name"; grep -E "passed|failed|error|\|" "$LOGS/$name.txt" | tail -14
done
