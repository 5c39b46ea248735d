#!/usr/bin/env bash
# One-call GPU check (../shared/GPU.md): install offline, run the kernel tests compiled (not
# interpreted) against the float64 reference, then a small benchmark table; summary last.
# Budget: under 5 minutes on an H200 (the four timeouts below sum to 250 s, install ~20 s).
# Usage (device tool):
#   set -o pipefail; bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/log
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ncf_gpu_check}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0            # compiled kernels; tests/conftest.py only sets a default
status=0

echo "== install"
pip install --no-deps --no-build-isolation -q -e . || status=1
python - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY

echo "== MLP kernel tests (compiled) vs float64 reference"
timeout 80 python -m pytest tests/test_kernels_mlp.py -q -x -p no:cacheprovider \
    --durations=5 2>&1 | tail -25 || status=1

echo "== MLP benchmarks"
NCF_BENCH_SHAPES="16x128x4096,16x128x65536,64x256x65536" timeout 60 \
    python -m pytest benchmarks/bench_residual.py --benchmark-only -q -p no:cacheprovider \
    -k "hj_residual or train_step" --benchmark-json="$OUT/bench_residual.json" 2>&1 | tail -5 \
    || status=1

# --- energy-distance benchmarks: the energy-distance engineer adds their lines here -----------
# (write their pytest-benchmark JSON to "$OUT/bench_energy.json"; the summary picks it up)
echo "== energy distance (issue 5): compiled kernel tests, then benchmarks"; timeout 50 python -m pytest tests/test_energy_kernel_gpu.py -q -x -p no:cacheprovider 2>&1 | tail -15 || status=1; NCF_ENERGY_SHAPES="8192x2,8192x16,65536x16,1000000x16" timeout 60 python -m pytest benchmarks/bench_energy.py --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench_energy.json" 2>&1 | tail -5 || status=1
# --- end of energy-distance block -----------------------------------------------------------

echo "== summary"
python benchmarks/summarize.py "$OUT"/bench_*.json || status=1
exit $status
