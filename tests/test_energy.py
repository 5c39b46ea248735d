"""The energy distance, one op over its backends: the float64 reference ("reference"), the
torch path ("torch": blocked torch ops, or the compiled C loop of ncf_fast.native for float32 with
small d) and the Triton kernel ("triton", interpreted on CPU), against float64.

Covers: the definition by brute force, identities, parity of value and both gradients on odd
sizes (N != M, N = 1, d in DIMS, the kernel's d buckets), duplicate and near points, the
estimators (witness, class-conditional with singleton and empty classes in one launch), the C
loop's tiles and fallback, the tf32x3 accuracy argument of the Gram mode (by a bit-exact model of
its operand split: the interpreter computes tl.dot in plain fp32), subnormal distances under the
GPU's flushing rsqrt, and the torch path's peak memory at N = M = 50,000 (in a subprocess, from
RSS). The compiled kernel on CUDA: tests/test_energy_kernel_gpu.py.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ncf_fast import energy, native, pair_sums, reference
from tolerance import DIMS, assert_close_to_ref, check_energy_distance, setup_sets, value_and_grads

try:
    import triton
    from ncf_fast.kernels import energy_distance as kernel
except ImportError:  # triton is a Linux-only dependency: the torch and reference tests still run
    triton = kernel = None

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch path runs instead")

# the backends an assertion is made for; the float64 reference is the yardstick
TRITON = pytest.param("triton", marks=needs_triton, id="triton")
BACKENDS = (TRITON, "torch")
# odd sizes: N = 1, M = 1, N != M, N not a multiple of BLOCK_N = 128, d in every kernel bucket
SHAPES = [(1, 5, d) for d in DIMS] + [(37, 50, d) for d in DIMS] + [
    (130, 1, 3), (129, 64, 17), (200, 131, 5), (20, 17, 33)]


# ---------------------------------------------------------------------------------------------
# the definition and its identities (float64)


def _brute_force(a, b):
    """Double loops in float64 over numpy rows: the definition, written as plainly as possible."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, m = len(a), len(b)
    cross = sum(np.linalg.norm(x - y) for x in a for y in b) * 2 / (n * m)
    wa = sum(np.linalg.norm(a[i] - a[j]) for i, j in itertools.permutations(range(n), 2))
    wb = sum(np.linalg.norm(b[i] - b[j]) for i, j in itertools.permutations(range(m), 2))
    return cross - (wa / (n * (n - 1)) if n > 1 else 0.0) - (wb / (m * (m - 1)) if m > 1 else 0.0)


@pytest.mark.parametrize("backend", ("torch", "reference"))
@pytest.mark.parametrize("n,m,d", [(1, 5, 2), (7, 4, 1), (13, 17, 3), (20, 9, 17)])
def test_matches_brute_force_double_loop(n, m, d, backend, rng):
    a = rng.normal(size=(n, d)) * 1.5 + 0.3
    b = rng.normal(size=(m, d))
    expected = _brute_force(a, b)
    got = energy.energy_distance(torch.as_tensor(a), torch.as_tensor(b), backend=backend)
    assert abs(float(got) - expected) <= 1e-12 * max(1.0, abs(expected)), backend


def test_zero_for_identical_sets_and_symmetric():
    a = torch.randn(40, 3, dtype=torch.float64)
    b = torch.randn(25, 3, dtype=torch.float64)
    # identical sets: the U-statistic is 2 mean_{i,j} - mean_{i!=j} - mean_{i!=j} = (2/n^2 - 2/(n(n-1))) S
    same = energy.energy_distance(a, a.clone())
    s = reference.pairwise_distance(a, a).sum()
    torch.testing.assert_close(same, 2 * s / 40 ** 2 - 2 * s / (40 * 39))
    # the V-statistic part is exactly zero: check via the definition on a single point
    one = torch.randn(1, 3, dtype=torch.float64)
    assert float(energy.energy_distance(one, one.clone())) == 0.0
    torch.testing.assert_close(energy.energy_distance(a, b), energy.energy_distance(b, a))


def test_finite_gradient_with_duplicate_points():
    a = torch.randn(30, 2, dtype=torch.float64)
    a[5] = a[3]
    a[7] = a[3]
    b = torch.cat([a[:10].clone(), torch.randn(20, 2, dtype=torch.float64)])  # shared points too
    for backend in ("torch", "reference"):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = energy.energy_distance(aa, bb, backend=backend)
        ga, gb = torch.autograd.grad(v, [aa, bb])
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all(), backend
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    g_fast = torch.autograd.grad(energy.energy_distance(aa, bb), [aa, bb])
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    g_ref = torch.autograd.grad(reference.energy_distance(aa, bb), [aa, bb])
    for x, y in zip(g_fast, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_near_pairs_are_exact():
    """Points 1e-5 apart at |x| ~ 100: the Gram form alone would lose every digit."""
    base = torch.randn(50, 3, dtype=torch.float32) + 100.0
    a = base
    b = base + 1e-5 * torch.randn(50, 3)
    s_fast, ga, _ = pair_sums.pair_distance_sums(a, b, grad_a=True)
    d64 = reference.pairwise_distance(a.double(), b.double())
    torch.testing.assert_close(s_fast, d64.sum(), rtol=1e-6, atol=0)
    diff = a.double().unsqueeze(1) - b.double().unsqueeze(0)
    unit = diff / torch.where(d64 > 0, d64, torch.ones_like(d64)).unsqueeze(-1)
    torch.testing.assert_close(ga.double(), unit.sum(1), rtol=1e-4, atol=1e-4)


def test_blocks_do_not_change_the_result(monkeypatch):
    a, b = torch.randn(333, 4, dtype=torch.float64), torch.randn(211, 4, dtype=torch.float64)
    full = pair_sums.pair_distance_sums(a, b, grad_a=True, grad_b=True)
    monkeypatch.setattr(pair_sums, "_BLOCK_ELEMS", 1000)  # ~4 rows per block
    blocked = pair_sums.pair_distance_sums(a, b, grad_a=True, grad_b=True)
    for x, y in zip(full, blocked):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_witness_estimator_value_and_gradient():
    """Value: unbiased for E (checked against a large-sample U-statistic); gradient: the closed form."""
    torch.manual_seed(1)
    mu = lambda n: torch.randn(n, 2, dtype=torch.float64) * 1.3 + 0.5  # noqa: E731
    nu = lambda n: torch.randn(n, 2, dtype=torch.float64)  # noqa: E731
    values = [float(energy.witness_energy_distance(mu(16), mu(64), nu(64), within_rows=32))
              for _ in range(400)]
    truth = float(energy.energy_distance(mu(4000), nu(4000)))
    sem = np.std(values) / np.sqrt(len(values))
    assert abs(np.mean(values) - truth) < 4 * sem + 1e-3

    a = mu(7).requires_grad_()
    c, b = mu(11), nu(13)
    (g,) = torch.autograd.grad(energy.witness_energy_distance(a, c, b), a)
    unit = lambda x, y: (x[:, None] - y[None]) / reference.pairwise_distance(x, y)[..., None]  # noqa: E731
    expected = 2 * unit(a, b).sum(1) / (7 * 13) - 2 * unit(a, c).sum(1) / (7 * 11)
    torch.testing.assert_close(g, expected.detach(), rtol=1e-10, atol=1e-12)


def test_class_conditional_is_mean_of_per_class():
    a, b = torch.randn(30, 2, dtype=torch.float64), torch.randn(24, 2, dtype=torch.float64)
    la = torch.tensor([0, 1, 2] * 10)
    lb = torch.tensor([2, 1, 0] * 8)
    got = energy.class_conditional_energy_distance(a, b, la, lb)
    expected = np.mean([float(energy.energy_distance(a[la == k], b[lb == k])) for k in range(3)])
    assert abs(float(got) - expected) < 1e-12
    with pytest.raises(ValueError, match="only in source"):
        energy.class_conditional_energy_distance(a, b, la, torch.zeros(24, dtype=torch.long))


@pytest.mark.parametrize("bad,exc,match", [
    ((torch.zeros(3, 2), torch.zeros(3, 3)), ValueError, "same d"),
    ((torch.zeros(0, 2), torch.zeros(3, 2)), ValueError, "at least one sample"),
    ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)), TypeError, "floating"),
    ((np.zeros((3, 2)), torch.zeros(3, 2)), TypeError, "torch tensors"),
])
def test_bad_inputs(bad, exc, match):
    with pytest.raises(exc, match=match):
        energy.energy_distance(*bad)

# ---------------------------------------------------------------------------------------------
# value and both gradients in float32 against float64, per backend

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_value_and_gradients_match_float64(n, m, d, backend):
    a, b = setup_sets(n, d, seed=n + d, m=m)
    check_energy_distance(a, b, backend)


# the default ("auto") dispatch on the CPU: the torch path's shapes, and the compiled C loop's
# (native.usable asserted, so the kernel is what runs)
DEFAULT_CASES = ([pytest.param(n, m, d, False, id=f"torch-path-{n}-{m}-{d}")
                  for n, m, d in ((1, 3, 1), (37, 50, 2), (300, 257, 3), (129, 64, 17))]
                 + [pytest.param(n, m, d, True, id=f"compiled-C-{n}-{m}-{d}", marks=needs_kernel)
                    for n, m, d in ((1, 3, 1), (37, 50, 2), (200, 4100, 2), (45, 300, 8))])


@pytest.mark.parametrize("n,m,d,on_c", DEFAULT_CASES)
def test_default_backend_float32_matches_float64(n, m, d, on_c):
    """energy_distance in fp32 with the default backend against float64, with fp32 autograd
    setting the tolerance."""
    if on_c:
        assert native.usable(torch.zeros(1, d), torch.zeros(1, d))
    a, b = torch.randn(n, d) * 2.0 + 1.0, torch.randn(m, d)
    check_energy_distance(a, b, "auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", (2, 17))
def test_duplicate_and_shared_points(d, backend):
    """Coinciding points: |.| = 0 and u(0) = 0, so value and gradients stay finite and exact."""
    a = torch.randn(60, d)
    a[5] = a[3]
    a[7] = a[3]
    b = torch.cat([a[:20].clone(), torch.randn(25, d)])  # 20 points shared between the sets
    b[30] = b[29]
    check_energy_distance(a, b, backend)


@needs_triton
def test_single_point_on_both_sides_is_zero_distance_apart():
    one = torch.randn(1, 3)
    v = energy.energy_distance(one, one.clone(), backend="triton")
    assert float(v) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", (3, 17))
def test_near_pairs_far_from_the_origin(d, backend):
    """Pairs 1e-4 apart at |x| ~ 100 (no centring here): the Gram form alone loses every digit;
    the near-pair correction must give the direct form's accuracy for S and both unit sums."""
    base = torch.randn(40, d) + 100.0
    a = base
    b = torch.cat([base[:25] + 1e-4 * torch.randn(25, d), torch.randn(20, d) + 100.0])
    s, ga, gb = pair_sums.pair_distance_sums(a, b, grad_a=True, grad_b=True, backend=backend)
    a64, b64 = a.double(), b.double()
    dist = reference.pairwise_distance(a64, b64)
    diff = a64.unsqueeze(1) - b64.unsqueeze(0)
    unit = diff / torch.where(dist > 0, dist, torch.ones_like(dist)).unsqueeze(-1)
    dist32 = reference.pairwise_distance(a, b)
    diff32 = a.unsqueeze(1) - b.unsqueeze(0)
    unit32 = diff32 / torch.where(dist32 > 0, dist32, torch.ones_like(dist32)).unsqueeze(-1)
    assert_close_to_ref(s, dist.sum(), dist32.double().sum(), "S")
    assert_close_to_ref(ga, unit.sum(1), unit32.sum(1), "Ga")
    assert_close_to_ref(gb, -unit.sum(0), -unit32.sum(0), "Gb")




# ---------------------------------------------------------------------------------------------
# the Triton kernel's modes and limits

@needs_triton
def test_value_only_mode_matches_and_skips_gradients():
    a, b = torch.randn(30, 17), torch.randn(20, 17)
    s, g = kernel.pair_sums(a, b, grad=False)
    assert g is None
    s_grad, g_grad = kernel.pair_sums(a, b, grad=True)
    torch.testing.assert_close(s, s_grad, rtol=0, atol=0)
    with torch.no_grad():
        v = energy.energy_distance(a.requires_grad_(), b, backend="triton")
    assert not v.requires_grad
    torch.testing.assert_close(v.double(), reference.energy_distance(a.detach().double(),
                                                                      b.double()),
                               rtol=1e-5, atol=1e-6)


@needs_triton
def test_auto_backend_and_limits():
    a = torch.randn(5, 3)
    assert pair_sums.resolve_backend("auto", a) == "torch"  # CPU: the torch path
    assert pair_sums.resolve_backend("triton", a) == "triton"
    with pytest.raises(ValueError, match="d <= 64"):
        energy.energy_distance(torch.randn(4, 65), torch.randn(4, 65), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        energy.energy_distance(a, a, backend="cuda")
    for d in range(1, kernel.MAX_D + 1):  # every d maps to a power-of-two BLOCK_D >= d
        cfg = kernel.config_for(d)
        assert cfg["BLOCK_D"] >= d and cfg["BLOCK_D"] & (cfg["BLOCK_D"] - 1) == 0




# ---------------------------------------------------------------------------------------------
# the torch backend's compiled C loop (ncf_fast.native): float64 parity, tiles, duplicates, fallback

@needs_kernel
def test_compiles_where_a_c_compiler_exists():
    assert native.available()


def _sums64(a, b, same=False):
    """(S, Ga, Gb) in float64 from explicit (N, M, d) differences: the definition."""
    a, b = a.double(), b.double()
    diff = a.unsqueeze(1) - b.unsqueeze(0)
    dist = diff.norm(dim=2)
    unit = diff / torch.where(dist > 0, dist, torch.ones_like(dist)).unsqueeze(-1)
    if same:
        unit.diagonal(dim1=0, dim2=1).zero_()
    return dist.sum(), unit.sum(1), -unit.sum(0)


@needs_kernel
@pytest.mark.parametrize("n,m,d,tile", [(1, 1, 1, 4096), (1, 70, 2, 4096), (70, 1, 2, 4096),
                                        (37, 131, 2, 4096), (129, 67, 1, 7), (65, 300, 2, 64),
                                        (33, 97, 3, 4096), (41, 130, 5, 64), (19, 200, 8, 4096)])
def test_matches_float64_definition(n, m, d, tile, monkeypatch):
    """Odd sizes, partial 64-column chunks, several column tiles (tile 7, 64), N = 1, M = 1."""
    monkeypatch.setattr(native, "_TILE", tile)
    a = torch.randn(n, d) * 1.5 + 0.3
    b = torch.randn(m, d)
    b[: min(n, m) // 3] = a[: min(n, m) // 3]  # coinciding points: unit vector 0
    got = native.pair_sums(a, b, grad_a=True, grad_b=True, same=False)
    again = native.pair_sums(a, b, grad_a=True, grad_b=True, same=False)
    # fp32 differences summed in double: each pair is off by a few fp32 ulps of |a| + |b|
    ulps = float(a.abs().max() + b.abs().max()) * 1e-6
    for g, g2, w, pairs, what in zip(got, again, _sums64(a, b), (n * m, m, n), ("S", "Ga", "Gb")):
        assert g.dtype == (torch.float64 if what == "S" else torch.float32), what
        assert float((g.double() - w).abs().max()) <= ulps * pairs, what
        assert torch.equal(g, g2), f"{what} is not deterministic"


@needs_kernel
def test_same_set_skips_the_diagonal():
    a = torch.randn(90, 2)
    s, ga, gb = native.pair_sums(a, a, grad_a=True, grad_b=True, same=True)
    s64, ga64, gb64 = _sums64(a, a, same=True)
    torch.testing.assert_close(s, s64, rtol=1e-6, atol=0)
    torch.testing.assert_close(ga.double(), ga64, rtol=0, atol=1e-4)
    torch.testing.assert_close(gb.double(), gb64, rtol=0, atol=1e-4)


def test_disabled_or_without_compiler_the_torch_path_runs(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native._library.cache_clear()
    try:
        assert not native.available()
        a, b = torch.randn(40, 2), torch.randn(30, 2)
        s, ga, gb = pair_sums.pair_distance_sums(a, b, grad_a=True, grad_b=True)
        s64, ga64, gb64 = _sums64(a, b)
        torch.testing.assert_close(s, s64, rtol=1e-6, atol=0)
        torch.testing.assert_close(ga.double(), ga64, rtol=0, atol=1e-4)
    finally:
        native._library.cache_clear()


@needs_kernel
def test_dispatch_takes_the_kernel_up_to_max_d_only():
    """Above MAX_D the torch path's GEMM form is faster (native.py's timings)."""
    z = torch.zeros(1, native.MAX_D)
    assert native.usable(z, z)
    z = torch.zeros(1, native.MAX_D + 1)
    assert not native.usable(z, z)
    assert not native.usable(z[:, :2].double(), z[:, :2].double())


# ---------------------------------------------------------------------------------------------
# class-conditional losses: one launch over label-sorted segments

def _per_class_reference(a, b, la, lb, classes):
    return torch.stack([reference.energy_distance(a[la == k], b[lb == k]) for k in classes]).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_conditional_with_singleton_classes(backend):
    """Classes 3 and 7 have one sample on one side (within term 0 there, cross term kept); labels
    unsorted and not contiguous integers."""
    d = 3
    la = torch.tensor([0] * 40 + [3] * 1 + [7] * 9 + [2] * 33)[torch.randperm(83)]
    lb = torch.tensor([0] * 31 + [3] * 12 + [7] * 1 + [2] * 20)[torch.randperm(64)]
    a, b = torch.randn(83, d) + 0.3, torch.randn(64, d)
    classes = torch.unique(la)
    fast = value_and_grads(lambda x, y: energy.class_conditional_energy_distance(
        x, y, la, lb, backend=backend), a, b, torch.float32)
    ref64 = value_and_grads(lambda x, y: _per_class_reference(x, y, la, lb, classes),
                             a, b, torch.float64)
    lowp = value_and_grads(lambda x, y: _per_class_reference(x, y, la, lb, classes),
                            a, b, torch.float32)
    for k, what in enumerate(("value", "grad_a", "grad_b")):
        assert_close_to_ref(fast[k], ref64[k], lowp[k], f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_conditional_singleton_on_both_sides_is_its_cross_term(backend):
    a, b = torch.randn(1, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    lab = torch.zeros(1, dtype=torch.long)
    v = energy.class_conditional_energy_distance(a, b, lab, lab, backend=backend)
    torch.testing.assert_close(v.double(), 2 * (a - b).norm(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_missing_on_one_side_is_an_error(backend):
    a, b = torch.randn(10, 2), torch.randn(8, 2)
    la = torch.tensor([0, 1] * 5)
    with pytest.raises(ValueError, match=r"only in source \[1\]"):
        energy.class_conditional_energy_distance(a, b, la, torch.zeros(8, dtype=torch.long),
                                                 backend=backend)
    # a class list naming a class absent from a batch
    with pytest.raises(ValueError, match=r"classes \[2\] have no"):
        energy.class_conditional_witness_energy_distance(
            a[:4], a[4:], b, la[:4], la[4:], torch.tensor([0, 1] * 4), classes=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_conditional_witness_matches_the_per_class_loop(backend):
    """The class-conditional witness loss in one segmented call equals the Python loop over
    classes, value and gradient, in float64."""
    torch.manual_seed(3)
    la = torch.tensor([0, 1, 2] * 6)
    lp = torch.tensor([0, 1, 2] * 20)[torch.randperm(60)]
    lb = torch.tensor([0] * 30 + [1] * 1 + [2] * 14)  # class 1: a single target sample
    dtype = torch.float64 if backend == "torch" else torch.float32
    act = torch.randn(18, 17, dtype=dtype, requires_grad=True)
    pas, tgt = torch.randn(60, 17, dtype=dtype), torch.randn(45, 17, dtype=dtype) + 0.2
    v = energy.class_conditional_witness_energy_distance(act, pas, tgt, la, lp, lb,
                                                         within_rows=8, backend=backend)
    (g,) = torch.autograd.grad(v, act)
    loop = torch.stack([energy.witness_energy_distance(act[la == k], pas[lp == k],
                                                       tgt[lb == k], within_rows=8,
                                                       backend="torch") for k in range(3)])
    (g_loop,) = torch.autograd.grad(loop.mean(), act)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, loop.mean(), **tol)
    torch.testing.assert_close(g, g_loop, **tol)
    # an explicit class list gives the same loss (with the default within_rows and backend)
    v2 = energy.class_conditional_witness_energy_distance(act, pas, tgt, la, lp, lb,
                                                          classes=torch.arange(3))
    v3 = energy.class_conditional_witness_energy_distance(act, pas, tgt, la, lp, lb)
    torch.testing.assert_close(v2, v3, rtol=1e-12, atol=0)


@needs_triton
def test_segmented_kernel_is_one_launch(monkeypatch):
    """All classes of a term go through a single kernel launch (no Python loop over classes)."""
    launches = []
    real = kernel._pair_sums_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernel, "_pair_sums_kernel", Counting())
    la, lb = torch.arange(30) % 5, torch.arange(25) % 5
    a, b = torch.randn(30, 3), torch.randn(25, 3)
    with torch.no_grad():
        energy.class_conditional_energy_distance(a, b, la, lb, backend="triton")
    assert len(launches) == 3  # (a, b), (a, a), (b, b): one launch each for all 5 classes


# ---------------------------------------------------------------------------------------------
# the Gram mode's precision: a bit-exact model of the kernel's tf32x3 arithmetic

def _tf32(x):
    """Truncate float32 to tf32 (10 mantissa bits), as the kernel's split and the tensor core's
    operand read do."""
    return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)


def _gram_model_sums(a, b, three_pass: bool):
    """S and Ga by the kernel's GRAM arithmetic, with its dots in tf32x3 (or plain tf32)."""
    a2 = a.double().square().sum(1).float()
    b2 = b.double().square().sum(1).float()

    def dot(x, y):  # x @ y.T with tensor-core operand rounding, fp32 accumulation
        if not three_pass:
            return _tf32(x) @ _tf32(y).T
        xh, yh = _tf32(x), _tf32(y)
        return _tf32(x - xh) @ yh.T + xh @ _tf32(y - yh).T + xh @ yh.T

    norms = a2[:, None] + b2[None, :]
    d2 = norms - 2.0 * dot(a, b)
    near = d2 <= kernel.NEAR * norms
    d2_direct = (a[:, None] - b[None]).square().sum(-1)
    far = ~near
    w = torch.where(far, torch.rsqrt(torch.where(far, d2, torch.ones_like(d2))),
                    torch.zeros_like(d2))
    s = (d2 * w).sum(1).double()
    wn = torch.where(near & (d2_direct > 0), d2_direct.clamp_min(1e-30).rsqrt(),
                     torch.zeros_like(d2))
    s += (d2_direct * wn).sum(1).double()
    ga = a * w.sum(1, keepdim=True) - dot(w, b.T.contiguous())  # W B via the same split
    ga += (wn.unsqueeze(-1) * (a[:, None] - b[None])).sum(1)
    return s.sum(), ga


def _gram_model_energy(a, b, three_pass):
    center = 0.5 * (a.mean(0) + b.mean(0))
    a, b = a - center, b - center
    n, m = len(a), len(b)
    s_ab, g_ab = _gram_model_sums(a, b, three_pass)
    s_aa, g_aa = _gram_model_sums(a, a, three_pass)
    s_bb, _ = _gram_model_sums(b, b, three_pass)
    value = 2 * s_ab / (n * m) - s_aa / (n * (n - 1)) - s_bb / (m * (m - 1))
    return value, 2 * g_ab / (n * m) - 2 * g_aa / (n * (n - 1))


def _clustered(n, d, gen):
    """Tight clusters far from the origin: many pairs close relative to their norms."""
    centers = torch.randn(6, d, generator=gen) * 5.0
    return centers[torch.randint(0, 6, (n,), generator=gen)] + 0.05 * torch.randn(n, d,
                                                                                   generator=gen)


@needs_triton
@pytest.mark.parametrize("d", (16, 64))
@pytest.mark.parametrize("data", ("gaussian", "clustered"))
def test_tf32x3_gram_mode_is_as_accurate_as_the_direct_form(d, data):
    """The STYLE tolerance rule against float64, with the float32 direct-difference reference as
    the yardstick: the tf32x3 model passes; one tf32 pass (a control: the test can fail) does
    not."""
    gen = torch.Generator().manual_seed(d)
    if data == "gaussian":
        a, b = torch.randn(300, d, generator=gen) + 0.5, torch.randn(280, d, generator=gen)
    else:
        a, b = _clustered(300, d, gen), _clustered(280, d, gen) + 0.02
    a64, a32 = a.double().requires_grad_(), a.clone().requires_grad_()
    ref64 = reference.energy_distance(a64, b.double())
    ref32 = reference.energy_distance(a32, b)
    (g64,) = torch.autograd.grad(ref64, a64)
    (g32,) = torch.autograd.grad(ref32, a32)
    value, grad = _gram_model_energy(a, b, three_pass=True)
    assert_close_to_ref(value, ref64, ref32, "tf32x3 value")
    assert_close_to_ref(grad, g64, g32, "tf32x3 grad_a")
    value1, grad1 = _gram_model_energy(a, b, three_pass=False)
    with pytest.raises(AssertionError):
        assert_close_to_ref(value1, ref64, ref32, "tf32 value")
        assert_close_to_ref(grad1, g64, g32, "tf32 grad_a")


# ---------------------------------------------------------------------------------------------
# memory

_MEMORY_PROBE = textwrap.dedent("""
    import os, resource, sys, threading, time
    import torch
    from ncf_fast import energy
    torch.set_num_threads(1)  # one thread: no OpenMP spinning on a shared machine

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    n, d = int(sys.argv[1]), int(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=gen).requires_grad_()
    b = (torch.randn(n, d, generator=gen) + 0.5).requires_grad_()
    energy.energy_distance(a[:300], b[:300]).backward()  # warm-up: lazy allocations happen here
    a.grad = b.grad = None
    base = rss()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, stop = [base], threading.Event()

    def sample():  # RSS every 0.5 ms; ru_maxrss below catches any peak above the earlier one
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    value = energy.energy_distance(a, b, backend="torch")
    value.backward()
    stop.set()
    thread.join()
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    top = max(peak[0], ru_after if ru_after > ru_before else 0)
    print((top - base) / 2 ** 20, float(value.detach()), bool(torch.isfinite(a.grad).all()))
""")


@pytest.mark.slow  # ~70 s: 7.5e9 pairs on one CPU thread
def test_torch_path_memory_is_linear_at_50k():
    """N = M = 50,000, d = 4, value and both gradients: < 100 MB above the inputs (the cdist path
    would hold 50,000^2 fp32 distances = 10 GB, twice with its gradient)."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "50000", "4"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra_mb, value, finite = proc.stdout.split()
    assert finite == "True" and float(value) > 0
    assert float(extra_mb) < 100.0, f"{float(extra_mb):.1f} MB above the inputs"


# ---------------------------------------------------------------------------------------------
# subnormal squared distances: the GPU's rsqrt flushes them to zero

@pytest.fixture
def ftz_rsqrt(monkeypatch):
    """Make the interpreter's tl.rsqrt behave like the GPU's rsqrt.approx.ftz.f32: a subnormal
    input is flushed to zero first (so 1/sqrt gives inf)."""
    from triton.runtime import interpreter

    def create_rsqrt(self, arg):
        x = arg.data
        flushed = np.where(np.abs(x) < np.finfo(x.dtype).tiny, np.zeros_like(x), x)
        with np.errstate(divide="ignore"):
            return interpreter.TensorHandle(1 / np.sqrt(flushed), arg.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_rsqrt", create_rsqrt)


if triton is not None:
    @triton.jit
    def _rsqrt_probe(x_ptr, y_ptr):
        import triton.language as tl
        offs = tl.arange(0, 4)
        tl.store(y_ptr + offs, tl.rsqrt(tl.load(x_ptr + offs)))


@needs_triton
def test_ftz_rsqrt_emulation_bites(ftz_rsqrt):
    """Control: under the emulation a plain tl.rsqrt of a subnormal is inf (as on the GPU)."""
    x = torch.tensor([1e-40, 4.0, 1e-39, 1.0])
    y = torch.empty(4)
    _rsqrt_probe[(1,)](x, y)
    assert torch.isinf(y[0]) and torch.isinf(y[2]) and y[1] == 0.5 and y[3] == 1.0


@needs_triton
@pytest.mark.parametrize("d", (2, 17))  # DIRECT and GRAM modes
def test_near_coincident_points_with_subnormal_squared_distances(d, ftz_rsqrt):
    """Points 1e-20 to 1e-22 apart near the origin: |a - b|^2 ~ 1e-40..1e-44 is subnormal in
    fp32. With the GPU's flushing rsqrt emulated, S and both unit-vector sums stay finite and
    match float64 (S compared in units of 1e-20)."""
    gen = torch.Generator().manual_seed(d)
    a = torch.randn(40, d, generator=gen) * 1e-20
    b = torch.cat([a[:10] + torch.randn(10, d, generator=gen) * 1e-22,
                   torch.randn(15, d, generator=gen) * 1e-20])
    s, ga = kernel.pair_sums(a, b, grad=True)
    _, gb = kernel.pair_sums(b, a, grad=True)
    assert torch.isfinite(s).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    for x, y, fast_s, fast_g, name in ((a, b, s, ga, "a"), (b, a, None, gb, "b")):
        x64, y64 = x.double(), y.double()
        diff64 = x64[:, None] - y64[None]
        dist64 = diff64.norm(dim=-1)
        unit64 = (diff64 / torch.where(dist64 > 0, dist64, 1.0)[..., None]).sum(1)
        diff32 = x[:, None] - y[None]
        dist32 = diff32.norm(dim=-1)
        unit32 = (diff32 / torch.where(dist32 > 0, dist32, 1.0)[..., None]).sum(1)
        if fast_s is not None:
            assert_close_to_ref(fast_s * 1e20, dist64.sum(1) * 1e20, dist32.double().sum(1) * 1e20,
                                "S")
        assert_close_to_ref(fast_g, unit64, unit32, f"G{name}")
