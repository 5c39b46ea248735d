"""Shared test and benchmark helpers: the tolerance rule, awkward shape lists, random MLP
parameters (make_params) and sample sets (setup_sets).

The benchmarks import this module too (benchmarks/*.py put tests/ on sys.path), so that a
benchmark times the inputs the tests check.

The rule (STYLE.md): a fast result passes when
    max |fast - ref64| <= 2 * max |ref_lowp - ref64| + floor(dtype),
where ref_lowp is the reference evaluated in the fast path's dtype: the fast path may be at most
twice as wrong as the straightforward implementation in the same precision.
"""
from __future__ import annotations

import torch

DIMS = (1, 2, 3, 17)
WIDTHS = ((24,), (40, 40, 40), (16, 48, 32))
ROWS = (1, 37, 300)

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6}


def make_params(d, widths, seed, dtype=torch.float32, device="cpu", bias_scale=0.5):
    """Weights and biases [W1, b1, ..., WL, bL] of a PotentialMLP-like network on (x, t)
    (W_l: (out, in), first in = d + 1), drawn in float64 and scaled so that activations leave the
    linear regime; returned as leaf tensors requiring grad."""
    g = torch.Generator().manual_seed(seed)
    fan = (d + 1,) + tuple(widths) + (1,)
    params = []
    for i, o in zip(fan[:-1], fan[1:]):
        params.append(torch.randn(o, i, generator=g, dtype=torch.float64) * (1.5 / i ** 0.5))
        params.append(torch.randn(o, generator=g, dtype=torch.float64) * bias_scale)
    return [p.to(device, dtype).requires_grad_() for p in params]


def setup_sets(n, d, seed=0, m=None, device="cpu"):
    """Two sample sets for the energy distance: a (n, d) Gaussian scaled by 1.5 and shifted by 0.7
    against a standard (m, d) one (m = n by default), float32."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g) * 1.5 + 0.7
    b = torch.randn(n if m is None else m, d, generator=g)
    return a.to(device), b.to(device)


def assert_close_to_ref(fast, ref64, ref_lowp, name: str = "value", floor: float | None = None):
    """Assert the STYLE tolerance rule; on failure report the worst element and both errors."""
    fast = torch.as_tensor(fast).detach().double().cpu()
    ref64 = torch.as_tensor(ref64).detach().double().cpu()
    ref_lowp = torch.as_tensor(ref_lowp).detach().double().cpu()
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    scale = max(float(ref64.abs().max()) if ref64.numel() else 0.0, 1.0)
    if floor is None:
        floor = FLOOR[torch.float32] * scale
    err = (fast - ref64).abs()
    base = float((ref_lowp - ref64).abs().max()) if ref64.numel() else 0.0
    bound = 2.0 * base + floor
    worst = float(err.max()) if err.numel() else 0.0
    if worst > bound:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{name}: max |fast - ref64| = {worst:.3e} at {idx} (fast {float(fast[idx]):.9g}, "
            f"ref64 {float(ref64[idx]):.9g}) exceeds 2 * {base:.3e} + {floor:.1e} = {bound:.3e}")


def value_and_grads(fn, a, b, dtype, **kw):
    """(fn(a, b), d fn/da, d fn/db) with a and b cast to dtype."""
    aa, bb = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    v = fn(aa, bb, **kw)
    return (v, *torch.autograd.grad(v, [aa, bb]))


def check_energy_distance(a, b, backend: str):
    """energy_distance's value and both gradients on ``backend`` (float32) against the float64
    brute-force reference, with the float32 reference setting the tolerance."""
    from ncf_fast import energy, reference
    fast = value_and_grads(energy.energy_distance, a, b, torch.float32, backend=backend)
    ref64 = value_and_grads(reference.energy_distance, a, b, torch.float64)
    lowp = value_and_grads(reference.energy_distance, a, b, torch.float32)
    for k, what in enumerate(("value", "grad_a", "grad_b")):
        assert_close_to_ref(fast[k], ref64[k], lowp[k], f"{backend} {what}")
