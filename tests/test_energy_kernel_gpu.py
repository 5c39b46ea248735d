"""The compiled energy-distance kernel on CUDA (benchmarks/gpu_check.sh runs this; skipped on CPU).

What the interpreter cannot show: the real tf32 truncation inside tl.dot (the Gram mode's tf32x3
split), atomics, races, and the "auto" dispatch on CUDA. Checked against float64 references with
the STYLE tolerance rule (tests/tolerance.py), plus linear memory at N = M = 200,000.
"""
from __future__ import annotations

import os

import pytest
import torch

from ncf_fast import energy, pair_sums
from tolerance import assert_close_to_ref, check_energy_distance, value_and_grads

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled Triton (TRITON_INTERPRET unset or 0)")

SHAPES = [(1, 300, 3), (700, 1, 17), (1000, 777, 1), (1000, 777, 2), (999, 1234, 3),
          (1500, 1300, 5), (1500, 1300, 17), (1200, 900, 33), (1200, 900, 64)]


@pytest.mark.parametrize("backend", ("triton", "auto"))
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_compiled_kernel_matches_float64(n, m, d, backend):
    g = torch.Generator(device="cuda").manual_seed(n + d)
    a = torch.randn(n, d, device="cuda", generator=g) * 1.5 + 0.7
    b = torch.randn(m, d, device="cuda", generator=g)
    check_energy_distance(a, b, backend)


@pytest.mark.parametrize("d", (2, 17, 64))
def test_compiled_kernel_duplicates_and_clusters(d):
    """Duplicates, shared points and tight clusters far from the origin (real tf32 in tl.dot)."""
    g = torch.Generator(device="cuda").manual_seed(d)
    centers = torch.randn(5, d, device="cuda", generator=g) * 20.0
    a = centers[torch.randint(0, 5, (900,), device="cuda", generator=g)] + 0.01 * torch.randn(
        900, d, device="cuda", generator=g)
    a[10:20] = a[0]
    b = torch.cat([a[:100].clone(), centers[torch.randint(0, 5, (700,), device="cuda",
                                                          generator=g)] + 0.01])
    check_energy_distance(a, b, "triton")


def test_auto_uses_the_kernel_on_cuda():
    assert pair_sums.resolve_backend("auto", torch.zeros(2, 16, device="cuda")) == "triton"
    assert pair_sums.resolve_backend("auto", torch.zeros(2, 65, device="cuda")) == "torch"


def test_class_conditional_one_launch_matches_torch_path():
    g = torch.Generator(device="cuda").manual_seed(0)
    la = torch.randint(0, 7, (3000,), device="cuda", generator=g)
    lb = torch.randint(0, 7, (2500,), device="cuda", generator=g)
    la[0] = lb[0] = 7  # class 7: a singleton on both sides
    a = torch.randn(3000, 17, device="cuda", generator=g) + 0.1 * la[:, None]
    b = torch.randn(2500, 17, device="cuda", generator=g)
    fast = value_and_grads(lambda x, y: energy.class_conditional_energy_distance(
        x, y, la, lb, backend="triton"), a, b, torch.float32)
    ref64 = value_and_grads(lambda x, y: energy.class_conditional_energy_distance(
        x, y, la, lb, backend="torch"), a, b, torch.float64)
    lowp = value_and_grads(lambda x, y: energy.class_conditional_energy_distance(
        x, y, la, lb, backend="reference"), a, b, torch.float32)
    for k, what in enumerate(("value", "grad_a", "grad_b")):
        assert_close_to_ref(fast[k], ref64[k], lowp[k], what)


def test_linear_memory_at_200k():
    n, d = 200_000, 16
    a = torch.randn(n, d, device="cuda", requires_grad=True)
    b = torch.randn(n, d, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    v = energy.energy_distance(a, b)
    v.backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert extra < 200, f"{extra:.0f} MB above the inputs (cdist: 160 GB)"


def test_compiled_kernel_is_bitwise_reproducible():
    """Two runs give identical bits, near pairs included (their atomic adds are ordered before
    the final one by a barrier; every row is summed by one program)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    a = torch.randn(5000, 17, device="cuda", generator=g)
    b = torch.cat([a[:2000] + 1e-6 * torch.randn(2000, 17, device="cuda", generator=g),
                   torch.randn(3000, 17, device="cuda", generator=g)])
    first = value_and_grads(energy.energy_distance, a, b, torch.float32, backend="triton")
    second = value_and_grads(energy.energy_distance, a, b, torch.float32, backend="triton")
    for x, y in zip(first, second):
        assert torch.equal(x, y)
