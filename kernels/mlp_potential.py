"""Fused potential and input gradient: (u, grad_x u) of PotentialMLP in one launch.

Math (ncf_fast.torch_backend is the torch-ops specification; sweeps in mlp_sweeps):
    u = w . s(a_{L-1}) + c,  a_k = W_k z_{k-1} + b_k,  z_{-1} = [x, t]
    p = grad_x u: down sweep g_{L-1} = w, g_{k-1} = W_k^T (g_k s'(a_k)), p = g_{-1}[:d].
Backward for cotangents (ubar (N,), pbar (N, d)): reverse mode through the (primal, tangent)
pair with zdot_{-1} = [pbar, 0] (pbar . grad_x u = D u[(pbar, 0)]), needing s''.

Shapes: x (N, d), t (N, 1) (any strides, e.g. an expanded scalar time), params the flat
(W_1, b_1, ..., W_{L+1}, b_{L+1}) of nn.Linear layers, fp32 -> u (N,), p (N, d).

Fusion plan:
    forward   one launch: up sweep + input-gradient down sweep per block of 64 rows; writes only
              u and p. Saved for backward: x, t and the packed parameters; nothing per layer.
    backward  one launch: recomputes the up sweep and the g_k sweep, runs the tangent sweep and
              the second-order down sweep, accumulates every weight/bias gradient (fp32 atomics)
              and writes xbar (N, d), tbar (N, 1). Activations are recomputed, not stored: the
              recompute costs 2L GEMM tiles per row block, a stored (N, width) per layer would
              cost 2 (N, width) memory round trips each and the peak memory the fused path
              exists to avoid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .mlp_launch import (BATCH_ARGS, block_constexprs, check_precision, device_guard, dot_precision,
                         grad_buffers, launch_config, mlp_layout, pack_params, reduce_grads,
                         unit_feature_stride, unpack_grads)
from .mlp_sweeps import (down_sweep, program_block, program_grads, stage_rows, tangent_sweep, tile,
                         up_sweep)

__all__ = ["PotentialAndGrad", "potential_and_grad"]


# ------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=BATCH_ARGS[:3])
def _potential_grad_fwd_kernel(
        x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, u_ptr, p_ptr, ws_ptr,
        N, D, block_start,
        stride_xn, stride_xd, stride_tn, stride_pn, stride_pd,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr, N_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, PRECISION: tl.constexpr):
    # workspace slots
    A0 = 0                # a_k (A0 + k)
    ZB0 = N_HIDDEN        # zbar ping-pong (ZB0, ZB0 + 1)
    AB = N_HIDDEN + 2     # abar
    XT = N_HIDDEN + 3     # [x, t]
    XT_BAR = N_HIDDEN + 4  # its adjoint [grad_x u, du/dt]
    ws, rows, row_ok = program_block(ws_ptr, block_start, N, N_HIDDEN + 5, BLOCK_M, SLOT_W)
    stage_rows(ws, XT, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
               BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    u = up_sweep(ws, XT, A0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                 BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    tl.store(u_ptr + rows, u, mask=row_ok)
    ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    down_sweep(ones, ws, XT, XT, XT_BAR, A0, A0, A0, ZB0, AB,
               w1_ptr, wh_ptr, wo_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               STORE_G=False, SECOND=False, ACCUM=False)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        tl.store(p_ptr + rows[:, None] * stride_pn + rd[None, :] * stride_pd,
                 tl.load(tile(ws, XT_BAR, d0, BLOCK_M, BLOCK_D, SLOT_W)),
                 mask=row_ok[:, None] & (rd[None, :] < D))


@triton.jit(do_not_specialize=BATCH_ARGS)
def _potential_grad_bwd_kernel(
        x_ptr, t_ptr, ubar_ptr, pbar_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
        gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr, xbar_ptr, tbar_ptr, ws_ptr,
        N, D, block_start,
        stride_xn, stride_xd, stride_tn, stride_pbn, stride_pbd, grad_pstride,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr, N_HIDDEN: tl.constexpr,
        ACT: tl.constexpr, PRECISION: tl.constexpr, HAS_PBAR: tl.constexpr,
        DETERMINISTIC: tl.constexpr):
    # workspace slots
    A0 = 0                    # a_k (A0 + k)
    G0 = N_HIDDEN             # g_k
    T0 = 2 * N_HIDDEN         # adot_k
    ZB0 = 3 * N_HIDDEN        # zbar ping-pong (ZB0, ZB0 + 1)
    AB = 3 * N_HIDDEN + 2     # abar
    XT = 3 * N_HIDDEN + 3     # [x, t]
    PBAR = 3 * N_HIDDEN + 4   # [pbar, 0]
    XT_BAR = 3 * N_HIDDEN + 5  # the input adjoint
    ws, rows, row_ok = program_block(ws_ptr, block_start, N, 3 * N_HIDDEN + 6, BLOCK_M, SLOT_W)
    gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr = program_grads(gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr,
                                                              gc_ptr, grad_pstride, DETERMINISTIC)
    stage_rows(ws, XT, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
               BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    ubar = tl.load(ubar_ptr + rows, mask=row_ok, other=0.0)
    up_sweep(ws, XT, A0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    if HAS_PBAR:
        ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        down_sweep(ones, ws, XT, XT, XT_BAR, A0, G0, T0, ZB0, AB,
                   w1_ptr, wh_ptr, wo_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
                   BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
                   STORE_G=True, SECOND=False, ACCUM=False)
        stage_rows(ws, PBAR, pbar_ptr, t_ptr, rows, N, D, stride_pbn, stride_pbd, 0,
                   BLOCK_M, BLOCK_D, D_PAD, SLOT_W, False)
        tangent_sweep(ws, PBAR, A0, T0, w1_ptr, wh_ptr,
                      BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT,
                      PRECISION)
    down_sweep(ubar, ws, XT, PBAR, XT_BAR, A0, G0, T0, ZB0, AB,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               STORE_G=False, SECOND=HAS_PBAR, ACCUM=True)
    tbar = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        zbar = tl.load(tile(ws, XT_BAR, d0, BLOCK_M, BLOCK_D, SLOT_W))
        tl.store(xbar_ptr + rows[:, None] * D + rd[None, :], zbar,
                 mask=row_ok[:, None] & (rd[None, :] < D))
        tbar += tl.sum(tl.where(rd[None, :] == D, zbar, 0.0), axis=1)
    tl.store(tbar_ptr + rows, tbar, mask=row_ok)


# ------------------------------------------------------------------------------ launchers
def potential_grad_forward(packed, layout, x, t, precision=None):
    """Launch the forward kernel: -> u (N,), p (N, d). precision: the tl.dot input precision
    (None: :func:`.mlp_launch.dot_precision`)."""
    n = x.shape[0]
    u = torch.empty(n, dtype=torch.float32, device=x.device)
    p = torch.empty(n, layout.dim, dtype=torch.float32, device=x.device)
    if n == 0:
        return u, p
    block_m, chunks, options, ws = launch_config(n, layout, layout.n_hidden + 5, x.device)
    with device_guard(x):
        for start, programs in chunks:
            _potential_grad_fwd_kernel[(programs,)](
                x, t, *packed, u, p, ws, n, layout.dim, start,
                x.stride(0), x.stride(1), t.stride(0), p.stride(0), p.stride(1),
                **block_constexprs(block_m, layout), PRECISION=precision or dot_precision(),
                **options)
    return u, p


def potential_grad_backward(packed, layout, x, t, ubar, pbar, deterministic=False, precision=None):
    """Launch the backward kernel: -> (packed parameter gradients, xbar (N, d), tbar (N, 1))."""
    n = x.shape[0]
    xbar = torch.zeros(n, layout.dim, dtype=torch.float32, device=x.device)
    tbar = torch.zeros(n, 1, dtype=torch.float32, device=x.device)
    if n == 0:
        return grad_buffers(packed, 1, False)[0], xbar, tbar
    ubar = torch.zeros(n, dtype=torch.float32, device=x.device) if ubar is None else ubar.float()
    has_pbar = pbar is not None
    pbar = x if pbar is None else pbar.float()  # x: an unread placeholder pointer
    block_m, chunks, options, ws = launch_config(n, layout, 3 * layout.n_hidden + 6, x.device)
    grads, flat, pstride = grad_buffers(packed, chunks[0][1], deterministic)
    with device_guard(x):
        for start, programs in chunks:
            _potential_grad_bwd_kernel[(programs,)](
                x, t, ubar.contiguous(), pbar, *packed, *grads, xbar, tbar, ws, n, layout.dim,
                start, x.stride(0), x.stride(1), t.stride(0), pbar.stride(0), pbar.stride(1),
                pstride, **block_constexprs(block_m, layout, backward=True),
                PRECISION=precision or dot_precision(), HAS_PBAR=has_pbar,
                DETERMINISTIC=deterministic, **options)
    return reduce_grads(packed, flat), xbar, tbar


# ------------------------------------------------------------------------ autograd wrapper
class PotentialAndGrad(torch.autograd.Function):
    """(act, deterministic, precision, x (N, d), t (N, 1), *params) -> u (N,), grad_x u (N, d),
    with the analytic backward of any scalar loss of (u, grad_x u) with respect to x, t and every
    parameter; the backward uses the forward's dot precision."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, act, deterministic, precision, x, t, *params):
        layout = mlp_layout(params, act, x, t)
        x = unit_feature_stride(x)
        packed = pack_params(params, layout)
        u, p = potential_grad_forward(packed, layout, x, t, precision)
        ctx.layout, ctx.deterministic, ctx.precision = layout, deterministic, precision
        ctx.save_for_backward(x, t, *packed)
        ctx.set_materialize_grads(False)
        return u, p

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, ubar, pbar):
        x, t, *packed = ctx.saved_tensors
        n_params = 2 * (ctx.layout.n_hidden + 1)
        if ubar is None and pbar is None:
            return (None,) * (5 + n_params)
        grads, xbar, tbar = potential_grad_backward(packed, ctx.layout, x, t, ubar, pbar,
                                                    deterministic=ctx.deterministic,
                                                    precision=ctx.precision)
        param_grads = unpack_grads(grads, ctx.layout)
        need = ctx.needs_input_grad
        return (None, None, None, xbar if need[3] else None, tbar if need[4] else None,
                *(g if need[5 + i] else None for i, g in enumerate(param_grads)))


def potential_and_grad(params, act, x, t, deterministic: bool = False, precision: str | None = None):
    """(u, grad_x u) from the fused Triton kernels: x (N, d), t (N, 1) -> (N,), (N, d).

    Differentiable in params, x and t through the analytic backward kernel. fp32 only; raises
    ValueError naming backend "torch" for models or inputs the kernels do not support.
    deterministic: reduce the weight gradients through per-program copies in a fixed order
    (bitwise-identical run to run, one gradient copy per resident program of memory) instead
    of atomic adds into one buffer (the default: faster, last bits vary between runs).
    precision: the tl.dot input precision, "tf32x3" or "tf32" (None: the default,
    :func:`.mlp_launch.set_dot_precision`).
    """
    return PotentialAndGrad.apply(act, bool(deterministic), check_precision(precision), x, t,
                                  *params)
