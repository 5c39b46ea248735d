"""Fused characteristic residual: r(x, t) of PotentialMLP in one launch, analytic backward in one.

Math (Park et al. Eq. 13; ncf_fast.reference.characteristic_residual):
    p  = grad_x u(x, t),   x0 = x - t grad h(p),   p0 = grad_x u(x0, 0)
    r  = u(x, t) - t (p . grad h(p) - h(p)) - u(x0, 0)
    quadratic: grad h(p) = p, L(p) = |p|^2/2;  power: grad h(p) = |p|^(q*-2) p, L(p) = |p|^q*/q,
    grad^2 h(p) v = |p|^(q*-2) (v + (q*-2)(p^.v) p^).
Backward for rbar (N,): with dr/dp = t grad^2 h(p)(p0 - p),
    d/dtheta = rbar D_theta u(x, t) + pbar . D_theta grad_x u(x, t) - rbar D_theta u(x0, 0),
    pbar = rbar t grad^2 h(p)(p0 - p),
    xbar = zbar(x, t)[:d] - rbar p0,   tbar = zbar(x, t)[d] + rbar (p0 . grad h(p) - L(p)),
where zbar(x, t) is the second-order down sweep's input adjoint for (ubar, pbar) = (rbar, pbar).
The point (x0, 0) needs only a first-order sweep, whose input adjoint is -rbar p0: p0 costs
nothing extra there.

Shapes: x (N, d), t (N, 1) (any strides), params as in mlp_potential, fp32 -> r (N,).

Fusion plan:
    forward   one launch per 64-row block: up + input-gradient sweep at (x, t), h, grad h and x0
              in registers, up sweep at (x0, 0); writes only r. Saved: x, t, packed parameters.
    backward  one launch: recomputes the forward (keeping a_k, g_k at (x, t) in the workspace),
              first-order down sweep at (x0, 0) with ubar = -rbar (weight gradients + p0), the
              tangent sweep from pbar, the second-order down sweep at (x, t); fp32 atomics
              reduce the parameter gradients across programs. Nothing (N, width) is stored.
COST (constexpr) is 0 for Quadratic, 1 for Power (runtime q*); other costs are refused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .mlp_sweeps import (POWER, QUADRATIC, _fallback, dot_precision, down_sweep, launch_config,
                         load_input, mlp_layout, pack_params, tangent_sweep, unpack_grads,
                         up_sweep, zeros_like_packed)

__all__ = ["CharacteristicResidual", "characteristic_residual", "cost_code"]


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _norm_pow(n2, e):
    """|p|^e from n2 = |p|^2 with e >= 0: 0 at p = 0 unless e == 0 (then 1)."""
    nz = n2 > 0
    safe = tl.where(nz, n2, 1.0)
    return tl.where(nz, tl.exp(0.5 * e * tl.log(safe)), tl.where(e == 0.0, 1.0, 0.0))


@triton.jit
def _hamiltonian_terms(p, q_star, COST: tl.constexpr):
    """(grad h(p) (BLOCK_M, D_PAD), L(p) = p . grad h - h (BLOCK_M,), |p|^(q*-2), 1/|p|^2)."""
    n2 = tl.sum(p * p, axis=1)
    if COST == 0:
        scale = tl.full(n2.shape, 1.0, dtype=tl.float32)
        lag = 0.5 * n2
    else:
        scale = _norm_pow(n2, q_star - 2.0)
        lag = _norm_pow(n2, q_star) / (q_star / (q_star - 1.0))  # |p|^q* / q
    inv_n2 = tl.where(n2 > 0, 1.0 / tl.where(n2 > 0, n2, 1.0), 0.0)
    return scale[:, None] * p, lag, scale, inv_n2


@triton.jit
def _hess_h_vec(p, v, scale, inv_n2, q_star, COST: tl.constexpr):
    """grad^2 h(p) v (rows of p, v: (BLOCK_M, D_PAD))."""
    if COST == 0:
        hv = v
    else:
        pv = tl.sum(p * v, axis=1)
        hv = scale[:, None] * (v + ((q_star - 2.0) * pv * inv_n2)[:, None] * p)
    return hv


@triton.jit
def _residual_fwd_kernel(
        x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, r_ptr, ws_ptr,
        N, D, n_programs,
        stride_xn, stride_xd, stride_tn,
        q_star,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
        N_HIDDEN: tl.constexpr, ACT: tl.constexpr, COST: tl.constexpr,
        PRECISION: tl.constexpr):
    # workspace slots: a_k (0..L-1), zbar ping-pong (L, L+1), abar (L+2)
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((N_HIDDEN + 3) * BLOCK_M * H_PAD)
    rd = tl.arange(0, D_PAD)
    is_x = rd[None, :] < D
    n_blocks = tl.cdiv(N, BLOCK_M)
    blk = pid
    while blk < n_blocks:  # persistent loop
        rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        z0, t = load_input(x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn, D_PAD)
        u1 = up_sweep(z0, ws, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                      BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        g0 = down_sweep(ones, z0, z0, ws, w1_ptr, wh_ptr, wo_ptr,
                        ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
                        0, 0, 0, N_HIDDEN, N_HIDDEN + 2,
                        BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                        False, False, False)
        p = tl.where(is_x, g0, 0.0)
        grad_h, lag, _, _ = _hamiltonian_terms(p, q_star, COST)
        x0 = tl.where(is_x, z0 - t[:, None] * grad_h, 0.0)  # [x0, 0]
        u0 = up_sweep(x0, ws, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                      BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        tl.store(r_ptr + rows, u1 - t * lag - u0, mask=rows < N)
        tl.debug_barrier()  # the next block's up sweep overwrites a_k
        blk += n_programs


@triton.jit
def _residual_bwd_kernel(
        x_ptr, t_ptr, rbar_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
        gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr, xbar_ptr, tbar_ptr, ws_ptr,
        N, D, n_programs,
        stride_xn, stride_xd, stride_tn,
        q_star,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
        N_HIDDEN: tl.constexpr, ACT: tl.constexpr, COST: tl.constexpr,
        PRECISION: tl.constexpr):
    # workspace slots: a_k at (x, t) (0..L-1), g_k at (x, t) (L..2L-1), a_k at (x0, 0) and then
    # adot_k at (x, t) (2L..3L-1), zbar ping-pong (3L, 3L+1), abar (3L+2)
    L = N_HIDDEN
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((3 * N_HIDDEN + 3) * BLOCK_M * H_PAD)
    rd = tl.arange(0, D_PAD)
    is_x = rd[None, :] < D
    n_blocks = tl.cdiv(N, BLOCK_M)
    blk = pid
    while blk < n_blocks:
        rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        z0, t = load_input(x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn, D_PAD)
        rbar = tl.load(rbar_ptr + rows, mask=row_ok, other=0.0)
        # (x, t): a_k and g_k kept for the second-order sweep
        up_sweep(z0, ws, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                 BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        g0 = down_sweep(ones, z0, z0, ws, w1_ptr, wh_ptr, wo_ptr,
                        ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
                        0, L, 2 * L, 3 * L, 3 * L + 2,
                        BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                        True, False, False)
        p = tl.where(is_x, g0, 0.0)
        grad_h, lag, scale, inv_n2 = _hamiltonian_terms(p, q_star, COST)
        x0 = tl.where(is_x, z0 - t[:, None] * grad_h, 0.0)
        # (x0, 0): first order with ubar = -rbar; its input adjoint is -rbar p0
        up_sweep(x0, ws, 2 * L, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                 BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        zbar_x0 = down_sweep(-rbar, x0, x0, ws, w1_ptr, wh_ptr, wo_ptr,
                             gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
                             2 * L, L, 2 * L, 3 * L, 3 * L + 2,
                             BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                             False, False, True)
        rbar_p0 = tl.where(is_x, -zbar_x0, 0.0)
        # (x, t): pbar = t grad^2 h(p) (rbar p0 - rbar p), tangent sweep, second-order sweep
        pbar = t[:, None] * _hess_h_vec(p, rbar_p0 - rbar[:, None] * p, scale, inv_n2, q_star,
                                        COST)
        tangent_sweep(pbar, ws, 0, 2 * L, w1_ptr, wh_ptr,
                      BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        zbar = down_sweep(rbar, z0, pbar, ws, w1_ptr, wh_ptr, wo_ptr,
                          gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
                          0, L, 2 * L, 3 * L, 3 * L + 2,
                          BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                          False, True, True)
        tl.store(xbar_ptr + rows[:, None] * D + rd[None, :], zbar - rbar_p0,
                 mask=row_ok[:, None] & is_x)
        tbar = (tl.sum(tl.where(rd[None, :] == D, zbar, 0.0), axis=1)
                + tl.sum(rbar_p0 * grad_h, axis=1) - rbar * lag)
        tl.store(tbar_ptr + rows, tbar, mask=row_ok)
        blk += n_programs


# ------------------------------------------------------------------------------ launchers
def cost_code(cost):
    """(COST constexpr, q*) for the kernels; ValueError naming the torch backend otherwise."""
    from ncf_fast.costs import Power, Quadratic

    if type(cost) is Quadratic:
        return QUADRATIC, 2.0
    if type(cost) is Power:
        return POWER, float(cost.q_star)
    raise _fallback(f"the triton kernels implement the Quadratic and Power costs only, got "
                    f"{cost!r}")


def residual_forward(packed, layout, cost, x, t):
    """Launch the forward kernel: -> r (N,)."""
    code, q_star = cost
    n = x.shape[0]
    r = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return r
    block_m, programs, warps, ws = launch_config(n, layout, layout.n_hidden + 3, x.device)
    _residual_fwd_kernel[(programs,)](
        x, t, *packed, r, ws, n, layout.dim, programs,
        x.stride(0), x.stride(1), t.stride(0), q_star,
        BLOCK_M=block_m, BLOCK_H=layout.block_h, H_PAD=layout.h_pad, D_PAD=layout.d_pad,
        N_HIDDEN=layout.n_hidden, ACT=layout.act, COST=code, PRECISION=dot_precision(),
        num_warps=warps)
    return r


def residual_backward(packed, layout, cost, x, t, rbar):
    """Launch the backward kernel: -> (packed parameter gradients, xbar (N, d), tbar (N, 1))."""
    code, q_star = cost
    n = x.shape[0]
    grads = zeros_like_packed(packed)
    xbar = torch.zeros(n, layout.dim, dtype=torch.float32, device=x.device)
    tbar = torch.zeros(n, 1, dtype=torch.float32, device=x.device)
    if n == 0:
        return grads, xbar, tbar
    block_m, programs, warps, ws = launch_config(n, layout, 3 * layout.n_hidden + 3, x.device)
    _residual_bwd_kernel[(programs,)](
        x, t, rbar.float().contiguous(), *packed, *grads, xbar, tbar, ws, n, layout.dim,
        programs, x.stride(0), x.stride(1), t.stride(0), q_star,
        BLOCK_M=block_m, BLOCK_H=layout.block_h, H_PAD=layout.h_pad, D_PAD=layout.d_pad,
        N_HIDDEN=layout.n_hidden, ACT=layout.act, COST=code, PRECISION=dot_precision(),
        num_warps=warps)
    return grads, xbar, tbar


# ------------------------------------------------------------------------ autograd wrapper
class CharacteristicResidual(torch.autograd.Function):
    """(act, cost, x (N, d), t (N, 1), *params) -> r (N,) with an analytic backward to x, t and
    every parameter (no autograd.grad(create_graph=True))."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, act, cost, x, t, *params):
        code = cost_code(cost)
        layout = mlp_layout(params, act, x, t)
        packed = pack_params(params, layout)
        r = residual_forward(packed, layout, code, x, t)
        ctx.layout, ctx.cost = layout, code
        ctx.save_for_backward(x, t, *packed)
        ctx.set_materialize_grads(False)
        return r

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, rbar):
        x, t, *packed = ctx.saved_tensors
        n_params = 2 * (ctx.layout.n_hidden + 1)
        if rbar is None:
            return (None,) * (4 + n_params)
        grads, xbar, tbar = residual_backward(packed, ctx.layout, ctx.cost, x, t, rbar)
        param_grads = unpack_grads(grads, ctx.layout)
        need = ctx.needs_input_grad
        return (None, None, xbar if need[2] else None, tbar if need[3] else None,
                *(g if need[4 + i] else None for i, g in enumerate(param_grads)))


def characteristic_residual(params, act, cost, x, t):
    """r(x, t) = u(x, t) - t (p . grad h(p) - h(p)) - u(x - t grad h(p), 0) from the fused
    kernels: x (N, d), t (N, 1) -> (N,), differentiable in params, x and t.

    cost: ncf_fast.costs.Quadratic or Power (exactly those classes; a custom Cost raises
    ValueError naming backend "torch").
    """
    return CharacteristicResidual.apply(act, cost, x, t, *params)
