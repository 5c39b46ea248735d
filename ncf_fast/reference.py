"""Reference implementation: NCF's quantities from plain torch ops and autograd.

This is the correctness baseline that every fast path (the ``torch`` fused backend, the Triton
kernels) is tested against, and the ``reference`` backend users can select. ``upcast=True``
evaluates in float64 (tests compare fast paths with ``upcast=True`` results); gradients still
flow back to the original parameters.

Parameters are passed as the flat sequence (W_1, b_1, ..., W_{L+1}, b_{L+1}) of
:class:`ncf_fast.PotentialMLP`'s ``nn.Linear`` layers (hidden layers first, the 1-unit output
layer last); the network evaluates u(x, t) = W_{L+1} s(... s(W_1 [x, t] + b_1) ...) + b_{L+1}.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .activations import activation

__all__ = ["potential", "potential_and_grad", "characteristic_residual", "energy_distance",
           "pairwise_distance"]


def _cast(tensors, upcast):
    return [p.double() for p in tensors] if upcast else list(tensors)


def potential(params: Sequence[torch.Tensor], act: str, x: torch.Tensor, t: torch.Tensor,
              upcast: bool = False) -> torch.Tensor:
    """u(x, t): x (N, d), t (N, 1) -> (N,)."""
    params = _cast(params, upcast)
    z = torch.cat(_cast((x, t), upcast), dim=1)
    n_layers = len(params) // 2
    for k in range(n_layers):
        z = torch.nn.functional.linear(z, params[2 * k], params[2 * k + 1])
        if k < n_layers - 1:
            z = activation(act, z)
    return z.squeeze(1)


def potential_and_grad(params, act, x, t, create_graph=True, upcast=False):
    """(u, grad_x u) by autograd: x (N, d), t (N, 1) -> (N,), (N, d).

    With ``create_graph`` the gradient is itself differentiable (second backward through
    autograd's graph): that double backward is the cost the fused paths avoid.
    """
    with torch.enable_grad():
        xg = x.double() if upcast else x
        if not xg.requires_grad:
            xg = xg.detach().requires_grad_()
        u = potential(params, act, xg, t, upcast=upcast)
        (p,) = torch.autograd.grad(u.sum(), xg, create_graph=create_graph)
    if not create_graph:
        u, p = u.detach(), p.detach()
    return u, p


def characteristic_residual(params, act, cost, x, t, upcast=False):
    """r(x, t) = u(x, t) - t (p . grad h(p) - h(p)) - u(x - t grad h(p), 0), p = grad_x u(x, t).

    x (N, d), t (N, 1) -> r (N,). Differentiable in the parameters (and x).
    """
    u, p = potential_and_grad(params, act, x, t, create_graph=True, upcast=upcast)
    t = t.double() if upcast else t
    x = x.double() if upcast else x
    x0 = x - t * cost.grad_h(p)
    u0 = potential(params, act, x0, torch.zeros_like(t), upcast=upcast)
    return u - t.squeeze(1) * cost.lagrangian(p) - u0


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j| from explicit differences, (N, d), (M, d) -> (N, M); gradient 0 where a_i = b_j.

    O(N M d) memory: the brute-force baseline, not for large sets.
    """
    diff = a.unsqueeze(1) - b.unsqueeze(0)
    d2 = (diff * diff).sum(-1)
    nz = d2 > 0
    return torch.where(nz, torch.where(nz, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))


def energy_distance(a: torch.Tensor, b: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """Unbiased (U-statistic) squared energy distance between samples a (N, d) and b (M, d).

    2/(NM) sum_ij |a_i - b_j| - 1/(N(N-1)) sum_{i!=i'} |a_i - a_i'| - 1/(M(M-1)) sum_{j!=j'} |b_j - b_j'|;
    a within-set term with a single sample (no pairs) is 0.
    """
    if upcast:
        a, b = a.double(), b.double()
    n, m = a.shape[0], b.shape[0]
    cross = pairwise_distance(a, b).sum() * (2.0 / (n * m))
    within_a = pairwise_distance(a, a).sum() / (n * (n - 1)) if n > 1 else a.new_zeros(())
    within_b = pairwise_distance(b, b).sum() / (m * (m - 1)) if m > 1 else b.new_zeros(())
    return cross - within_a - within_b
