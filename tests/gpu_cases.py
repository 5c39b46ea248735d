"""The compiled-kernel (GPU) test selection and the kernel configurations gpu_check warms up.

One list serves both: tests/test_mlp.py parametrises its float64-parity test with
GPU_CASES on CUDA, and benchmarks/gpu_warmup.py compiles every configuration the GPU check
uses (these cases, the deterministic tests' variants, the benchmark and accuracy shapes, the
energy kernel's d buckets) in parallel processes before the timed steps.

GPU_CASES covers activation x cost x width class once each (12 cases, no configuration
repeated): width classes "narrow" (<= 16: 16-column tiles, H_PAD 16) and "wide" (> 16:
32-column tiles, H_PAD 96, i.e. one and a half 64-row weight-gradient tiles, partly masked);
d cycles through 1, 2, 3, 17 and N through 1, 1000 (a partial block) and 30,000 (469 row
blocks: more than one launch of 396 programs on 132 SMs), depth 1 to 3.
"""
from __future__ import annotations

from itertools import product

ACTS = ("softplus", "tanh", "silu")
COSTS = ("quadratic", "power1.5")
WIDTH_CLASSES = {"narrow": ((16,), (13, 16)), "wide": ((80, 72), (96, 90, 70))}
_DIMS = (1, 2, 3, 17)
_ROWS = (1, 1000, 30_000)


def _gpu_cases():
    cases = []
    for i, (act, cost, width_class) in enumerate(product(ACTS, COSTS, WIDTH_CLASSES)):
        widths = WIDTH_CLASSES[width_class][(i // 2) % 2]
        cases.append((_DIMS[i % len(_DIMS)], widths, act, cost, _ROWS[i % len(_ROWS)]))
    return cases


GPU_CASES = _gpu_cases()
# the deterministic-mode tests reuse two cases' shapes (wide, both costs)
DETERMINISTIC_PARITY = next(c for c in GPU_CASES if len(c[1]) > 1 and c[1][0] > 16
                            and c[3] == "power1.5")
DETERMINISTIC_BITWISE = next(c for c in GPU_CASES if c[1][0] > 16 and c[3] == "quadratic")

# benchmarks/gpu_bench.py's MLP shapes (d, width, rows; depth 3, softplus) and the tf32
# accuracy shape; the energy kernel's configurations: one d per bucket
BENCH_MLP = ((16, 128, 65_536), (64, 256, 65_536), (2, 64, 8192))
ACCURACY_MLP = (16, 128, 4096)
ENERGY_DIMS = (2, 16, 32, 64)


def warmup_jobs(smoke: bool = False):
    """Every MLP / energy configuration the GPU check launches, as small jobs for
    benchmarks/gpu_warmup.py: ("mlp", d, widths, act, cost, precision, deterministic) and
    ("energy", d). ``smoke``: a few of them (the CPU smoke mode runs them interpreted)."""
    jobs = [("mlp", d, widths, act, cost, "tf32x3", False) for d, widths, act, cost, _ in GPU_CASES]
    for d, widths, act, cost, _ in (DETERMINISTIC_PARITY, DETERMINISTIC_BITWISE):
        jobs.append(("mlp", d, widths, act, cost, "tf32x3", True))
    for d, width, _ in BENCH_MLP:
        jobs.append(("mlp", d, (width,) * 3, "softplus", "quadratic", "tf32x3", False))
    d, width, _ = ACCURACY_MLP
    jobs.append(("mlp", d, (width,) * 3, "softplus", "quadratic", "tf32", False))
    jobs += [("energy", d) for d in ENERGY_DIMS]
    if smoke:
        jobs = [j for j in jobs if j[0] == "energy" and j[1] <= 16] + [
            ("mlp", 2, (16,), "softplus", "quadratic", "tf32x3", False)]
    return jobs
