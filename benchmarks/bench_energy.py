"""Benchmarks of the energy distance, value and both gradients (forward + backward), per backend.

    pytest benchmarks/bench_energy.py --benchmark-only                  # small CPU default
    NCF_BENCH_FULL=1 pytest benchmarks/bench_energy.py --benchmark-only # issue shapes
    NCF_ENERGY_SHAPES=8192x16,65536x16 pytest benchmarks/bench_energy.py ...  # N x d
    NCF_BENCH_THREADS=1 pytest benchmarks/bench_energy.py ...           # CPU intra-op threads

Shapes: N = M in {8192, 65536, 1e6} x d in {2, 16, 64} with NCF_BENCH_FULL=1; otherwise the
CPU comparison, N = M = 4096 at d in {2, 8, 16} (the torch path must be no slower than the
cdist path there). Backends: "reference" = the U-statistic from torch.cdist with autograd (the
cdist baseline; O(NM) memory, skipped where its N x M matrices would not fit), "torch"
(ncf_fast.pair_sums' CPU path: the compiled loop of ncf_fast.native for fp32 d <= 8, block-wise
torch ops otherwise), "torch-ops" (the torch ops alone at d <= 8, side by side with the compiled
loop; CPU, where a C compiler built it), and "triton" on CUDA (the interpreter is not a benchmark).
Every timed call on CUDA ends with torch.cuda.synchronize(); a warm-up round runs first (JIT and
autotune excluded). extra_info: device, dtype, versions, peak memory (CUDA), pairs per second
(3 N M pairs: the cross and both within terms), and the time as a fraction of the H200 bound
computed in kernels/energy_distance.py (triton only).
"""
from __future__ import annotations

import os
import pathlib
import platform
import sys

import pytest
import torch

import ncf_fast
from ncf_fast import energy, native

# the tests' shared helpers (tests/tolerance.py), importable whether pytest or python runs this
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from tolerance import setup_sets  # noqa: E402

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("NCF_BENCH_FULL") == "1"
SHAPES = ([(n, d) for n in (8192, 65536, 1_000_000) for d in (2, 16, 64)] if FULL
          else [(4096, 2), (4096, 8), (4096, 16)])
if os.environ.get("NCF_ENERGY_SHAPES"):  # e.g. "8192x16,65536x16" (gpu_check.sh)
    SHAPES = [tuple(int(v) for v in s.split("x"))
              for s in os.environ["NCF_ENERGY_SHAPES"].split(",")]
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cuda" else [])
if DEVICE == "cpu" and native.available():  # the torch backend without its compiled loop
    BACKENDS.append("torch-ops")
if os.environ.get("NCF_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["NCF_BENCH_THREADS"]))
# cdist holds three N x N fp32 distance matrices plus gradient buffers: ~10 N^2 * 4 bytes, and
# it is only run where that is under half the free memory
_CDIST_BYTES = 40
# the torch path at 1e6 points (3e12 pairs in 2^18-pair blocks) would take hours
_CPU_MAX_N = 65536


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cdist_energy_distance(a, b):
    """The cdist baseline: unbiased U-statistic from torch.cdist, gradients by autograd."""
    n, m = a.shape[0], b.shape[0]
    return (2.0 * torch.cdist(a, b).sum() / (n * m) - torch.cdist(a, a).sum() / (n * (n - 1))
            - torch.cdist(b, b).sum() / (m * (m - 1)))


def _fits(backend, n):
    if backend == "reference":
        free = (torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 8 * 2**30)
        return _CDIST_BYTES * n * n < 0.5 * free
    if backend in ("torch", "torch-ops"):  # ~20 small ops per 2^18-pair block: hours at 1e6
        return n <= _CPU_MAX_N
    return True


def _bound_seconds(n, d):
    """The H200 bound of kernels/energy_distance.py for value + both gradients (4 N^2 pairs)."""
    pairs = 4.0 * n * n
    block_d = max(16, 1 << (d - 1).bit_length())
    tensor = pairs * 2 * 3 * 2 * block_d / 495e12 if d > 4 else 0.0
    fp32 = pairs * (16 if d > 4 else 3 * d + 10) / 33.5e12
    mufu = pairs / 4.2e12
    return max(tensor, fp32, mufu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-d{}".format(*s))
def test_energy_distance_fwd_bwd(benchmark, backend, shape, monkeypatch):
    n, d = shape
    if not _fits(backend, n):
        pytest.skip(f"{backend} does not fit / is not run at N = {n} on {DEVICE}")
    if backend == "torch-ops":
        if d > native.MAX_D:
            pytest.skip(f"the compiled loop only runs for d <= {native.MAX_D}: same as torch")
        monkeypatch.setattr(native, "usable", lambda a, b: False)
    a, b = setup_sets(n, d, device=DEVICE)
    fn = cdist_energy_distance if backend == "reference" else (
        lambda x, y: energy.energy_distance(x, y, backend=backend.removesuffix("-ops")))

    def step():
        aa, bb = a.detach().requires_grad_(), b.detach().requires_grad_()
        v = fn(aa, bb)
        v.backward()
        _sync()
        return v

    step()  # warm-up: JIT compile, allocator
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=1 if n >= 65536 else 3, iterations=1, warmup_rounds=0)
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor()
                or "cpu", dtype="float32", torch=torch.__version__, ncf_fast=ncf_fast.__version__,
                backend=backend, shape=f"N=M={n},d={d}", threads=torch.get_num_threads())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    mean = benchmark.stats.stats.mean
    info["pairs_per_s"] = 3.0 * n * n / mean
    if DEVICE == "cuda":
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        info["peak_mem_bytes_per_sample"] = torch.cuda.max_memory_allocated() / n
        if backend == "triton":
            info["fraction_of_bound"] = _bound_seconds(n, d) / mean
