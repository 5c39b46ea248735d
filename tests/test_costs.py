"""Costs: grad h is the gradient of h, the Hessian-vector product is right, Legendre duality holds."""
import math

import pytest
import torch

from ncf_fast import costs

COSTS = [costs.Quadratic(), costs.Power(1.5), costs.Power(1.2), costs.Power(2.0)]


@pytest.mark.parametrize("cost", COSTS, ids=repr)
def test_grad_h_is_autograd_of_h(cost):
    p = torch.randn(50, 3, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(cost.h(p).sum(), p)
    torch.testing.assert_close(cost.grad_h(p), auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cost", COSTS, ids=repr)
def test_hessian_vector_product_is_autograd(cost):
    p = torch.randn(40, 4, dtype=torch.float64)
    v = torch.randn(40, 4, dtype=torch.float64)
    auto = torch.func.jvp(cost.grad_h, (p,), (v,))[1]
    torch.testing.assert_close(cost.hess_h_vec(p, v), auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cost", COSTS, ids=repr)
def test_legendre_duality(cost):
    """l(v) = sup_p p.v - h(p): equality at p with grad h(p) = v, inequality elsewhere."""
    p = torch.randn(200, 3, dtype=torch.float64)
    v = cost.grad_h(p)
    torch.testing.assert_close(cost.ell(v) + cost.h(p), (p * v).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cost.lagrangian(p), cost.ell(v), rtol=1e-12, atol=1e-12)
    q = torch.randn(200, 3, dtype=torch.float64)  # Fenchel-Young: p.v <= h(p) + l(v) for any pair
    assert bool(((q * v).sum(-1) <= cost.h(q) + cost.ell(v) + 1e-12).all())
    # numerical sup over p by gradient ascent reaches l(v)
    w = torch.randn(5, 3, dtype=torch.float64)
    pp = torch.zeros_like(w, requires_grad=True)
    opt = torch.optim.LBFGS([pp], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -((pp * w).sum(-1) - cost.h(pp)).sum()
        loss.backward()
        return loss
    opt.step(closure)
    sup = ((pp * w).sum(-1) - cost.h(pp)).detach()
    torch.testing.assert_close(sup, cost.ell(w), rtol=1e-7, atol=1e-9)


def test_power_is_finite_at_zero():
    cost = costs.Power(1.5)
    p = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    out = cost.h(p).sum() + cost.lagrangian(p).sum() + cost.grad_h(p).sum()
    (g,) = torch.autograd.grad(out, p)
    assert torch.isfinite(g).all()
    assert torch.equal(cost.hess_h_vec(p.detach(), torch.ones(3, 2, dtype=torch.float64)),
                       torch.zeros(3, 2, dtype=torch.float64))


def test_get_parses_specs():
    assert isinstance(costs.get("quadratic"), costs.Quadratic)
    c = costs.get("power:1.5")
    assert isinstance(c, costs.Power) and c.q == 1.5 and math.isclose(c.q_star, 3.0)
    assert costs.get(c) is c
    assert costs.get(c.spec) == c


@pytest.mark.parametrize("spec,match", [("power:3", "1 < q <= 2"), ("power:1", "1 < q <= 2"),
                                        ("power", "power:q"), ("cubic", "unknown cost"),
                                        ("power:abc", "power:q")])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        costs.get(spec)


def test_user_cost_by_subclassing():
    class Scaled(costs.Cost):
        """l(v) = |v|^2 (a quadratic with another constant), h(p) = |p|^2 / 4."""
        name = "scaled_quadratic_test"
        degree = 2.0

        def h(self, p):
            return 0.25 * (p * p).sum(-1)

        def grad_h(self, p):
            return 0.5 * p

        def ell(self, v):
            return (v * v).sum(-1)

    c = costs.get("scaled_quadratic_test")
    p = torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(c.hess_h_vec(p, torch.ones_like(p)), 0.5 * torch.ones_like(p))
    torch.testing.assert_close(c.lagrangian(p), c.ell(c.grad_h(p)))
