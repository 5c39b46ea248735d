"""The energy distance (torch path): brute force agreement, identities, gradients, estimators."""
import itertools

import numpy as np
import pytest
import torch

from ncf_fast import energy, pair_sums, reference
from tolerance import assert_close_to_ref


def _brute_force(a, b):
    """Double loops in float64 over numpy rows: the definition, written as plainly as possible."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, m = len(a), len(b)
    cross = sum(np.linalg.norm(x - y) for x in a for y in b) * 2 / (n * m)
    wa = sum(np.linalg.norm(a[i] - a[j]) for i, j in itertools.permutations(range(n), 2))
    wb = sum(np.linalg.norm(b[i] - b[j]) for i, j in itertools.permutations(range(m), 2))
    return cross - (wa / (n * (n - 1)) if n > 1 else 0.0) - (wb / (m * (m - 1)) if m > 1 else 0.0)


@pytest.mark.parametrize("n,m,d", [(1, 5, 2), (7, 4, 1), (13, 17, 3), (20, 9, 17)])
def test_matches_brute_force_double_loop(n, m, d, rng):
    a = rng.normal(size=(n, d)) * 1.5 + 0.3
    b = rng.normal(size=(m, d))
    expected = _brute_force(a, b)
    for backend in ("torch", "reference"):
        got = energy.energy_distance(torch.as_tensor(a), torch.as_tensor(b), backend=backend)
        assert abs(float(got) - expected) <= 1e-12 * max(1.0, abs(expected)), backend


@pytest.mark.parametrize("n,m,d", [(1, 3, 1), (37, 50, 2), (300, 257, 3), (129, 64, 17)])
def test_torch_path_value_and_gradients_float32(n, m, d):
    a = torch.randn(n, d) * 2.0 + 1.0
    b = torch.randn(m, d)
    outs = {}
    for name, dtype, fn in (("fast", torch.float32, energy.energy_distance),
                            ("lowp", torch.float32, reference.energy_distance),
                            ("ref64", torch.float64, reference.energy_distance)):
        aa = a.to(dtype).requires_grad_()
        bb = b.to(dtype).requires_grad_()
        v = fn(aa, bb)
        outs[name] = (v, *torch.autograd.grad(v, [aa, bb]))
    for k, what in enumerate(("value", "grad_a", "grad_b")):
        assert_close_to_ref(outs["fast"][k], outs["ref64"][k], outs["lowp"][k], what)


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
