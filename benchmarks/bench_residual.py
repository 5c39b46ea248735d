"""Benchmarks of the fused potential ops per backend: hj_residual forward + backward, transport,
and one full training step (L_HJ + lambda L_MMD, Adam).

    pytest benchmarks/bench_residual.py --benchmark-only                  # small CPU default
    NCF_BENCH_FULL=1 pytest benchmarks/bench_residual.py --benchmark-only # issue shapes
    NCF_BENCH_SHAPES=16x128x65536 pytest benchmarks/bench_residual.py ... # chosen d x w x batch

Shapes: d in {2, 16, 64} x width in {64, 128, 256} (depth 3, softplus) x batch in {4096, 65536}
with NCF_BENCH_FULL=1; otherwise d = 16, width 128, batch 4096 (the CPU target shape:
torch >= 1.5x reference for hj_residual forward + backward). Backends: reference, torch, and
triton on CUDA (the interpreter is not a benchmark), and on CPU torch-ops (the torch backend
with its compiled elementwise passes switched off: what they buy). Every timed call on CUDA ends with
torch.cuda.synchronize(); warm-up rounds run before timing (JIT compile excluded). extra_info
records the device, dtype, versions, peak memory (CUDA) and the achieved TFLOP/s of the GEMMs.
Ratios against reference: benchmarks/conftest.py groups the table per operation and shape and
prints each backend's median against reference at the end. The train step here is the trainer's
(its energy term picks its own backend, "auto"); gpu_check.sh's benchmarks/gpu_bench.py times
steps with the energy backend named per row instead.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

import ncf_fast
from ncf_fast import NCF, PotentialMLP, costs, native
from ncf_fast.losses import hj_residual

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("NCF_BENCH_FULL") == "1"
SHAPES = ([(d, w, n) for d in (2, 16, 64) for w in (64, 128, 256) for n in (4096, 65536)]
          if FULL else [(16, 128, 4096)])
if os.environ.get("NCF_BENCH_SHAPES"):  # e.g. "16x128x65536,64x256x65536" (gpu_check.sh)
    SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ["NCF_BENCH_SHAPES"].split(",")]
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cuda" else [])
if DEVICE == "cpu" and native.mlp_usable(torch.zeros(1, 1)):
    BACKENDS.append("torch-ops")  # the torch backend without its compiled elementwise passes


def _backend(backend, monkeypatch):
    """The PotentialMLP backend for a benchmark row (torch-ops: torch, compiled passes off)."""
    if backend == "torch-ops":
        monkeypatch.setattr(native, "mlp_usable", lambda x, act=None: False)
        return "torch"
    return backend


def _rounds(n):
    """Enough rounds that the median is stable on a shared CPU; fewer for the large batches."""
    return (20 if DEVICE == "cpu" else 10) if n <= 4096 else 3


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def setup_model(d, width, backend, seed=0):
    """A 3 x width softplus PotentialMLP on DEVICE, seeded, and a CPU generator for its inputs."""
    torch.manual_seed(seed)
    model = PotentialMLP(d, (width,) * 3, "softplus", backend=backend).to(DEVICE)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return model, g


def _gemm_flops(d, width, n, passes):
    """FLOPs of the hidden-layer GEMMs: ``passes`` sweeps of (d+1)w + 2w^2 multiply-adds per row."""
    return 2.0 * n * passes * ((d + 1) * width + 2 * width * width)


def _record(benchmark, backend, d, width, n, flops):
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor()
                or "cpu", dtype="float32", torch=torch.__version__, ncf_fast=ncf_fast.__version__,
                backend=backend, shape=f"d={d},w={width},n={n}")
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if DEVICE == "cuda":
        info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        info["peak_mem_bytes_per_sample"] = torch.cuda.max_memory_allocated() / n
    if benchmark.stats is not None and flops:
        info["tflops"] = flops / benchmark.stats.stats.mean / 1e12


def _time(benchmark, run, backend, shape, warmups, passes):
    """Warm-up calls (JIT compile, allocator), CUDA's peak memory reset, the timed rounds (each
    ending with a CUDA sync), and extra_info with ``passes`` GEMM sweeps per row for the TFLOP/s."""
    d, width, n = shape

    def synced():
        run()
        _sync()

    for _ in range(warmups):
        synced()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(synced, rounds=_rounds(n), iterations=1, warmup_rounds=1)
    _record(benchmark, backend, d, width, n, _gemm_flops(d, width, n, passes))


def _ids(shape):
    return "d{}-w{}-n{}".format(*shape)


# every benchmark here runs per backend and shape
pytestmark = [pytest.mark.parametrize("backend", BACKENDS),
              pytest.mark.parametrize("shape", SHAPES, ids=_ids)]


def test_hj_residual_forward_backward(benchmark, backend, shape, monkeypatch):
    d, width, n = shape
    model, g = setup_model(d, width, _backend(backend, monkeypatch))
    x = torch.randn(n, d, generator=g).to(DEVICE)
    t = torch.rand(n, 1, generator=g).to(DEVICE)
    cost = costs.Quadratic()

    def step():
        model.zero_grad(set_to_none=True)
        r = hj_residual(model, x, t, cost)
        (r * r).mean().backward()

    # forward: 3 sweeps (u, grad, u0); backward ~ 3x the forward: ~12 GEMM sweeps per row
    _time(benchmark, step, backend, shape, warmups=2, passes=12)


def test_transport(benchmark, backend, shape, monkeypatch):
    d, width, n = shape
    ncf = NCF(d, hidden=(width,) * 3, device=DEVICE, seed=0,
              backend=_backend(backend, monkeypatch))
    torch.nn.init.normal_(ncf.model.layers[-1].weight, std=0.1)
    ncf.fitted = True  # random weights: timing the map needs no training
    x = torch.randn(n, d).to(DEVICE)

    def run():
        ncf.transport(x)

    _time(benchmark, run, backend, shape, warmups=1, passes=2)


def test_train_step(benchmark, backend, shape, monkeypatch):
    d, width, n = shape
    model_backend = _backend(backend, monkeypatch)
    g = torch.Generator().manual_seed(0)
    source = torch.randn(8192, d, generator=g)
    target = torch.randn(8192, d, generator=g) * 1.3 + 0.5
    ncf = NCF(d, hidden=(width,) * 3, device=DEVICE, seed=0, backend=model_backend)
    config = ncf_fast.TrainConfig(steps=10**6, batch_size=n, mmd_batch_size=1024, mmd_active=256)
    trainer = ncf.make_trainer(source.numpy(), target.numpy(), config)

    def step():
        trainer.step()

    _time(benchmark, step, backend, shape, warmups=2, passes=12)
