"""The fused MLP ops (potential, its input gradient, the characteristic residual) per backend
against the float64 reference: the torch backend ("torch", with and without its compiled
elementwise passes, ncf_fast/cpu_mlp.c via ncf_fast.native) and the Triton kernels ("triton").

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with CUDA and
TRITON_INTERPRET=0 (benchmarks/gpu_check.sh) the same tests run the compiled kernels, the
parity test on tests/gpu_cases.py's selection (activation x cost x width class, larger N).
Interpreted grids stay small (<= 300 rows, widths <= 80) so the interpreter finishes in a few
minutes on 2 cores. The compiled passes: each against its definition evaluated in float64 (and,
for the tolerance, in fp32 torch ops), on awkward shapes and extreme pre-activations, and the
fallback when the library is disabled.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from ncf_fast import costs, native, reference, torch_backend
from ncf_fast.activations import activation_derivatives
from gpu_cases import DETERMINISTIC_BITWISE, DETERMINISTIC_PARITY, GPU_CASES
from tolerance import DIMS, ROWS, WIDTHS, assert_close_to_ref
from tolerance import make_params as shared_make_params

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux-only dependency: the torch backend's tests still run
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(triton is None or (DEVICE == "cpu" and not INTERPRETED),
                                  reason="triton kernels need CUDA or TRITON_INTERPRET=1")
HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))
needs_kernel = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch ops run instead")

ACTS = ("softplus", "tanh", "silu")
COSTS = {"quadratic": costs.Quadratic(), "power1.5": costs.Power(1.5)}


def make_params(d, widths, seed, dtype=torch.float32):
    """tolerance.make_params on this file's device."""
    return shared_make_params(d, widths, seed, dtype, DEVICE)


def make_inputs(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    t = torch.rand(n, 1, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return x, t


def loss_weights(n, d, seed):
    g = torch.Generator().manual_seed(seed + 2)
    return (torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE),
            torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE),
            torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE))


def scalar_loss(u, p, r, weights):
    wu, wp, wr = weights
    return (u.double() * wu).sum() + (p.double() * wp).sum() + (r.double() * wr).sum()


def _kernels():
    from ncf_fast.kernels import characteristic_residual, potential_and_grad

    def residual(params, act, cost, x, t, **kwargs):  # the caller passes the kernel constants
        return characteristic_residual(params, act, costs.kernel_constants(cost), x, t, **kwargs)
    return potential_and_grad, residual


def _reference_outputs(params, act, cost, x, t, upcast):
    u, p = reference.potential_and_grad(params, act, x, t, create_graph=True, upcast=upcast)
    r = reference.characteristic_residual(params, act, cost, x, t, upcast=upcast)
    return u, p, r


def check_against_reference(impl, d, widths, act, cost, n, seed):
    """u, p, r and d(loss)/d(params, x) of ``impl`` (a (potential_and_grad, residual) pair)
    against the float64 reference, with the STYLE tolerance rule (fp32 reference as the bar)."""
    params = make_params(d, widths, seed)
    x, t = make_inputs(n, d, seed)
    weights = loss_weights(n, d, seed)
    pot, res = impl
    u, p = pot(params, act, x, t)
    r = res(params, act, cost, x, t)
    grads = torch.autograd.grad(scalar_loss(u, p, r, weights), params + [x])
    outs64 = _reference_outputs(params, act, cost, x, t, upcast=True)
    grads64 = torch.autograd.grad(scalar_loss(*outs64, weights), params + [x])
    outs32 = _reference_outputs(params, act, cost, x, t, upcast=False)
    grads32 = torch.autograd.grad(scalar_loss(*outs32, weights), params + [x])
    for name, fast, r64, r32 in zip(("u", "p", "r"), (u, p, r), outs64, outs32):
        assert_close_to_ref(fast, r64, r32, name)
    names = [f"d{'W' if i % 2 == 0 else 'b'}{i // 2 + 1}" for i in range(len(params))] + ["dx"]
    for name, fast, r64, r32 in zip(names, grads, grads64, grads32):
        assert_close_to_ref(fast, r64, r32, name)


# every d, every width set (depths 1 and 3, widths not powers of two), every N, every activation
# and both costs, rotated so that each appears with several of the others (not a full product)
CASES = []
for i, d in enumerate(DIMS):
    for j, widths in enumerate(WIDTHS):
        n = ROWS[(i + j) % len(ROWS)]
        if len(widths) > 1:  # depth 3 under the interpreter: 70 rows = a full and a partial block
            n = min(n, 70)
        act = ACTS[(i + 2 * j) % len(ACTS)]
        cost = tuple(COSTS)[(i + j) % 2]
        CASES.append((d, widths, act, cost, n))
# two row blocks plus a partial one, and hidden widths > one 32-column tile (H_PAD 96)
CASES.append((3, (80, 72), "softplus", "power1.5", 150))
if DEVICE == "cuda":  # compiled: activation x cost x width class once each (tests/gpu_cases.py)
    CASES = GPU_CASES

# one parity test: the Triton kernels on CASES, the torch backend on every activation and cost
IMPLS = {"triton": lambda: _kernels(),
         "torch": lambda: (torch_backend.potential_and_grad, torch_backend.characteristic_residual)}
PARITY = ([pytest.param("triton", *c, 10 * c[0] + c[4], marks=needs_triton,
                        id=f"triton-d{c[0]}-w{'x'.join(map(str, c[1]))}-{c[2]}-{c[3]}-n{c[4]}")
           for c in CASES]
          + [pytest.param("torch", 3, (40, 40, 40), act, cost, 37, 3, id=f"torch-{act}-{cost}")
             for cost in COSTS for act in ACTS])


@pytest.mark.parametrize("backend,d,widths,act,cost,n,seed", PARITY)
def test_matches_float64_reference(backend, d, widths, act, cost, n, seed):
    check_against_reference(IMPLS[backend](), d, widths, act, COSTS[cost], n, seed)


@needs_triton
def test_triton_gradient_of_time_and_partial_cotangents():
    """tbar through both ops, and a loss of u alone (pbar None) or of p alone (ubar None)."""
    pot, res = _kernels()
    params = make_params(2, (24, 24), 7)
    x, t = make_inputs(37, 2, 7)
    t = t.clone().requires_grad_()
    cost = costs.Power(1.5)
    for loss_of in (lambda u, p, r: u.sum(), lambda u, p, r: (p * p).sum(),
                    lambda u, p, r: (r * r).sum()):
        u, p = pot(params, "tanh", x, t)
        r = res(params, "tanh", cost, x, t)
        grads = torch.autograd.grad(loss_of(u, p, r).double(), params + [x, t], allow_unused=True)
        u64, p64, r64 = _reference_outputs(params, "tanh", cost, x, t, upcast=True)
        ref64 = torch.autograd.grad(loss_of(u64, p64, r64), params + [x, t], allow_unused=True)
        u32, p32, r32 = _reference_outputs(params, "tanh", cost, x, t, upcast=False)
        ref32 = torch.autograd.grad(loss_of(u32, p32, r32).double(), params + [x, t],
                                    allow_unused=True)
        for fast, r64_, r32_ in zip(grads, ref64, ref32):
            if r64_ is None:
                continue
            assert_close_to_ref(torch.zeros_like(r64_) if fast is None else fast, r64_, r32_,
                                "grad")


@needs_triton
def test_triton_expanded_time_and_noncontiguous_x():
    """t given as an expanded scalar (stride 0) and x as a transposed view (strides passed)."""
    pot, _ = _kernels()
    params = make_params(3, (24,), 5)
    x = torch.randn(3, 70, device=DEVICE).t()
    t = torch.tensor(0.5, device=DEVICE).expand(70, 1)
    u, p = pot(params, "silu", x, t)
    u64, p64 = reference.potential_and_grad(params, "silu", x, t.contiguous(), upcast=True)
    u32, p32 = reference.potential_and_grad(params, "silu", x, t.contiguous())
    assert_close_to_ref(u, u64, u32, "u")
    assert_close_to_ref(p, p64, p32, "p")


@needs_triton
def test_triton_refuses_what_it_does_not_support():
    pot, res = _kernels()
    params = make_params(2, (24,), 1)
    x, t = make_inputs(5, 2, 1)

    class Custom(costs.Quadratic):
        name = "custom_quadratic_for_test"

    from ncf_fast.kernels import characteristic_residual
    for call in (lambda: res(params, "softplus", Custom(), x, t),
                 lambda: characteristic_residual(params, "softplus", (7, 2.0), x, t),
                 lambda: pot([p.double() for p in params], "softplus", x.double(), t.double()),
                 lambda: pot(make_params(2, (600,), 1), "softplus", x, t),
                 lambda: pot(make_params(130, (16,), 1), "softplus",
                             *make_inputs(5, 130, 1))):
        with pytest.raises(ValueError, match="backend='torch'"):
            call()
    with pytest.raises(ValueError, match="activation"):
        pot(params, "relu", x, t)


def test_torch_backend_gradcheck_float64():
    """torch.autograd.gradcheck of the fused torch backend (its analytic backward) in float64."""
    params = make_params(2, (5, 4), 3, dtype=torch.float64)
    x, t = make_inputs(6, 2, 3, dtype=torch.float64)
    cost = costs.Power(1.5)

    def both(x, *params):
        u, p = torch_backend.potential_and_grad(list(params), "softplus", x, t)
        r = torch_backend.characteristic_residual(list(params), "softplus", cost, x, t)
        return u, p, r

    assert torch.autograd.gradcheck(both, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


if triton is not None:
    @triton.jit
    def _canary_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < N
        tl.store(y_ptr + rows, 2.0 * tl.load(x_ptr + rows, mask=mask, other=0.0) + 1.0,
                 mask=mask)


@needs_triton
def test_canary_kernel_runs():
    """Fails loudly when triton (interpreted or compiled) silently returns garbage or zeros."""
    x = torch.arange(37, dtype=torch.float32, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    _canary_kernel[(3,)](x, y, 37, BLOCK=16)
    torch.testing.assert_close(y, 2 * x + 1, rtol=0, atol=0)


@needs_triton
def test_triton_backend_trains_like_reference():
    """20 Adam steps with backend triton and torch follow the reference's loss curve."""
    import numpy as np

    from ncf_fast import NCF

    g = np.random.default_rng(0)
    source = g.normal(size=(256, 2)).astype(np.float32)
    target = (g.normal(size=(256, 2)) * [1.5, 0.7] + [0.5, -0.3]).astype(np.float32)
    curves = {}
    for backend in ("reference", "torch", "triton"):
        model = NCF(2, hidden=(24, 24), device=DEVICE, seed=0, backend=backend)
        model.fit(source, target, steps=20, batch_size=64, mmd_batch_size=32, mmd_active=8,
                  progress=False)
        curves[backend] = np.array(model.history["hj"]) + np.array(model.history["mmd"])
    ref = curves["reference"]
    assert len(ref) == 20 and np.all(np.isfinite(ref))
    for backend in ("torch", "triton"):
        # fp32 rounding differences compound through Adam; 20 steps stay within 1e-3 relative
        np.testing.assert_allclose(curves[backend], ref, rtol=1e-3, atol=1e-6,
                                   err_msg=f"{backend} loss curve drifts from the reference")


# ---------------------------------------------------------------------------------------------
# deterministic mode: per-program gradient copies reduced in a fixed order

def _deterministic_kernels():
    import functools
    pot, res = _kernels()
    return (functools.partial(pot, deterministic=True), functools.partial(res, deterministic=True))


@needs_triton
def test_triton_deterministic_mode_matches_float64_reference():
    """150 rows: three row blocks (one partial) over two launches of two programs under the
    interpreter, so two gradient copies, one of which sums two blocks; d = 17, widths 40/24.
    Compiled: a GPU case's shape (tests/gpu_cases.py) at 5000 rows."""
    d, widths, act, cost, n = ((17, (40, 24), "tanh", "power1.5", 150) if DEVICE == "cpu" else
                               DETERMINISTIC_PARITY[:4] + (5000,))
    check_against_reference(_deterministic_kernels(), d, widths, act, COSTS[cost], n, seed=11)


def _all_gradients(params, act, cost, x, t, weights, deterministic):
    pot, res = _kernels()
    u, p = pot(params, act, x, t, deterministic=deterministic)
    r = res(params, act, cost, x, t, deterministic=deterministic)
    return torch.autograd.grad(scalar_loss(u, p, r, weights), params + [x])


@needs_triton
def test_triton_deterministic_gradients_are_bitwise_equal_run_to_run():
    """Two runs give identical bits (on a GPU, where the default atomics need not: there the
    batch spans many programs per launch and several launches)."""
    d, widths, act, cost, n = ((3, (20, 20), "softplus", "quadratic", 150) if DEVICE == "cpu"
                               else DETERMINISTIC_BITWISE[:4] + (40_000,))
    params = make_params(d, widths, 21)
    x, t = make_inputs(n, d, 21)
    weights = loss_weights(n, d, 21)
    cost = COSTS[cost]
    first = _all_gradients(params, act, cost, x, t, weights, True)
    second = _all_gradients(params, act, cost, x, t, weights, True)
    for k, (g1, g2) in enumerate(zip(first, second)):
        assert torch.equal(g1, g2), f"gradient {k} differs between runs: " \
            f"max diff {float((g1 - g2).abs().max()):.3e}"
    # the default (atomic) mode agrees to rounding
    shared = _all_gradients(params, act, cost, x, t, weights, False)
    for g1, g2 in zip(first, shared):  # fp32 sums of n rows in another order
        assert float((g1 - g2).abs().max()) <= 1e-4 * max(float(g1.abs().max()), 1.0)


@needs_triton
def test_potential_mlp_passes_deterministic_to_the_kernels(monkeypatch):
    from ncf_fast import PotentialMLP, kernels
    seen = []
    real_pot, real_res = kernels.potential_and_grad, kernels.characteristic_residual
    monkeypatch.setattr(kernels, "potential_and_grad",
                        lambda *a, **k: seen.append(k) or real_pot(*a, **k))
    monkeypatch.setattr(kernels, "characteristic_residual",
                        lambda *a, **k: seen.append(k) or real_res(*a, **k))
    model = PotentialMLP(2, (16,), backend="triton", deterministic=True).to(DEVICE)
    x = torch.randn(9, 2, device=DEVICE)
    model.value_and_grad(x, 0.5)
    model.characteristic_residual(x, 0.5, costs.Quadratic())
    assert seen == [{"deterministic": True}] * 2


@needs_triton
def test_launches_run_in_the_tensors_device_context(monkeypatch):
    """Triton launches on the current CUDA device: every launcher enters x's device first
    (cuda:1 tensors on a machine whose current device is 0)."""
    from ncf_fast.kernels import energy_distance, mlp_launch, mlp_potential, mlp_residual

    class FakeCuda:
        device = torch.device("cuda", 1)

    guard = mlp_launch.device_guard(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    entered = []

    def recording_guard(x):
        entered.append(x.device)
        return mlp_launch.contextlib.nullcontext()

    for module in (mlp_potential, mlp_residual, energy_distance):
        monkeypatch.setattr(module, "device_guard", recording_guard)
    params = make_params(1, (16,), 4)  # a GPU case's configuration: warmed by gpu_check
    x, t = make_inputs(5, 1, 4)
    pot, res = _kernels()
    u, p = pot(params, "silu", x, t)
    r = res(params, "silu", costs.Quadratic(), x, t)
    (u.sum() + p.sum() + r.sum()).backward()
    energy_distance.pair_sums(x.detach(), x.detach() + 1, grad=True)
    assert len(entered) == 5 and set(entered) == {x.device}


# ---------------------------------------------------------------------------------------------
# the torch backend's compiled elementwise passes (ncf_fast/cpu_mlp.c via ncf_fast.native)

PASS_SHAPES = [(1, 1), (1, 130), (37, 3), (300, 17), (70, 128)]


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
@pytest.mark.parametrize("rows,w", PASS_SHAPES)
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
@pytest.mark.parametrize("rows,w", PASS_SHAPES)
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
@pytest.mark.parametrize("rows,w", PASS_SHAPES)
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
@pytest.mark.parametrize("rows,w", PASS_SHAPES)
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
    """tolerance.make_params on the CPU (biases of unit scale) and 37 rows of (x, t)."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(37, d, generator=g)
    t = torch.rand(37, 1, generator=g)
    return shared_make_params(d, widths, seed, bias_scale=1.0), x.requires_grad_(), t


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
