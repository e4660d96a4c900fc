#!/usr/bin/env bash
# Runs automodel's GPU work on a GPU machine with torch/transformers preinstalled (packages are not
# installed: every packages/*/src goes on PYTHONPATH). Optional peers come as wheels in .whl/:
# liger-kernel, nemo-automodel 0.7.0 (+ transformers 5.18, torchao), pytest when missing, and an
# unpacked bitsandbytes in .whl/bnb_site (QLoRA tests).
#
#   bash benchmarks/run_gpu_suite.sh tests      # pytest -m gpu over the whole suite
#   bash benchmarks/run_gpu_suite.sh core moe   # benchmarks/core_bench.py, benchmarks/moe_bench.py
#   bash benchmarks/run_gpu_suite.sh parallel   # benchmarks/parallel_bench.py on every visible GPU
#   bash benchmarks/run_gpu_suite.sh parallel_tests  # pytest -m gpu tests/parallel (2 or 4 GPUs)
#
# Logs and result JSON go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SRC=$(ls -d "$PWD"/packages/*/src | tr '\n' :)$PWD/tests  # absolute: subprocesses run elsewhere
export PYTHONPATH=$SRC

install() {  # install() DIR WHEEL... : unpack wheels into DIR without touching the machine's packages
  local dir=$1; shift
  [ -d "$dir" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$dir" "$@" >/dev/null 2>&1
}
if [ -d .whl ]; then
  python3 -c "import pytest, pytest_timeout, pydantic" 2>/dev/null || { install /tmp/pytest_site .whl/pytest/*.whl; export PYTHONPATH=$PYTHONPATH:/tmp/pytest_site; }
  ls .whl/liger_kernel-*.whl >/dev/null 2>&1 && install /tmp/liger_site .whl/liger_kernel-*.whl && export LIGER_SITE=/tmp/liger_site
  [ -d .whl/bnb_site ] && export PYTHONPATH=$PYTHONPATH:$PWD/.whl/bnb_site  # bitsandbytes, CUDA 13 libs only
  ls .whl/nemo_automodel-*.whl >/dev/null 2>&1 && install /tmp/nemo_site .whl/nemo_automodel-*.whl .whl/transformers-*.whl .whl/torchao-*.whl && export NEMO_SITE=/tmp/nemo_site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpus.txt"

for stage in "$@"; do
  case $stage in
    tests)
      timeout ${TESTS_TIMEOUT:-1200} python3 -m pytest -m gpu ${GPU_TESTS:-tests} -q -p no:cacheprovider -o addopts="--import-mode=importlib -ra --continue-on-collection-errors" \
        --timeout 300 2>&1 | tee "$OUT/gpu_tests.log" | tail -60 ;;
    core)
      python3 benchmarks/core_bench.py --budget ${CORE_BUDGET:-480} 2>&1 | tee "$OUT/core_bench.log" | tail -20 ;;  # runs NeMo/Liger itself
    moe)
      python3 benchmarks/moe_bench.py --timeout ${MOE_VARIANT_TIMEOUT:-150} --variants ${MOE_VARIANTS:-automodel,transformers,nemo,ep2,ep4,transformers_eager_loop} 2>&1 | tee "$OUT/moe_bench.log" | tail -20 ;;
    parallel_tests)
      timeout ${PARALLEL_TESTS_TIMEOUT:-1200} python3 -m pytest -m gpu tests/parallel -v -p no:cacheprovider -o addopts="--import-mode=importlib -ra" \
        --timeout 180 2>&1 | tee "$OUT/parallel_gpu_tests.log" | tail -60 ;;
    parallel)
      python3 benchmarks/parallel_bench.py --nproc "$(python3 -c 'import torch; print(torch.cuda.device_count())')" --timeout ${PARALLEL_VARIANT_TIMEOUT:-150} \
        ${PARALLEL_VARIANTS:+--variants $PARALLEL_VARIANTS} 2>&1 | tee "$OUT/parallel_bench.log" | tail -20 ;;
    kernels)
      PYTHONPATH=$SRC:${LIGER_SITE:-} python3 benchmarks/kernels_bench.py --timeout 120 2>&1 | tee "$OUT/kernels_bench.log" | tail -40 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
