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
              tangent sweep from pbar, the second-order down sweep at (x, t); relaxed fp32
              atomics reduce the parameter gradients across programs (or into per-program
              copies: deterministic mode, see mlp_sweeps). Nothing (N, width) is stored.
COST (constexpr) is 0 for Quadratic, 1 for Power (runtime q*); other costs are refused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .mlp_sweeps import (BATCH_ARGS, POWER, QUADRATIC, _fallback, block_constexprs, device_guard,
                         dot_precision, down_sweep, grad_buffers, launch_config, mlp_layout,
                         pack_params, program_grads, reduce_grads, stage_rows, tangent_sweep,
                         tile, unit_feature_stride, unpack_grads, up_sweep)

__all__ = ["CharacteristicResidual", "characteristic_residual", "cost_code"]


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _norm_pow(n2, e):
    """|p|^e from n2 = |p|^2 with e >= 0: 0 at p = 0 unless e == 0 (then 1)."""
    nz = n2 > 0
    safe = tl.where(nz, n2, 1.0)
    return tl.where(nz, tl.exp(0.5 * e * tl.log(safe)), tl.where(e == 0.0, 1.0, 0.0))


@triton.jit
def _hamiltonian_terms(ws, P, D, q_star, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       D_PAD: tl.constexpr, SLOT_W: tl.constexpr, COST: tl.constexpr):
    """Per row, from p in slot P (columns < D): (|p|^(q*-2), L(p) = p . grad h - h, 1/|p|^2).
    grad h(p) = |p|^(q*-2) p (= p for the quadratic cost)."""
    n2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        p = tl.where(rd[None, :] < D, tl.load(tile(ws, P, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        n2 += tl.sum(p * p, axis=1)
    if COST == 0:
        scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        lag = 0.5 * n2
    else:
        scale = _norm_pow(n2, q_star - 2.0)
        lag = _norm_pow(n2, q_star) * ((q_star - 1.0) / q_star)  # |p|^q* / q
    inv_n2 = tl.where(n2 > 0, 1.0 / tl.where(n2 > 0, n2, 1.0), 0.0)
    return scale, lag, inv_n2


@triton.jit
def _stage_foot(ws, Z, P, X0, D, t, scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                D_PAD: tl.constexpr, SLOT_W: tl.constexpr):
    """Slot X0 = [x - t grad h(p), 0], the foot of the characteristic, from [x, t] in Z, p in P."""
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        p = tl.load(tile(ws, P, d0, BLOCK_M, BLOCK_D, SLOT_W))
        z = tl.load(tile(ws, Z, d0, BLOCK_M, BLOCK_D, SLOT_W))
        x0 = tl.where(rd[None, :] < D, z - (t * scale)[:, None] * p, 0.0)
        tl.store(tile(ws, X0, d0, BLOCK_M, BLOCK_D, SLOT_W), x0)
    tl.debug_barrier()


@triton.jit(do_not_specialize=BATCH_ARGS[:3])
def _residual_fwd_kernel(
        x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, r_ptr, ws_ptr,
        N, D, block_start,
        stride_xn, stride_xd, stride_tn,
        q_star,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr, N_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, COST: tl.constexpr, PRECISION: tl.constexpr):
    # workspace slots: a_k (0..L-1), zbar ping-pong (L, L+1), abar (L+2), [x, t] (L+3),
    # [p, du/dt] (L+4), [x0, 0] (L+5)
    L = N_HIDDEN
    Z = L + 3
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((N_HIDDEN + 6) * BLOCK_M * SLOT_W)
    blk = block_start + pid  # one row block per program; the launcher loops over chunks
    rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    t = stage_rows(ws, Z, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
                   BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    u1 = up_sweep(ws, Z, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                  BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    down_sweep(ones, ws, Z, Z, Z + 1, 0, 0, 0, L, L + 2,
               w1_ptr, wh_ptr, wo_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               False, False, False)
    scale, lag, _ = _hamiltonian_terms(ws, Z + 1, D, q_star, BLOCK_M, BLOCK_D, D_PAD, SLOT_W,
                                       COST)
    _stage_foot(ws, Z, Z + 1, Z + 2, D, t, scale, BLOCK_M, BLOCK_D, D_PAD, SLOT_W)
    u0 = up_sweep(ws, Z + 2, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                  BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    tl.store(r_ptr + rows, u1 - t * lag - u0, mask=rows < N)


@triton.jit(do_not_specialize=BATCH_ARGS)
def _residual_bwd_kernel(
        x_ptr, t_ptr, rbar_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
        gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr, xbar_ptr, tbar_ptr, ws_ptr,
        N, D, block_start,
        stride_xn, stride_xd, stride_tn, grad_pstride,
        q_star,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr, N_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, COST: tl.constexpr, PRECISION: tl.constexpr,
        DETERMINISTIC: tl.constexpr):
    # workspace slots: a_k at (x, t) (0..L-1), g_k at (x, t) (L..2L-1), a_k at (x0, 0) and then
    # adot_k at (x, t) (2L..3L-1), zbar ping-pong (3L, 3L+1), abar (3L+2), and per-row input
    # tiles: [x, t] (Z = 3L+3), [p, du/dt] then the input adjoint at (x, t) (Z+1), [x0, 0] (Z+2),
    # the input adjoint at (x0, 0) = -rbar [p0, du0/dt] (Z+3), [pbar, 0] (Z+4)
    L = N_HIDDEN
    Z = 3 * L + 3
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((3 * N_HIDDEN + 8) * BLOCK_M * SLOT_W)
    gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr = program_grads(gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr,
                                                              gc_ptr, grad_pstride, DETERMINISTIC)
    blk = block_start + pid  # one row block per program; the launcher loops over chunks
    rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rbar = tl.load(rbar_ptr + rows, mask=row_ok, other=0.0)
    t = stage_rows(ws, Z, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
                   BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    # (x, t): a_k and g_k are kept for the second-order sweep
    up_sweep(ws, Z, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    down_sweep(ones, ws, Z, Z, Z + 1, 0, L, 2 * L, 3 * L, 3 * L + 2,
               w1_ptr, wh_ptr, wo_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               True, False, False)
    scale, lag, inv_n2 = _hamiltonian_terms(ws, Z + 1, D, q_star, BLOCK_M, BLOCK_D, D_PAD,
                                            SLOT_W, COST)
    _stage_foot(ws, Z, Z + 1, Z + 2, D, t, scale, BLOCK_M, BLOCK_D, D_PAD, SLOT_W)
    # (x0, 0): first order with ubar = -rbar; its input adjoint is -rbar [p0, du0/dt]
    up_sweep(ws, Z + 2, 2 * L, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    down_sweep(-rbar, ws, Z + 2, Z + 2, Z + 3, 2 * L, L, 2 * L, 3 * L, 3 * L + 2,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               False, False, True)
    # pbar = t grad^2 h(p) v with v = rbar (p0 - p): two passes (p . v, then the tile)
    pv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p0_grad_h = tl.zeros((BLOCK_M,), dtype=tl.float32)  # rbar p0 . grad h(p)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        is_x = rd[None, :] < D
        p = tl.where(is_x, tl.load(tile(ws, Z + 1, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        rbar_p0 = tl.where(is_x, -tl.load(tile(ws, Z + 3, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        pv += tl.sum(p * (rbar_p0 - rbar[:, None] * p), axis=1)
        p0_grad_h += tl.sum(rbar_p0 * p, axis=1) * scale
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        is_x = rd[None, :] < D
        p = tl.where(is_x, tl.load(tile(ws, Z + 1, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        rbar_p0 = tl.where(is_x, -tl.load(tile(ws, Z + 3, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        v = rbar_p0 - rbar[:, None] * p
        if COST == 1:
            v += ((q_star - 2.0) * pv * inv_n2)[:, None] * p
        tl.store(tile(ws, Z + 4, d0, BLOCK_M, BLOCK_D, SLOT_W), (t * scale)[:, None] * v)
    tl.debug_barrier()
    # (x, t): tangent sweep from [pbar, 0], second-order sweep for (ubar, pbar) = (rbar, pbar)
    tangent_sweep(ws, Z + 4, 0, 2 * L, w1_ptr, wh_ptr,
                  BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    down_sweep(rbar, ws, Z, Z + 4, Z + 1, 0, L, 2 * L, 3 * L, 3 * L + 2,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               False, True, True)
    # xbar = zbar[:d] - rbar p0,  tbar = zbar[d] + rbar p0 . grad h(p) - rbar L(p)
    tbar = p0_grad_h - rbar * lag
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        zbar = tl.load(tile(ws, Z + 1, d0, BLOCK_M, BLOCK_D, SLOT_W))
        zbar_foot = tl.load(tile(ws, Z + 3, d0, BLOCK_M, BLOCK_D, SLOT_W))
        tl.store(xbar_ptr + rows[:, None] * D + rd[None, :], zbar + zbar_foot,
                 mask=row_ok[:, None] & (rd[None, :] < D))
        tbar += tl.sum(tl.where(rd[None, :] == D, zbar, 0.0), axis=1)
    tl.store(tbar_ptr + rows, tbar, mask=row_ok)


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
    block_m, chunks, options, ws = launch_config(n, layout, layout.n_hidden + 6, x.device)
    with device_guard(x):
        for start, programs in chunks:
            _residual_fwd_kernel[(programs,)](
                x, t, *packed, r, ws, n, layout.dim, start,
                x.stride(0), x.stride(1), t.stride(0), q_star,
                **block_constexprs(block_m, layout), COST=code, PRECISION=dot_precision(),
                **options)
    return r


def residual_backward(packed, layout, cost, x, t, rbar, deterministic=False):
    """Launch the backward kernel: -> (packed parameter gradients, xbar (N, d), tbar (N, 1))."""
    code, q_star = cost
    n = x.shape[0]
    xbar = torch.zeros(n, layout.dim, dtype=torch.float32, device=x.device)
    tbar = torch.zeros(n, 1, dtype=torch.float32, device=x.device)
    if n == 0:
        return grad_buffers(packed, 1, False)[0], xbar, tbar
    block_m, chunks, options, ws = launch_config(n, layout, 3 * layout.n_hidden + 8, x.device)
    grads, flat, pstride = grad_buffers(packed, chunks[0][1], deterministic)
    with device_guard(x):
        for start, programs in chunks:
            _residual_bwd_kernel[(programs,)](
                x, t, rbar.float().contiguous(), *packed, *grads, xbar, tbar, ws, n,
                layout.dim, start, x.stride(0), x.stride(1), t.stride(0), pstride, q_star,
                **block_constexprs(block_m, layout, backward=True), COST=code,
                PRECISION=dot_precision(), DETERMINISTIC=deterministic, **options)
    return reduce_grads(packed, flat), xbar, tbar


# ------------------------------------------------------------------------ autograd wrapper
class CharacteristicResidual(torch.autograd.Function):
    """(act, cost, deterministic, x (N, d), t (N, 1), *params) -> r (N,) with an analytic
    backward to x, t and every parameter (no autograd.grad(create_graph=True))."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, act, cost, deterministic, x, t, *params):
        code = cost_code(cost)
        layout = mlp_layout(params, act, x, t)
        x = unit_feature_stride(x)
        packed = pack_params(params, layout)
        r = residual_forward(packed, layout, code, x, t)
        ctx.layout, ctx.cost, ctx.deterministic = layout, code, deterministic
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
            return (None,) * (5 + n_params)
        grads, xbar, tbar = residual_backward(packed, ctx.layout, ctx.cost, x, t, rbar,
                                              ctx.deterministic)
        param_grads = unpack_grads(grads, ctx.layout)
        need = ctx.needs_input_grad
        return (None, None, None, xbar if need[3] else None, tbar if need[4] else None,
                *(g if need[5 + i] else None for i, g in enumerate(param_grads)))


def characteristic_residual(params, act, cost, x, t, deterministic: bool = False):
    """r(x, t) = u(x, t) - t (p . grad h(p) - h(p)) - u(x - t grad h(p), 0) from the fused
    kernels: x (N, d), t (N, 1) -> (N,), differentiable in params, x and t.

    cost: ncf_fast.costs.Quadratic or Power (exactly those classes; a custom Cost raises
    ValueError naming backend "torch"). deterministic: bitwise-reproducible weight gradients
    (see :func:`ncf_fast.kernels.mlp_potential.potential_and_grad`).
    """
    return CharacteristicResidual.apply(act, cost, bool(deterministic), x, t, *params)
