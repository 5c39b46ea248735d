"""The ``torch`` backend: NCF's fused algorithm with an analytic backward, in torch ops.

This is the fast path on CPU and the readable specification of what the Triton kernels do.

Network: z_0 = [x, t], a_l = W_l z_{l-1} + b_l, z_l = s(a_l) (l = 1..L), u = w . z_L + c.

Forward (one sweep up, one down): input gradient g_L = w, delta_l = g_l * s'(a_l),
g_{l-1} = W_l^T delta_l, p = grad_x u = g_0[:d]; the backward keeps z_{l-1}, s'(a_l), delta_l
and g_l s''(a_l) (one fused elementwise op for softplus: delta_l (1 - s'(a_l))).

Backward for cotangents (ubar, pbar) of (u, p): by the identity pbar . grad_x u = D u[(pbar, 0)],
the loss is Phi = sum_i ubar_i u_i + udot_i with the tangent sweep
adot_l = W_l zdot_{l-1}, zdot_l = s'(a_l) adot_l, zdot_0 = (pbar, 0), udot = w . zdot_L.
Reverse mode through the (primal, tangent) pair: the adjoint of zdot_l is g_l (already known from
the forward), so the adjoint of adot_l is delta_l, and
    abar_l = zbar_l s'(a_l) + g_l s''(a_l) adot_l,   zbar_{l-1} = W_l^T abar_l,
    dPhi/dW_l = abar_l z_{l-1}^T + delta_l zdot_{l-1}^T,  dPhi/db_l = abar_l,
    dPhi/dw = ubar z_L + zdot_L,  dPhi/dc = ubar,  dPhi/dx = zbar_0[:d].
No autograd.grad(create_graph=True) anywhere: training differentiates these closed forms.
"""
from __future__ import annotations

import torch

from .activations import activation_derivatives, times_second_derivative

__all__ = ["PotentialAndGrad", "potential", "potential_and_grad", "characteristic_residual"]


def _sweep(params, act, x, t, with_grad: bool, save: bool):
    """Forward sweep (and the input-gradient sweep if with_grad).

    Returns u, p (or None) and what the backward needs (when save): the layer inputs z_{l-1}
    (and z_L), s'(a_l), and with the gradient delta_l = g_l s'(a_l) and g_l s''(a_l), where g_l
    is the adjoint of z_l for u. Without save, nothing is kept: maps need only the two sweeps.
    """
    n_hidden = len(params) // 2 - 1
    z = torch.cat((x, t), dim=1)
    zs, d1s, pre = [z], [], []
    for k in range(n_hidden):
        a = torch.addmm(params[2 * k + 1], z, params[2 * k].t())
        z, d1, _ = activation_derivatives(act, a, order=1)
        zs.append(z)
        d1s.append(d1)
        pre.append(a if act == "silu" else None)  # only silu's s'' needs a itself
    w_out, b_out = params[-2], params[-1]
    u = torch.addmm(b_out, z, w_out.t()).squeeze(1)
    if not with_grad:
        return u, None, (zs, d1s, [], [])
    g = w_out.expand(z.shape[0], -1)
    deltas, curvs = [None] * n_hidden, [None] * n_hidden
    for k in reversed(range(n_hidden)):
        delta = g * d1s[k]
        if save:
            deltas[k] = delta
            curvs[k] = times_second_derivative(act, pre[k], zs[k + 1], d1s[k], g, delta)
        g = delta @ params[2 * k]
    return u, g[:, :x.shape[1]], (zs, d1s, deltas if save else [], curvs if save else [])


# Rows per block: bounds the saved activations' working set. Measured on 2 CPU cores (d = 16,
# 3 x 128, N = 4096, hj_residual forward + backward, interleaved medians): 4096 rows beat 2048
# and 1024 (larger GEMMs outweigh the elementwise passes' better cache reuse).
_BLOCK_ROWS = 4096


def _blocks(n: int):
    return [slice(s, min(n, s + _BLOCK_ROWS)) for s in range(0, max(n, 1), _BLOCK_ROWS)]


class PotentialAndGrad(torch.autograd.Function):
    """(x (N, d), t (N, 1), params...) -> u (N,) and, if with_grad, grad_x u (N, d).

    Analytic backward: first order for ubar alone, (primal, tangent) reverse mode when pbar is
    given. Rows are processed in blocks of _BLOCK_ROWS; weight gradients accumulate over blocks.
    """

    @staticmethod
    def forward(ctx, act: str, with_grad: bool, x: torch.Tensor, t: torch.Tensor, *params):
        n = x.shape[0]
        us, ps, saved, per_block = [], [], [], None
        for rows in _blocks(n):
            u, p, (zs, d1s, deltas, curvs) = _sweep(params, act, x[rows], t[rows], with_grad,
                                                    save=True)
            us.append(u)
            ps.append(p)
            block = zs + d1s + deltas + curvs
            per_block = len(block)
            saved.extend(block)
        ctx.act, ctx.n_hidden, ctx.with_grad, ctx.n = act, len(params) // 2 - 1, with_grad, n
        ctx.per_block = per_block
        ctx.save_for_backward(*saved, *params)
        ctx.set_materialize_grads(False)
        u = torch.cat(us) if len(us) > 1 else us[0]
        if not with_grad:
            return u
        return u, (torch.cat(ps) if len(ps) > 1 else ps[0])

    @staticmethod
    def backward(ctx, ubar, pbar=None):
        L, n = ctx.n_hidden, ctx.n
        saved = ctx.saved_tensors
        n_params = 2 * (L + 1)
        params = saved[len(saved) - n_params:]
        need_x, need_t = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if ubar is None and pbar is None:
            return (None, None, None, None) + (None,) * n_params
        grads = [torch.zeros_like(p) for p in params]
        xbar = torch.empty(n, params[0].shape[1] - 1, dtype=params[0].dtype,
                           device=params[0].device) if need_x else None
        tbar = torch.empty(n, 1, dtype=params[0].dtype, device=params[0].device) if need_t else None
        for b, rows in enumerate(_blocks(n)):
            block = saved[b * ctx.per_block:(b + 1) * ctx.per_block]
            zb = _backward_block(params, block, L, ctx.with_grad,
                                 None if ubar is None else ubar[rows],
                                 None if pbar is None else pbar[rows], grads,
                                 need_input=need_x or need_t)
            if need_x:
                xbar[rows] = zb[:, :-1]
            if need_t:
                tbar[rows] = zb[:, -1:]
        return (None, None, xbar, tbar, *grads)


def _backward_block(params, block, L, with_grad, ubar, pbar, grads, need_input):
    """Accumulate one row block's parameter gradients into ``grads``; return zbar_0 (or None)."""
    zs, d1s = block[:L + 1], block[L + 1:2 * L + 1]
    if with_grad:
        deltas, curvs = block[2 * L + 1:3 * L + 1], block[3 * L + 1:4 * L + 1]
    n = zs[0].shape[0]
    # tangent sweep: zdot_l with zdot_0 = (pbar, 0), and the curvature part of abar_l,
    # g_l s''(a_l) adot_l, formed in place on adot_l
    zdots, bends = [], []
    if pbar is not None:
        zdot = torch.cat((pbar, pbar.new_zeros(n, 1)), dim=1)
        zdots.append(zdot)
        for k in range(L):
            adot = zdot @ params[2 * k].t()
            zdot = d1s[k] * adot
            zdots.append(zdot)
            bends.append(adot.mul_(curvs[k]))

    w_out = params[-2]
    zbar = None
    if ubar is not None:
        zbar = ubar.unsqueeze(1) * w_out
        grads[-2].addmm_(ubar.unsqueeze(0), zs[L])
        grads[-1] += ubar.sum()
    if pbar is not None:
        grads[-2] += zdots[L].sum(0)

    for k in reversed(range(L)):
        if pbar is None:
            abar = zbar.mul_(d1s[k])  # zbar is a fresh product: reuse its memory
        else:
            abar = bends[k] if zbar is None else bends[k].addcmul_(zbar, d1s[k])
            grads[2 * k].addmm_(deltas[k].t(), zdots[k])
        grads[2 * k].addmm_(abar.t(), zs[k])
        grads[2 * k + 1] += abar.sum(0)
        if k > 0 or need_input:
            zbar = abar @ params[2 * k]
    return zbar if need_input else None


def potential(params, act, x, t):
    """u(x, t): x (N, d), t (N, 1) -> (N,); first-order analytic backward."""
    return PotentialAndGrad.apply(act, False, x, t, *params)


def potential_and_grad(params, act, x, t):
    """(u, grad_x u): x (N, d), t (N, 1) -> (N,), (N, d); differentiable in params and x.

    With autograd off (maps, passive samples) only the two sweeps run: no sigma'', nothing saved.
    """
    if torch.is_grad_enabled():
        return PotentialAndGrad.apply(act, True, x, t, *params)
    outs = [_sweep(params, act, x[rows], t[rows], True, save=False)[:2]
            for rows in _blocks(x.shape[0])]
    if len(outs) == 1:
        return outs[0]
    return torch.cat([u for u, _ in outs]), torch.cat([p for _, p in outs])


def characteristic_residual(params, act, cost, x, t):
    """r(x, t) (see :func:`ncf_fast.reference.characteristic_residual`): one sweep with the input
    gradient at (x, t), one value-only sweep at (x0, 0)."""
    u, p = potential_and_grad(params, act, x, t)
    x0 = x - t * cost.grad_h(p)
    u0 = potential(params, act, x0, torch.zeros_like(t))
    return u - t.squeeze(1) * cost.lagrangian(p) - u0
