"""gpu_check's measured steps: tf32 fast-mode accuracy, then timings, each row written as measured.

    python benchmarks/gpu_bench.py accuracy    # triton tf32x3 / tf32 vs the float64 reference
    python benchmarks/gpu_bench.py timings     # (MLP backend, energy backend) rows
    NCF_CHECK_MODE=smoke ...                   # toy sizes (CPU, Triton interpreted)

Every row is printed and appended to $NCF_CHECK_OUT/rows.jsonl (default /tmp/ncf_gpu_check) the
moment it is measured, so a run cut by its timeout still returns the rows it finished;
benchmarks/summarize.py prints them as the summary table.

Timing: one untimed call first (kernels are compiled by gpu_warmup.py; this absorbs the
allocator and cuBLAS heuristics), then ``reps`` calls, each between two CUDA events (CPU:
perf_counter); the median and the range are reported, never the best alone. Peak memory:
torch.cuda.max_memory_allocated over the timed calls, inputs included.

Rows, named by (MLP backend, energy backend):
* hj_residual forward + backward (depth 3, softplus, quadratic cost): "eager autograd" (the
  reference backend: autograd with create_graph, what the research code does), "torch" (the
  fused analytic algorithm in torch ops), "triton" (tf32x3, and the tf32 fast mode).
* energy distance, value and both gradients, N = M: "torch.cdist autograd" (the research
  code's U-statistic, built here from plain torch; only where its N x N matrices fit),
  "torch" (block-wise), "triton".
* one training step, composed from the public loss pieces with explicit backends: Adam on
  mean r^2 over the collocation batch + 30 x the energy distance between T(x) = x + grad h(p)
  and the targets (U-statistic over 8192 pushed samples: the same loss in every row).
  "eager autograd + torch.cdist energy", "torch + torch", "triton + triton".
Achieved TFLOP/s counts the MLP GEMMs only (12 sweeps per residual row, 8 per pushed row); the
fraction of the bound divides it by the ceiling of the arithmetic used (../shared/GPU.md: fp32
non-tensor 67 TFLOP/s for cuBLAS fp32, tf32 495, tf32x3 = three tf32 products, 165); for the
energy distance it is the H200 bound of kernels/energy_distance.py over the measured time.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from bench_energy import _bound_seconds, cdist_energy_distance  # noqa: E402
from bench_residual import _gemm_flops  # noqa: E402
from gpu_cases import ACCURACY_MLP, BENCH_MLP  # noqa: E402

from ncf_fast import PotentialMLP, costs, reference  # noqa: E402
from ncf_fast.energy import energy_distance  # noqa: E402
from ncf_fast.kernels import set_dot_precision  # noqa: E402
from ncf_fast.losses import hj_residual  # noqa: E402

SMOKE = os.environ.get("NCF_CHECK_MODE") == "smoke"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT = Path(os.environ.get("NCF_CHECK_OUT", "/tmp/ncf_gpu_check"))
CEILING_TFLOPS = {"tf32x3": 495.0 / 3, "tf32": 495.0, "fp32": 67.0}
MLP_NAMES = {"reference": "eager autograd", "torch": "torch", "triton": "triton"}

if SMOKE:  # toy sizes: every row once, interpreted (the interpreter is not a benchmark)
    MLP_SHAPES = ((2, 16, 70),)
    ENERGY_SHAPES = ((130, 2), (40, 17))
    TRAIN_SHAPES = ((2, 16, 70),)
    MMD_ROWS, ACCURACY = 40, (2, 16, 70)
else:
    MLP_SHAPES = BENCH_MLP
    ENERGY_SHAPES = ((8192, 2), (8192, 16), (8192, 64), (65_536, 16), (1_000_000, 16))
    TRAIN_SHAPES = BENCH_MLP[:2]
    MMD_ROWS, ACCURACY = 8192, ACCURACY_MLP


def emit(row: dict):
    """Print one measured row and append it to rows.jsonl at once."""
    row = dict(row, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
             if k not in ("device", "times_ms")}
    print("ROW", shown, flush=True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, reps: int):
    """Times of ``reps`` calls in ms (after one untimed call) and the peak memory in MB.
    Smoke mode: the interpreter is not a benchmark, so one call, timed."""
    if SMOKE:
        reps = 1
    else:
        fn()
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None
    return sorted(times), peak


def timing_row(section, name, shape, backends, fn, reps, flops=None, ceiling=None,
               bound_s=None):
    times, peak = time_ms(fn, reps)
    median = times[len(times) // 2]
    row = dict(section=section, name=name, shape=shape, backends=backends, ms=median,
               ms_min=times[0], ms_max=times[-1], reps=len(times), peak_mb=peak, times_ms=times)
    if flops:
        row["tflops"] = flops / (median * 1e-3) / 1e12
        if DEVICE == "cuda" and ceiling:
            row["of_bound"] = row["tflops"] / ceiling
    if bound_s and DEVICE == "cuda":
        row["of_bound"] = bound_s / (median * 1e-3)
    emit(row)


def _model(d, width, backend, deterministic=False):
    torch.manual_seed(0)
    return PotentialMLP(d, (width,) * 3, "softplus", backend=backend,
                        deterministic=deterministic).to(DEVICE)


def _inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(DEVICE), torch.rand(n, 1, generator=g).to(DEVICE)


def _ceiling(backend, precision="tf32x3"):
    return CEILING_TFLOPS[precision if backend == "triton" else "fp32"]


# ------------------------------------------------------------------------------- accuracy
def accuracy():
    """Max |triton - float64| / max |float64| for u, p, r and the parameter gradient of a
    weighted loss, in tf32x3 (default) and tf32 (fast mode), beside the float32 reference's
    own error (the yardstick of the tests' tolerance rule)."""
    d, width, n = ACCURACY
    model = _model(d, width, "triton")
    params = model.params
    x, t = _inputs(n, d, 1)
    cost = costs.Quadratic()
    g = torch.Generator().manual_seed(2)
    wu, wp, wr = (torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)
                  for s in ((n,), (n, d), (n,)))

    def outputs(fn_pu, fn_r, ps):
        u, p = fn_pu(ps)
        r = fn_r(ps)
        loss = (u.double() * wu).sum() + (p.double() * wp).sum() + (r.double() * wr).sum()
        grads = torch.autograd.grad(loss, ps)
        return u, p, r, torch.cat([gr.reshape(-1) for gr in grads])

    def ref(ps, upcast):
        return outputs(
            lambda q: reference.potential_and_grad(q, "softplus", x, t, create_graph=True,
                                                   upcast=upcast),
            lambda q: reference.characteristic_residual(q, "softplus", cost, x, t,
                                                        upcast=upcast), ps)

    from ncf_fast.kernels import characteristic_residual, potential_and_grad
    ref64 = ref(params, True)
    candidates = {"fp32 reference": lambda: ref(params, False)}
    for precision in ("tf32x3", "tf32"):
        def fast(precision=precision):
            set_dot_precision(precision)
            try:
                return outputs(lambda q: potential_and_grad(q, "softplus", x, t),
                               lambda q: characteristic_residual(q, "softplus",
                                                                 costs.kernel_constants(cost), x, t),
                               params)
            finally:
                set_dot_precision("tf32x3")
        candidates[f"triton {precision}"] = fast
    for label, run in candidates.items():
        outs = run()
        for name, fast_v, r64 in zip(("u", "grad_x u", "r", "dloss/dtheta"), outs, ref64):
            err = float((fast_v.detach().double() - r64.detach()).abs().max()
                        / r64.detach().abs().max().clamp_min(1e-30))
            emit(dict(section="accuracy", name=name, shape=f"d={d},w={width}x3,n={n}",
                      backends=label, rel_err=err))


# -------------------------------------------------------------------------------- timings
def mlp_rows():
    cost = costs.Quadratic()
    for d, width, n in MLP_SHAPES:
        x, t = _inputs(n, d)
        reps = 3 if SMOKE else (10 if n <= 8192 else 5)
        variants = [("reference", "tf32x3"), ("torch", "tf32x3"), ("triton", "tf32x3")]
        if (d, width, n) == MLP_SHAPES[0]:
            variants.append(("triton", "tf32"))
        for backend, precision in variants:
            model = _model(d, width, backend)

            def step(model=model):
                model.zero_grad(set_to_none=True)
                r = hj_residual(model, x, t, cost)
                (r * r).mean().backward()

            set_dot_precision(precision)
            label = MLP_NAMES[backend] + (f" ({precision})" if backend == "triton" else "")
            try:
                timing_row("mlp", "hj_residual fwd+bwd", f"d={d},w={width}x3,n={n}", label,
                           step, reps, _gemm_flops(d, width, n, 12),
                           _ceiling(backend, precision))
            finally:
                set_dot_precision("tf32x3")


def train_rows():
    """One Adam step of the composed loss per (MLP backend, energy backend) pair."""
    cost = costs.Quadratic()
    combos = (("reference", "cdist", "eager autograd + torch.cdist energy"),
              ("torch", "torch", "torch + torch"), ("triton", "triton", "triton + triton"))
    for d, width, n in TRAIN_SHAPES:
        xc, tc = _inputs(n, d, 3)
        xs, _ = _inputs(MMD_ROWS, d, 4)
        target = _inputs(MMD_ROWS, d, 5)[0] * 1.3 + 0.5
        flops = _gemm_flops(d, width, n, 12) + _gemm_flops(d, width, MMD_ROWS, 8)
        for mlp_backend, energy_backend, label in combos:
            model = _model(d, width, mlp_backend)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
            energy = (cdist_energy_distance if energy_backend == "cdist" else
                      functools.partial(energy_distance, backend=energy_backend))

            def step(model=model, opt=opt, energy=energy):
                opt.zero_grad(set_to_none=True)
                r = hj_residual(model, xc, tc, cost)
                _, p = model.value_and_grad(xs, 0.0, create_graph=True)
                loss = (r * r).mean() + 30.0 * energy(xs + cost.grad_h(p), target)
                loss.backward()
                opt.step()

            timing_row("train", f"train step (mmd rows {MMD_ROWS})", f"d={d},w={width}x3,n={n}",
                       label, step, 3 if SMOKE else 5, flops, _ceiling(mlp_backend))


def energy_rows():
    for n, d in ENERGY_SHAPES:
        g = torch.Generator().manual_seed(n + d)
        a = (torch.randn(n, d, generator=g) * 1.5 + 0.7).to(DEVICE)
        b = torch.randn(n, d, generator=g).to(DEVICE)
        backends = [("torch.cdist autograd", cdist_energy_distance)]
        backends += [(name, functools.partial(energy_distance, backend=name))
                     for name in ("torch", "triton")]
        for label, fn in backends:
            if label.startswith("torch.cdist") and not SMOKE and (
                    40 * n * n > 0.5 * torch.cuda.mem_get_info()[0]):
                continue  # three N x N matrices and their gradients do not fit
            if label == "torch" and n > 8192 and not SMOKE:
                continue  # ~20 small kernels per 2^18-pair block: minutes at N = 65,536

            def step(fn=fn):
                aa, bb = a.detach().requires_grad_(), b.detach().requires_grad_()
                fn(aa, bb).backward()

            timing_row("energy", "energy distance fwd+bwd", f"N=M={n},d={d}", label, step,
                       1 if n >= 1_000_000 else 3,
                       bound_s=_bound_seconds(n, d) if label == "triton" else None)


def main(what: str) -> int:
    print(f"device {DEVICE}" + (f" ({torch.cuda.get_device_name()})" if DEVICE == "cuda" else "")
          + f", torch {torch.__version__}, mode {'smoke' if SMOKE else 'full'}", flush=True)
    if what == "accuracy":
        accuracy()
    elif what == "timings":  # cheapest and most asked-for first: a cut run keeps those
        mlp_rows()
        train_rows()
        energy_rows()
    else:
        raise SystemExit(f"usage: gpu_bench.py accuracy|timings, got {what!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
