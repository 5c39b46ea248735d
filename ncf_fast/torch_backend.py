"""The ``torch`` backend: NCF's fused algorithm with an analytic backward, in torch ops.

This is the fast path on CPU and the readable specification of what the Triton kernels do. On
fp32 CPU tensors its elementwise steps run as compiled loops (ncf_fast/native.py, cpu_mlp.c);
the torch ops below specify them and run everywhere else.

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

from . import native
from .activations import activation_derivatives, times_second_derivative

__all__ = ["TorchPotentialAndGrad", "potential", "potential_and_grad", "characteristic_residual"]


def _sweep(params, act, x, t, with_grad: bool, save: bool, fast: bool):
    """Forward sweep (and the input-gradient sweep if with_grad).

    Returns u, p (or None) and what the backward needs (when save): the layer inputs z_{l-1}
    (and z_L), s'(a_l), and with the gradient delta_l = g_l s'(a_l) and g_l s''(a_l), where g_l
    is the adjoint of z_l for u. Without save, nothing is kept: maps need only the two sweeps.
    fast: the elementwise steps run compiled (then g_l s''(a_l) is saved for silu only).
    """
    n_hidden = len(params) // 2 - 1
    z = torch.cat((x, t), dim=1)
    zs, d1s, pre = [z], [], []
    for k in range(n_hidden):
        z, d1, a = _layer(fast, act, z, params[2 * k], params[2 * k + 1])
        zs.append(z)
        d1s.append(d1)
        pre.append(a)
    w_out, b_out = params[-2], params[-1]
    u = torch.addmm(b_out, z, w_out.t()).squeeze(1)
    if not with_grad:
        return u, None, (zs, d1s, [], [])
    g = w_out  # (1, w): the adjoint of z_L, the same for every row
    deltas, curvs = [None] * n_hidden, [None] * n_hidden
    for k in reversed(range(n_hidden)):
        # the compiled tangent pass forms softplus's and tanh's g s'' from delta itself
        delta, curv = _input_adjoint(fast, act, g, d1s[k], pre[k], zs[k + 1],
                                     save and (act == "silu" or not fast))
        if save:
            deltas[k], curvs[k] = delta, curv
        g = delta @ params[2 * k]
    return u, g[:, :x.shape[1]], (zs, d1s, deltas if save else [], curvs if save else [])


# The elementwise steps of the sweeps, each either one compiled pass (fast: fp32 on the CPU, see
# ncf_fast/native.py and cpu_mlp.c) or the torch ops that specify it. Measured on 2 cores
# (benchmarks/interleaved.py: d = 16, 3 x 128, N = 4096, hj_residual forward + backward):
# softplus 36.4 -> 28.5 ms (torch's softplus alone is ~1.9 ms a layer), silu 42.3 -> 27.8 ms,
# tanh 45.9 -> 33.5 ms; the GEMMs and the rest take ~22.7 ms.

def _layer(fast, act, z, weight, bias):
    """(z_l, s'(a_l), a_l or None) for a_l = W_l z + b_l: a_l is kept for silu, whose s'' needs
    it (softplus's and tanh's follow from s' and z_l)."""
    if fast:
        return native.act_forward(act, z @ weight.t(), bias)
    a = torch.addmm(bias, z, weight.t())
    z, d1, _ = activation_derivatives(act, a, order=1)
    return z, d1, (a if act == "silu" else None)


def _input_adjoint(fast, act, g, d1, a, y, with_curv):
    """(delta_l, g_l s''(a_l) or None) = (g_l s'(a_l), ...); y = z_l = s(a_l)."""
    if fast:
        return native.delta_curv(act, g, d1, y if act == "tanh" else a, with_curv)
    delta = g * d1
    return delta, (times_second_derivative(act, a, y, d1, g, delta) if with_curv else None)


def _tangent(fast, act, d1, curv, delta, y, adot):
    """zdot_l = s'(a_l) adot_l, returned; adot_l becomes g_l s''(a_l) adot_l in place (the
    compiled pass forms g_l s''(a_l) from delta_l and y = z_l unless curv holds it)."""
    if fast:
        return native.tangent(act, d1, curv, delta, y, adot)
    zdot = d1 * adot
    adot.mul_(curv)
    return zdot


def _adjoint(fast, bend, zbar, d1, bias_grad):
    """abar_l = [bend +] zbar_l s'(a_l) (in the memory of bend, else of zbar); adds its column
    sums, dPhi/db_l, to bias_grad."""
    if zbar is None:
        abar = bend
    elif fast:
        return native.abar(bend, zbar, d1, bias_grad)
    else:
        abar = zbar.mul_(d1) if bend is None else bend.addcmul_(zbar, d1)
    bias_grad += abar.sum(0)
    return abar


# Rows per block: bounds the saved activations' working set. Measured on 2 CPU cores (d = 16,
# 3 x 128, N = 4096, hj_residual forward + backward, interleaved medians): 4096 rows beat 2048
# and 1024 (larger GEMMs outweigh the elementwise passes' better cache reuse).
_BLOCK_ROWS = 4096


def _blocks(n: int):
    return [slice(s, min(n, s + _BLOCK_ROWS)) for s in range(0, max(n, 1), _BLOCK_ROWS)]


class TorchPotentialAndGrad(torch.autograd.Function):
    """(x (N, d), t (N, 1), params...) -> u (N,) and, if with_grad, grad_x u (N, d).

    Analytic backward: first order for ubar alone, (primal, tangent) reverse mode when pbar is
    given. Rows are processed in blocks of _BLOCK_ROWS; weight gradients accumulate over blocks.
    """

    @staticmethod
    def forward(ctx, act: str, with_grad: bool, x: torch.Tensor, t: torch.Tensor, *params):
        n, fast = x.shape[0], native.mlp_usable(x, act)
        us, ps, saved, per_block = [], [], [], None
        for rows in _blocks(n):
            u, p, (zs, d1s, deltas, curvs) = _sweep(params, act, x[rows], t[rows], with_grad,
                                                    save=True, fast=fast)
            us.append(u)
            ps.append(p)
            block = zs + d1s + deltas + curvs
            per_block = len(block)
            saved.extend(block)
        ctx.act, ctx.n_hidden, ctx.with_grad, ctx.n = act, len(params) // 2 - 1, with_grad, n
        ctx.per_block, ctx.fast = per_block, fast
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
            zb = _backward_block(params, ctx.act, ctx.fast, block, L, ctx.with_grad,
                                 None if ubar is None else ubar[rows],
                                 None if pbar is None else pbar[rows], grads,
                                 need_input=need_x or need_t)
            if need_x:
                xbar[rows] = zb[:, :-1]
            if need_t:
                tbar[rows] = zb[:, -1:]
        return (None, None, xbar, tbar, *grads)


def _backward_block(params, act, fast, block, L, with_grad, ubar, pbar, grads, need_input):
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
            zdot = _tangent(fast, act, d1s[k], curvs[k], deltas[k], zs[k + 1], adot)
            zdots.append(zdot)
            bends.append(adot)

    w_out = params[-2]
    zbar = None
    if ubar is not None:
        zbar = ubar.unsqueeze(1) * w_out
        grads[-2].addmm_(ubar.unsqueeze(0), zs[L])
        grads[-1] += ubar.sum()
    if pbar is not None:
        grads[-2] += zdots[L].sum(0)

    for k in reversed(range(L)):
        abar = _adjoint(fast, bends[k] if pbar is not None else None, zbar, d1s[k],
                        grads[2 * k + 1])
        if pbar is not None:
            grads[2 * k].addmm_(deltas[k].t(), zdots[k])
        grads[2 * k].addmm_(abar.t(), zs[k])
        if k > 0 or need_input:
            zbar = abar @ params[2 * k]
    return zbar if need_input else None


def potential(params, act, x, t):
    """u(x, t): x (N, d), t (N, 1) -> (N,); first-order analytic backward."""
    return TorchPotentialAndGrad.apply(act, False, x, t, *params)


def potential_and_grad(params, act, x, t):
    """(u, grad_x u): x (N, d), t (N, 1) -> (N,), (N, d); differentiable in params and x.

    With autograd off (maps, passive samples) only the two sweeps run: no sigma'', nothing saved.
    """
    if torch.is_grad_enabled():
        return TorchPotentialAndGrad.apply(act, True, x, t, *params)
    fast = native.mlp_usable(x, act)
    outs = [_sweep(params, act, x[rows], t[rows], True, save=False, fast=fast)[:2]
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
