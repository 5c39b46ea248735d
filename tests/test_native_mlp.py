"""The torch backend's compiled elementwise passes (ncf_fast/cpu_mlp.c via ncf_fast.native).

Each pass against its definition evaluated in float64 (and, for the tolerance, in fp32 torch
ops), on awkward shapes and extreme pre-activations; the whole torch backend with and without
them against the float64 reference; the fallback when the library is disabled.
"""
import shutil

import pytest
import torch

from ncf_fast import costs, native, reference, torch_backend
from ncf_fast.activations import activation_derivatives
from tolerance import assert_close_to_ref

HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch ops run instead")
ACTS = ("softplus", "tanh", "silu")
SHAPES = [(1, 1), (1, 130), (37, 3), (300, 17), (70, 128)]


@needs_kernel
def test_compiles_where_a_c_compiler_exists():
    assert native.mlp_usable(torch.zeros(1, 1))
    assert not native.mlp_usable(torch.zeros(1, 1, dtype=torch.float64))
    # tanh runs the torch ops (ncf_fast/native.py: COMPILED_ACTIVATIONS)
    assert native.mlp_usable(torch.zeros(1, 1), "silu") and not native.mlp_usable(torch.zeros(1, 1), "tanh")


def _preacts(rows, w, seed):
    """Pre-activations over the regimes that matter: moderate, saturated (+-30, +-100, where
    exp(-|a|) underflows to 0 or is subnormal) and tiny (log1p's small-argument branch)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, w, generator=g, dtype=torch.float64) * 3
    extremes = torch.tensor([-100.0, -30.0, -1e-8, 0.0, 1e-8, 30.0, 100.0], dtype=torch.float64)
    flat = a.view(-1)
    flat[: min(flat.numel(), extremes.numel())] = extremes[: flat.numel()]
    return a


@needs_kernel
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows,w", SHAPES)
def test_activation_pass_matches_float64(act, rows, w):
    a64 = _preacts(rows, w, seed=rows + w)
    bias64 = torch.randn(w, dtype=torch.float64)
    a32, bias32 = a64.float(), bias64.float()
    z, d1, pre = native.act_forward(act, a32.clone(), bias32)
    z64, d64, _ = activation_derivatives(act, (a32.double() + bias32.double()), order=1)
    zl, dl, _ = activation_derivatives(act, a32 + bias32, order=1)
    assert_close_to_ref(z, z64, zl, f"{act} z")
    assert_close_to_ref(d1, d64, dl, f"{act} s'")
    if act == "silu":
        assert_close_to_ref(pre, a32.double() + bias32.double(), a32 + bias32, "pre")
    else:
        assert pre is None


@needs_kernel
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows,w", SHAPES)
@pytest.mark.parametrize("shared_row", [False, True])
def test_input_adjoint_pass_matches_float64(act, rows, w, shared_row):
    """delta = g s'(a) and curv = g s''(a), g a full (rows, w) matrix or one (1, w) row."""
    a = (_preacts(rows, w, seed=7 * rows + w)).float()
    g = torch.randn(1 if shared_row else rows, w)
    y, d1, _ = activation_derivatives(act, a, order=1)
    aux = y if act == "tanh" else a
    delta, curv = native.delta_curv(act, g, d1.clone(), aux, with_curv=True)
    only_delta, none = native.delta_curv(act, g, d1.clone(), aux, with_curv=False)
    s64 = activation_derivatives(act, a.double(), order=2)
    s32 = activation_derivatives(act, a, order=2)
    assert_close_to_ref(delta, g.double() * s64[1], g * s32[1], "delta")
    assert_close_to_ref(curv, g.double() * s64[2], g * s32[2], "curv")
    assert none is None and torch.equal(only_delta, delta)
    with pytest.raises(ValueError, match="shape"):
        native.delta_curv(act, torch.zeros(2, w + 1), d1, aux, with_curv=True)


@needs_kernel
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows,w", SHAPES)
def test_tangent_pass_matches_float64(act, rows, w):
    """zdot = s'(a) adot and adot <- g s''(a) adot, with g s'' stored (silu) or formed from
    delta = g s'(a) (softplus, tanh)."""
    a = _preacts(rows, w, seed=3 * rows + w).float()
    g, adot = torch.randn(rows, w), torch.randn(rows, w)
    y, d1, d2 = activation_derivatives(act, a, order=2)
    delta, curv = g * d1, g * d2
    bend = adot.clone()
    zdot = native.tangent(act, d1, curv if act == "silu" else None, delta, y, bend)
    s64 = activation_derivatives(act, a.double(), order=2)
    assert_close_to_ref(zdot, s64[1] * adot.double(), d1 * adot, "zdot")
    assert_close_to_ref(bend, g.double() * s64[2] * adot.double(), curv * adot, "bend")
    if act == "silu":
        with pytest.raises(RuntimeError, match="tangent"):
            native.tangent(act, d1, None, delta, y, adot.clone())


@needs_kernel
@pytest.mark.parametrize("rows,w", SHAPES)
def test_adjoint_pass_matches_float64(rows, w):
    d1, zbar, bend = (torch.randn(rows, w) for _ in range(3))
    for with_bend in (False, True):
        bias_grad = torch.randn(w)
        start = bias_grad.clone()
        out = native.abar(bend.clone() if with_bend else None, zbar.clone(), d1, bias_grad)
        want = zbar.double() * d1.double() + (bend.double() if with_bend else 0.0)
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(bias_grad.double(), start.double() + want.sum(0),
                                   rtol=1e-6, atol=1e-5)


@needs_kernel
def test_nan_and_inf_stay_visible():
    """A diverged run must stay NaN, not be laundered into finite numbers."""
    a = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]])
    for act in ACTS:
        z, d1, _ = native.act_forward(act, a.clone(), torch.zeros(4))
        assert torch.isnan(z[0, 0]) and torch.isnan(d1[0, 0]), act
        ref_z, _, _ = activation_derivatives(act, a, order=1)
        assert torch.equal(torch.isfinite(z), torch.isfinite(ref_z)), act


def _make(d, widths, seed):
    g = torch.Generator().manual_seed(seed)
    fan = (d + 1,) + tuple(widths) + (1,)
    params = []
    for i, o in zip(fan[:-1], fan[1:]):
        params += [torch.randn(o, i, generator=g) * (1.5 / i ** 0.5), torch.randn(o, generator=g)]
    x = torch.randn(37, d, generator=g)
    t = torch.rand(37, 1, generator=g)
    return [p.requires_grad_() for p in params], x.requires_grad_(), t


@pytest.mark.parametrize("block_rows", [4096, 16])
@pytest.mark.parametrize("passes", ["compiled", "torch-ops"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d,widths", [(1, (3,)), (17, (130, 20, 9))])
def test_torch_backend_with_and_without_compiled_passes(passes, act, d, widths, block_rows,
                                                        monkeypatch):
    """u, p, r and every gradient of a random loss of them, fp32, against the float64
    reference, either way the elementwise steps run; 37 rows in one block, or in blocks of 16
    (two full, one partial: weight gradients accumulate across blocks)."""
    if passes == "compiled" and not HAS_CC:
        pytest.skip("no C compiler")
    if passes == "torch-ops":
        monkeypatch.setattr(native, "mlp_usable", lambda x, act=None: False)
    monkeypatch.setattr(torch_backend, "_BLOCK_ROWS", block_rows)
    params, x, t = _make(d, widths, seed=d)
    cost = costs.Power(1.5)
    g = torch.Generator().manual_seed(5)
    wu, wp, wr = torch.randn(37, generator=g), torch.randn(37, d, generator=g), torch.randn(37, generator=g)

    def run(params, x, upcast, fast):
        if fast:
            u, p = torch_backend.potential_and_grad(params, act, x, t)
            r = torch_backend.characteristic_residual(params, act, cost, x, t)
        else:
            u, p = reference.potential_and_grad(params, act, x, t, create_graph=True,
                                                upcast=upcast)
            r = reference.characteristic_residual(params, act, cost, x, t, upcast=upcast)
        loss = (u.double() * wu).sum() + (p.double() * wp).sum() + (r.double() * wr).sum()
        return (u, p, r) + torch.autograd.grad(loss, params + [x])

    fast = run(params, x, False, True)
    ref64 = run(params, x, True, False)
    ref32 = run(params, x, False, False)
    names = ["u", "p", "r"] + [f"grad{i}" for i in range(len(params))] + ["dx"]
    for name, f, r64, r32 in zip(names, fast, ref64, ref32):
        assert_close_to_ref(f, r64, r32, f"{passes} {name}")


def test_disabled_the_torch_ops_run(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native._mlp_library.cache_clear()
    try:
        assert not native.mlp_usable(torch.zeros(1, 1))
        params, x, t = _make(2, (8,), seed=1)
        with torch.no_grad():
            u, p = torch_backend.potential_and_grad(params, "softplus", x, t)
            u64, p64 = reference.potential_and_grad([q.double() for q in params], "softplus",
                                                    x.double(), t.double())
        torch.testing.assert_close(u.double(), u64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-5)
    finally:
        native._mlp_library.cache_clear()
