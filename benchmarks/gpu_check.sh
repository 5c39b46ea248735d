#!/usr/bin/env bash
# One-call GPU check (../shared/GPU.md): under 4 minutes on an H100/H200 with 16 cores, install
# and compiles included, in one device call:
#   set -o pipefail; bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/log
#   bash benchmarks/gpu_check.sh --cpu-smoke     # every step at toy sizes, Triton interpreted
#
# Steps (each under its own timeout; the timeouts sum to 225 s):
#   env       install the checkout offline; versions; import ncf_fast without pyhocon
#   warm-up   compile every kernel configuration the later steps use, in parallel processes
#             (benchmarks/gpu_warmup.py; smoke: a few interpreted, two compiled for sm_90a)
#   tests     compiled kernels vs the float64 reference: tests/gpu_cases.py's selection
#             (activation x cost x width class) + deterministic mode + the energy kernel
#   accuracy  the tf32 fast mode's error against float64 (benchmarks/gpu_bench.py accuracy)
#   timings   rows by (MLP backend, energy backend), each written as measured (gpu_bench.py)
#   summary   benchmarks/summarize.py: the table of rows and step statuses, printed last
# Every step prints its exit code and TIMEOUT (exit 124) apart from FAILED. Rows accumulate
# in $OUT/rows.jsonl, step statuses in $OUT/steps.tsv. Exit 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then MODE=smoke; fi
OUT="${OUT:-/tmp/ncf_gpu_check}"
mkdir -p "$OUT"
rm -f "$OUT/rows.jsonl" "$OUT/steps.tsv"
export NCF_CHECK_OUT="$OUT" NCF_CHECK_MODE="$MODE"
# the checkout first on the path in both modes (the smoke mode never installs anything)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ $MODE == smoke ]]; then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    T_ENV=30 T_WARM=60 T_TESTS=60 T_ACC=40 T_TIME=60 T_SUM=15
else
    export TRITON_INTERPRET=0          # compiled kernels (tests/conftest.py only sets a default)
    T_ENV=40 T_WARM=55 T_TESTS=50 T_ACC=20 T_TIME=50 T_SUM=10
fi
overall=0

# run_step NAME TIMEOUT_S CMD...: run under `timeout`, print and record the exit status
run_step() {
    local name=$1 limit=$2 start end rc status
    shift 2
    echo "== step $name (timeout ${limit}s)"
    start=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    end=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=TIMEOUT ;;
        *) status=FAILED ;;
    esac
    [[ $rc == 0 ]] || overall=1
    local secs
    secs=$(python3 -c "print(f'{$end - $start:.1f}')")
    echo "== step $name: exit $rc ($status) after ${secs}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" >> "$OUT/steps.tsv"
}

env_step() {
    if [[ $MODE == gpu ]]; then
        pip install --no-deps --no-build-isolation -q -e . || return 1
    else
        echo "install skipped in --cpu-smoke (the checkout runs from PYTHONPATH)"
    fi
    # the device has no pyhocon: ncf_fast (and its CLI module) must import without it
    python - <<'PY'
import sys
sys.modules["pyhocon"] = None  # any `import pyhocon` now raises ImportError
import torch, triton
import ncf_fast, ncf_fast.cli, ncf_fast.kernels
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
      "| ncf_fast", ncf_fast.__version__, "from", ncf_fast.__file__, "(imports without pyhocon)")
PY
}

if [[ $MODE == gpu ]]; then
    TESTS=(tests/test_mlp.py tests/test_energy_kernel_gpu.py
           -k "(matches_float64_reference and triton) or deterministic_mode or deterministic_gradients or canary or refuses or device_context or energy_kernel_gpu")
else
    TESTS=(tests/test_mlp.py tests/test_energy_kernel_gpu.py
           -k "canary or d1-w24-softplus-quadratic-n1 or compiled_kernel_matches")
fi

run_step env "$T_ENV" bash -c "$(declare -f env_step); MODE=$MODE env_step"
if [[ $MODE == gpu ]]; then
    run_step warm-up "$T_WARM" python benchmarks/gpu_warmup.py
else
    run_step warm-up "$T_WARM" python benchmarks/gpu_warmup.py --smoke
fi
run_step tests "$T_TESTS" python -m pytest -q -p no:cacheprovider -o addopts="" "${TESTS[@]}"
run_step accuracy "$T_ACC" python benchmarks/gpu_bench.py accuracy
run_step timings "$T_TIME" python benchmarks/gpu_bench.py timings
echo
timeout "$T_SUM" python benchmarks/summarize.py "$OUT" || overall=1
exit $overall
