"""Fused potential and input gradient: (u, grad_x u) of PotentialMLP in one launch.

Math (ncf_fast.fused is the torch-ops specification; sweeps in mlp_sweeps):
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

from .mlp_sweeps import (BATCH_ARGS, block_constexprs, device_guard, dot_precision, down_sweep,
                         grad_buffers, launch_config, mlp_layout, pack_params, program_grads,
                         reduce_grads, stage_rows, tangent_sweep, tile, unit_feature_stride,
                         unpack_grads, up_sweep)

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
    # workspace slots: a_k (0..L-1), zbar ping-pong (L, L+1), abar (L+2), [x, t] (L+3),
    # its adjoint [grad_x u, du/dt] (L+4)
    L = N_HIDDEN
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((N_HIDDEN + 5) * BLOCK_M * SLOT_W)
    blk = block_start + pid  # one row block per program; the launcher loops over chunks
    rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    stage_rows(ws, L + 3, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
               BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    u = up_sweep(ws, L + 3, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                 BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    tl.store(u_ptr + rows, u, mask=row_ok)
    ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    down_sweep(ones, ws, L + 3, L + 3, L + 4, 0, 0, 0, L, L + 2,
               w1_ptr, wh_ptr, wo_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               False, False, False)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        tl.store(p_ptr + rows[:, None] * stride_pn + rd[None, :] * stride_pd,
                 tl.load(tile(ws, L + 4, d0, BLOCK_M, BLOCK_D, SLOT_W)),
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
    # workspace slots: a_k (0..L-1), g_k (L..2L-1), adot_k (2L..3L-1), zbar ping-pong (3L, 3L+1),
    # abar (3L+2), [x, t] (3L+3), [pbar, 0] (3L+4), the input adjoint (3L+5)
    L = N_HIDDEN
    Z = 3 * L + 3
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((3 * N_HIDDEN + 6) * BLOCK_M * SLOT_W)
    gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr = program_grads(gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr,
                                                              gc_ptr, grad_pstride, DETERMINISTIC)
    blk = block_start + pid  # one row block per program; the launcher loops over chunks
    rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    stage_rows(ws, Z, x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn,
               BLOCK_M, BLOCK_D, D_PAD, SLOT_W, True)
    ubar = tl.load(ubar_ptr + rows, mask=row_ok, other=0.0)
    up_sweep(ws, Z, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION)
    if HAS_PBAR:
        ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        down_sweep(ones, ws, Z, Z, Z + 2, 0, L, 2 * L, 3 * L, 3 * L + 2,
                   w1_ptr, wh_ptr, wo_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
                   BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
                   True, False, False)
        stage_rows(ws, Z + 1, pbar_ptr, t_ptr, rows, N, D, stride_pbn, stride_pbd, 0,
                   BLOCK_M, BLOCK_D, D_PAD, SLOT_W, False)
        tangent_sweep(ws, Z + 1, 0, 2 * L, w1_ptr, wh_ptr,
                      BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT,
                      PRECISION)
    down_sweep(ubar, ws, Z, Z + 1, Z + 2, 0, L, 2 * L, 3 * L, 3 * L + 2,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD, SLOT_W, N_HIDDEN, ACT, PRECISION,
               False, HAS_PBAR, True)
    tbar = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        zbar = tl.load(tile(ws, Z + 2, d0, BLOCK_M, BLOCK_D, SLOT_W))
        tl.store(xbar_ptr + rows[:, None] * D + rd[None, :], zbar,
                 mask=row_ok[:, None] & (rd[None, :] < D))
        tbar += tl.sum(tl.where(rd[None, :] == D, zbar, 0.0), axis=1)
    tl.store(tbar_ptr + rows, tbar, mask=row_ok)


# ------------------------------------------------------------------------------ launchers
def potential_grad_forward(packed, layout, x, t):
    """Launch the forward kernel: -> u (N,), p (N, d)."""
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
                **block_constexprs(block_m, layout), PRECISION=dot_precision(), **options)
    return u, p


def potential_grad_backward(packed, layout, x, t, ubar, pbar, deterministic=False):
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
                PRECISION=dot_precision(), HAS_PBAR=has_pbar,
                DETERMINISTIC=deterministic, **options)
    return reduce_grads(packed, flat), xbar, tbar


# ------------------------------------------------------------------------ autograd wrapper
class PotentialAndGrad(torch.autograd.Function):
    """(act, deterministic, x (N, d), t (N, 1), *params) -> u (N,), grad_x u (N, d), with the
    analytic backward of any scalar loss of (u, grad_x u) with respect to x, t and every
    parameter."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, act, deterministic, x, t, *params):
        layout = mlp_layout(params, act, x, t)
        x = unit_feature_stride(x)
        packed = pack_params(params, layout)
        u, p = potential_grad_forward(packed, layout, x, t)
        ctx.layout, ctx.deterministic = layout, deterministic
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
            return (None,) * (4 + n_params)
        grads, xbar, tbar = potential_grad_backward(packed, ctx.layout, x, t, ubar, pbar,
                                                    ctx.deterministic)
        param_grads = unpack_grads(grads, ctx.layout)
        need = ctx.needs_input_grad
        return (None, None, xbar if need[2] else None, tbar if need[3] else None,
                *(g if need[4 + i] else None for i, g in enumerate(param_grads)))


def potential_and_grad(params, act, x, t, deterministic: bool = False):
    """(u, grad_x u) from the fused Triton kernels: x (N, d), t (N, 1) -> (N,), (N, d).

    Differentiable in params, x and t through the analytic backward kernel. fp32 only; raises
    ValueError naming backend "torch" for models or inputs the kernels do not support.
    deterministic: reduce the weight gradients through per-program copies in a fixed order
    (bitwise-identical run to run, one gradient copy per resident program of memory) instead
    of atomic adds into one buffer (the default: faster, last bits vary between runs).
    """
    return PotentialAndGrad.apply(act, bool(deterministic), x, t, *params)
