"""The characteristic residual: zero for the closed-form Gaussian potential, and right for a
random network against an independent float64 (numpy, hand-written backprop) computation."""
import numpy as np
import pytest
import torch

from ncf_fast import PotentialMLP, costs, losses, reference
from ncf_fast.problems import GaussianOT


@pytest.mark.parametrize("dim,means", [(1, False), (2, False), (5, True), (8, False)])
def test_closed_form_potential_has_zero_residual(dim, means):
    prob = GaussianOT(dim, seed=dim, means=means)
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(200, dim)) * 2.0)
    t = torch.rand(200, 1, dtype=torch.float64)
    xr = x.clone().requires_grad_()

    def u(z, tt):
        # the closed form in torch (autograd for p), same formula as GaussianOT.potential
        a = torch.as_tensor(prob.gamma) - torch.eye(dim, dtype=torch.float64)
        b = torch.as_tensor(prob.m1 - prob.gamma @ prob.m0)
        eye = torch.eye(dim, dtype=torch.float64)
        x0 = torch.linalg.solve(eye + tt[:, :, None] * a, (z - tt * b).unsqueeze(-1)).squeeze(-1)
        p = x0 @ a + b
        return 0.5 * ((x0 @ a) * x0).sum(1) + x0 @ b + 0.5 * tt[:, 0] * (p * p).sum(1)

    ut = u(xr, t)
    np.testing.assert_allclose(ut.detach().numpy(), prob.potential(x.numpy(), t[:, 0].numpy()),
                               rtol=1e-12, atol=1e-12)
    (p,) = torch.autograd.grad(ut.sum(), xr)
    x0 = x - t * p
    r = ut.detach() - 0.5 * t[:, 0] * (p * p).sum(1) - u(x0, torch.zeros_like(t))
    assert float(r.abs().max()) <= 1e-10
    # and its maps are Gamma x and Gamma^-1 y
    (p0,) = torch.autograd.grad(u(xr, torch.zeros_like(t)).sum(), xr)
    np.testing.assert_allclose((x + p0).numpy(), prob.forward_map(x.numpy()), atol=1e-10)


def _numpy_value_and_grad(params, act, x, t):
    """An independent float64 implementation: forward sweep and hand-written backprop."""
    ws = [p.detach().double().numpy() for p in params[0::2]]
    bs = [p.detach().double().numpy() for p in params[1::2]]
    z = np.concatenate([x, t], axis=1)
    pre = []
    for w, b in zip(ws[:-1], bs[:-1]):
        a = z @ w.T + b
        pre.append(a)
        if act == "softplus":
            z = np.logaddexp(0.0, a)
        elif act == "tanh":
            z = np.tanh(a)
        else:
            z = a / (1.0 + np.exp(-a))
    u = (z @ ws[-1].T + bs[-1])[:, 0]
    g = np.broadcast_to(ws[-1], (x.shape[0], ws[-1].shape[1]))
    for w, a in zip(reversed(ws[:-1]), reversed(pre)):
        s = 1.0 / (1.0 + np.exp(-a))
        d1 = {"softplus": s, "tanh": 1 - np.tanh(a) ** 2, "silu": s * (1 + a * (1 - s))}[act]
        g = (g * d1) @ w
    return u, g[:, :x.shape[1]]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("act", ["softplus", "tanh", "silu"])
@pytest.mark.parametrize("cost", [costs.Quadratic(), costs.Power(1.5)], ids=repr)
def test_random_network_residual_matches_independent_float64(act, cost, backend):
    """Both float64 backends against a numpy forward sweep with hand-written backprop (the
    float32 backends against the reference: tests/test_mlp.py)."""
    torch.manual_seed(3)
    model = PotentialMLP(3, (20, 13), act, backend="reference").double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.6)
    x = np.random.default_rng(1).normal(size=(64, 3))
    t = np.random.default_rng(2).uniform(size=(64, 1))
    u, p = _numpy_value_and_grad(model.params, act, x, t)
    vel = cost.grad_h(torch.as_tensor(p)).numpy()
    lag = cost.lagrangian(torch.as_tensor(p)).numpy()
    u0, _ = _numpy_value_and_grad(model.params, act, x - t * vel, np.zeros_like(t))
    expected = u - t[:, 0] * lag - u0
    model.backend = backend
    r = losses.hj_residual(model, torch.as_tensor(x), torch.as_tensor(t), cost)
    np.testing.assert_allclose(r.detach().numpy(), expected, rtol=1e-10, atol=1e-12,
                               err_msg=f"backend {backend}")


def test_residual_rejects_time_outside_horizon():
    model = PotentialMLP(2, (8,))
    with pytest.raises(ValueError, match="t must lie in"):
        losses.hj_residual(model, torch.zeros(4, 2), 1.5, "quadratic", t_final=1.0)


def test_value_and_grad_shapes_and_time_forms():
    model = PotentialMLP(2, (8, 8)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    outs = [model.value_and_grad(x, t) for t in (0.3, torch.full((5,), 0.3, dtype=torch.float64),
                                                   torch.full((5, 1), 0.3, dtype=torch.float64))]
    for u, p in outs:
        assert u.shape == (5,) and p.shape == (5, 2) and not p.requires_grad
        torch.testing.assert_close(u, outs[0][0])
        torch.testing.assert_close(p, outs[0][1])
    with pytest.raises(ValueError, match="shape"):
        model.value_and_grad(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        model.value_and_grad(torch.zeros(5, 3), 0.0)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_create_graph_gives_parameter_gradients(backend):
    """grad_x u from value_and_grad(create_graph=True) is differentiable in the parameters
    and agrees between backends (the torch backend through its analytic backward)."""
    torch.manual_seed(0)
    ref = PotentialMLP(4, (16, 16), backend="reference").double()
    model = PotentialMLP(4, (16, 16), backend=backend).double()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(30, 4, dtype=torch.float64)
    w = torch.randn(30, 4, dtype=torch.float64)
    grads = []
    for m in (ref, model):
        u, p = m.value_and_grad(x, 0.5, create_graph=True)
        grads.append(torch.autograd.grad((p * w).sum() + u.square().sum(), list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reference_upcast_matches_float64_model():
    torch.manual_seed(0)
    m32 = PotentialMLP(3, (12,))
    m64 = PotentialMLP(3, (12,)).double()
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    x, t = torch.randn(9, 3), torch.rand(9, 1)
    r_up = reference.characteristic_residual(m32.params, "softplus", costs.Quadratic(), x, t, upcast=True)
    r64 = reference.characteristic_residual(m64.params, "softplus", costs.Quadratic(), x.double(), t.double())
    assert r_up.dtype == torch.float64
    torch.testing.assert_close(r_up, r64, rtol=1e-12, atol=1e-12)
