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
              copies: deterministic mode, see mlp_sweeps and mlp_launch). Nothing (N, width) is stored.
COST (constexpr) is COST_QUADRATIC (0) or COST_POWER (1, runtime q*), passed by the caller as
kernel constants; other costs are refused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import COST_POWER, COST_QUADRATIC
from .mlp_launch import (BATCH_ARGS, block_constexprs, check_precision, device_guard, dot_precision,
                         fallback, grad_buffers, launch_config, mlp_layout, pack_params,
                         reduce_grads, unit_feature_stride, unpack_grads)
from .mlp_sweeps import (down_sweep, program_block, program_grads, stage_rows, tangent_sweep, tile,
                         up_sweep)

__all__ = ["CharacteristicResidual", "characteristic_residual", "check_cost"]


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


@triton.jit
def _foot_of_characteristic(ws, x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, rows, N, D,
                            stride_xn, stride_xd, stride_tn, q_star, XT, P, X0, G0, T0, ZB0, AB,
                            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                            H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr,
                            N_HIDDEN: tl.constexpr, ACT: tl.constexpr, COST: tl.constexpr,
                            PRECISION: tl.constexpr, STORE_G: tl.constexpr):
    """Both residual kernels' start at (x, t): [x, t] into slot XT, a_k into slots 0.. (and with
    STORE_G g_k into G0 + k), [p, du/dt] into slot P, the foot [x0, 0] into slot X0. Returns
    (u, t, |p|^(q*-2), L(p), 1/|p|^2) per row."""
    t = stage_rows(ws, XT, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
                   BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    u = up_sweep(ws, XT, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                 BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    down_sweep(ones, ws, XT, XT, P, 0, G0, T0, ZB0, AB,
               w1_ptr, wh_ptr, wo_ptr, ws, ws, ws, ws, ws,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               STORE_G=STORE_G, SECOND=False, ACCUM=False)
    scale, lag, inv_n2 = _hamiltonian_terms(ws, P, D, q_star, BLOCK_M, BLOCK_D, D_PAD, SLOT_W,
                                            COST)
    _stage_foot(ws, XT, P, X0, D, t, scale, BLOCK_M, BLOCK_D, D_PAD, SLOT_W)
    return u, t, scale, lag, inv_n2


@triton.jit(do_not_specialize=BATCH_ARGS[:3])
def _residual_fwd_kernel(
        x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, r_ptr, ws_ptr,
        N, D, block_start,
        stride_xn, stride_xd, stride_tn,
        q_star,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr, N_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, COST: tl.constexpr, PRECISION: tl.constexpr):
    # workspace slots
    A0 = 0                # a_k (A0 + k), at (x, t) and then at (x0, 0)
    ZB0 = N_HIDDEN        # zbar ping-pong (ZB0, ZB0 + 1)
    AB = N_HIDDEN + 2     # abar
    XT = N_HIDDEN + 3     # [x, t]
    P = N_HIDDEN + 4      # [p, du/dt]
    X0 = N_HIDDEN + 5     # [x0, 0]
    ws, rows, row_ok = program_block(ws_ptr, block_start, N, N_HIDDEN + 6, BLOCK_M, SLOT_W)
    u1, t, scale, lag, _ = _foot_of_characteristic(
        ws, x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, rows, N, D, stride_xn, stride_xd,
        stride_tn, q_star, XT, P, X0, A0, A0, ZB0, AB, BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD,
        SLOT_W, N_HIDDEN, ACT, COST, PRECISION, STORE_G=False)
    u0 = up_sweep(ws, X0, A0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
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
    # workspace slots
    A0 = 0                    # a_k at (x, t) (A0 + k)
    G0 = N_HIDDEN             # g_k at (x, t)
    T0 = 2 * N_HIDDEN         # a_k at (x0, 0), then adot_k at (x, t)
    ZB0 = 3 * N_HIDDEN        # zbar ping-pong (ZB0, ZB0 + 1)
    AB = 3 * N_HIDDEN + 2     # abar
    XT = 3 * N_HIDDEN + 3     # [x, t]
    P = 3 * N_HIDDEN + 4      # [p, du/dt], then the input adjoint at (x, t)
    X0 = 3 * N_HIDDEN + 5     # [x0, 0]
    X0_BAR = 3 * N_HIDDEN + 6  # the input adjoint at (x0, 0) = -rbar [p0, du0/dt]
    PBAR = 3 * N_HIDDEN + 7   # [pbar, 0]
    ws, rows, row_ok = program_block(ws_ptr, block_start, N, 3 * N_HIDDEN + 8, BLOCK_M, SLOT_W)
    gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr = program_grads(gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr,
                                                              gc_ptr, grad_pstride, DETERMINISTIC)
    rbar = tl.load(rbar_ptr + rows, mask=row_ok, other=0.0)
    # (x, t): a_k and g_k are kept for the second-order sweep
    _, t, scale, lag, inv_n2 = _foot_of_characteristic(
        ws, x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, rows, N, D, stride_xn, stride_xd,
        stride_tn, q_star, XT, P, X0, G0, T0, ZB0, AB, BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD,
        SLOT_W, N_HIDDEN, ACT, COST, PRECISION, STORE_G=True)
    # (x0, 0): first order with ubar = -rbar; its input adjoint is -rbar [p0, du0/dt]
    up_sweep(ws, X0, T0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    down_sweep(-rbar, ws, X0, X0, X0_BAR, T0, G0, T0, ZB0, AB,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               STORE_G=False, SECOND=False, ACCUM=True)
    # pbar = t grad^2 h(p) v with v = rbar (p0 - p): two passes (p . v, then the tile)
    pv = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p0_grad_h = tl.zeros((BLOCK_M,), dtype=tl.float32)  # rbar p0 . grad h(p)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        is_x = rd[None, :] < D
        p = tl.where(is_x, tl.load(tile(ws, P, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        rbar_p0 = tl.where(is_x, -tl.load(tile(ws, X0_BAR, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        pv += tl.sum(p * (rbar_p0 - rbar[:, None] * p), axis=1)
        p0_grad_h += tl.sum(rbar_p0 * p, axis=1) * scale
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        is_x = rd[None, :] < D
        p = tl.where(is_x, tl.load(tile(ws, P, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        rbar_p0 = tl.where(is_x, -tl.load(tile(ws, X0_BAR, d0, BLOCK_M, BLOCK_D, SLOT_W)), 0.0)
        v = rbar_p0 - rbar[:, None] * p
        if COST == 1:
            v += ((q_star - 2.0) * pv * inv_n2)[:, None] * p
        tl.store(tile(ws, PBAR, d0, BLOCK_M, BLOCK_D, SLOT_W), (t * scale)[:, None] * v)
    tl.debug_barrier()
    # (x, t): tangent sweep from [pbar, 0], second-order sweep for (ubar, pbar) = (rbar, pbar)
    tangent_sweep(ws, PBAR, A0, T0, w1_ptr, wh_ptr,
                  BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    down_sweep(rbar, ws, XT, PBAR, P, A0, G0, T0, ZB0, AB,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               STORE_G=False, SECOND=True, ACCUM=True)
    # xbar = zbar[:d] - rbar p0,  tbar = zbar[d] + rbar p0 . grad h(p) - rbar L(p)
    tbar = p0_grad_h - rbar * lag
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        zbar = tl.load(tile(ws, P, d0, BLOCK_M, BLOCK_D, SLOT_W))
        zbar_foot = tl.load(tile(ws, X0_BAR, d0, BLOCK_M, BLOCK_D, SLOT_W))
        tl.store(xbar_ptr + rows[:, None] * D + rd[None, :], zbar + zbar_foot,
                 mask=row_ok[:, None] & (rd[None, :] < D))
        tbar += tl.sum(tl.where(rd[None, :] == D, zbar, 0.0), axis=1)
    tl.store(tbar_ptr + rows, tbar, mask=row_ok)


# ------------------------------------------------------------------------------ launchers
def check_cost(cost) -> tuple:
    """The caller's kernel constants (COST, q*): COST_QUADRATIC (q* = 2) or COST_POWER with
    q* > 1 (the conjugate exponent of |v|^q / q); ValueError naming the torch backend otherwise."""
    try:
        code, q_star = cost
        code, q_star = int(code), float(q_star)
    except (TypeError, ValueError):
        code, q_star = None, 0.0
    if code not in (COST_QUADRATIC, COST_POWER) or not q_star > 1.0:
        raise fallback(f"the triton kernels implement the Quadratic and Power costs only, got "
                       f"{cost!r}")
    return code, q_star


def residual_forward(packed, layout, cost, x, t, precision=None):
    """Launch the forward kernel: -> r (N,). cost: (COST, q*) as :func:`check_cost` returns it;
    precision: the tl.dot input precision (None: the default)."""
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
                **block_constexprs(block_m, layout), COST=code,
                PRECISION=precision or dot_precision(), **options)
    return r


def residual_backward(packed, layout, cost, x, t, rbar, deterministic=False, precision=None):
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
                PRECISION=precision or dot_precision(), DETERMINISTIC=deterministic, **options)
    return reduce_grads(packed, flat), xbar, tbar


# ------------------------------------------------------------------------ autograd wrapper
class CharacteristicResidual(torch.autograd.Function):
    """(act, cost, deterministic, precision, x (N, d), t (N, 1), *params) -> r (N,) with an
    analytic backward to x, t and every parameter (no autograd.grad(create_graph=True)); cost:
    the kernel constants (COST, q*); the backward uses the forward's dot precision."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, act, cost, deterministic, precision, x, t, *params):
        layout = mlp_layout(params, act, x, t)
        x = unit_feature_stride(x)
        packed = pack_params(params, layout)
        r = residual_forward(packed, layout, cost, x, t, precision)
        ctx.layout, ctx.cost, ctx.deterministic = layout, cost, deterministic
        ctx.precision = precision
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
            return (None,) * (6 + n_params)
        grads, xbar, tbar = residual_backward(packed, ctx.layout, ctx.cost, x, t, rbar,
                                              deterministic=ctx.deterministic,
                                              precision=ctx.precision)
        param_grads = unpack_grads(grads, ctx.layout)
        need = ctx.needs_input_grad
        return (None, None, None, None, xbar if need[4] else None, tbar if need[5] else None,
                *(g if need[6 + i] else None for i, g in enumerate(param_grads)))


def characteristic_residual(params, act, cost, x, t, deterministic: bool = False,
                            precision: str | None = None):
    """r(x, t) = u(x, t) - t (p . grad h(p) - h(p)) - u(x - t grad h(p), 0) from the fused
    kernels: x (N, d), t (N, 1) -> (N,), differentiable in params, x and t.

    cost: the kernel constants (COST_QUADRATIC, 2.0) or (COST_POWER, q*), which the caller
    derives from its cost (anything else raises ValueError naming backend "torch").
    deterministic: bitwise-reproducible weight gradients; precision: the tl.dot input precision
    (both as for :func:`potential_and_grad <.mlp_potential.potential_and_grad>`).
    """
    return CharacteristicResidual.apply(act, check_cost(cost), bool(deterministic),
                                        check_precision(precision), x, t, *params)
