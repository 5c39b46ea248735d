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

from .mlp_sweeps import (dot_precision, down_sweep, launch_config, load_input, mlp_layout,
                         pack_params, tangent_sweep, unpack_grads, up_sweep, zeros_like_packed)

__all__ = ["PotentialAndGrad", "potential_and_grad"]


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _potential_grad_fwd_kernel(
        x_ptr, t_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr, u_ptr, p_ptr, ws_ptr,
        N, D, n_programs,
        stride_xn, stride_xd, stride_tn, stride_pn, stride_pd,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
        N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr):
    # workspace slots: a_k (0..L-1), zbar ping-pong (L, L+1), abar (L+2)
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((N_HIDDEN + 3) * BLOCK_M * H_PAD)
    rd = tl.arange(0, D_PAD)
    n_blocks = tl.cdiv(N, BLOCK_M)
    blk = pid
    while blk < n_blocks:  # persistent loop (a `for` over runtime bounds breaks the interpreter)
        rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        z0, _ = load_input(x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn, D_PAD)
        u = up_sweep(z0, ws, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                     BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        g0 = down_sweep(ones, z0, z0, ws, w1_ptr, wh_ptr, wo_ptr,
                        ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
                        0, 0, 0, N_HIDDEN, N_HIDDEN + 2,
                        BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                        False, False, False)
        row_ok = rows < N
        tl.store(u_ptr + rows, u, mask=row_ok)
        tl.store(p_ptr + rows[:, None] * stride_pn + rd[None, :] * stride_pd, g0,
                 mask=row_ok[:, None] & (rd[None, :] < D))
        blk += n_programs


@triton.jit
def _potential_grad_bwd_kernel(
        x_ptr, t_ptr, ubar_ptr, pbar_ptr, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
        gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr, xbar_ptr, tbar_ptr, ws_ptr,
        N, D, n_programs,
        stride_xn, stride_xd, stride_tn, stride_pbn, stride_pbd,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
        N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
        HAS_PBAR: tl.constexpr):
    # workspace slots: a_k (0..L-1), g_k (L..2L-1), adot_k (2L..3L-1), zbar (3L, 3L+1), abar (3L+2)
    L = N_HIDDEN
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * ((3 * N_HIDDEN + 3) * BLOCK_M * H_PAD)
    rd = tl.arange(0, D_PAD)
    n_blocks = tl.cdiv(N, BLOCK_M)
    blk = pid
    while blk < n_blocks:
        rows = blk.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        z0, _ = load_input(x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn, D_PAD)
        ubar = tl.load(ubar_ptr + rows, mask=row_ok, other=0.0)
        up_sweep(z0, ws, 0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
                 BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        if HAS_PBAR:
            ones = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
            down_sweep(ones, z0, z0, ws, w1_ptr, wh_ptr, wo_ptr,
                       ws_ptr, ws_ptr, ws_ptr, ws_ptr, ws_ptr,
                       0, L, 2 * L, 3 * L, 3 * L + 2,
                       BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                       True, False, False)
            zdot0 = tl.load(pbar_ptr + rows[:, None] * stride_pbn + rd[None, :] * stride_pbd,
                            mask=row_ok[:, None] & (rd[None, :] < D), other=0.0)
            tangent_sweep(zdot0, ws, 0, 2 * L, w1_ptr, wh_ptr,
                          BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION)
        else:
            zdot0 = z0
        zbar0 = down_sweep(ubar, z0, zdot0, ws, w1_ptr, wh_ptr, wo_ptr,
                           gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
                           0, L, 2 * L, 3 * L, 3 * L + 2,
                           BLOCK_M, BLOCK_H, H_PAD, D_PAD, N_HIDDEN, ACT, PRECISION,
                           False, HAS_PBAR, True)
        tl.store(xbar_ptr + rows[:, None] * D + rd[None, :], zbar0,
                 mask=row_ok[:, None] & (rd[None, :] < D))
        tbar = tl.sum(tl.where(rd[None, :] == D, zbar0, 0.0), axis=1)
        tl.store(tbar_ptr + rows, tbar, mask=row_ok)
        blk += n_programs


# ------------------------------------------------------------------------------ launchers
def potential_grad_forward(packed, layout, x, t):
    """Launch the forward kernel: -> u (N,), p (N, d)."""
    n = x.shape[0]
    u = torch.empty(n, dtype=torch.float32, device=x.device)
    p = torch.empty(n, layout.dim, dtype=torch.float32, device=x.device)
    if n == 0:
        return u, p
    block_m, programs, warps, ws = launch_config(n, layout, layout.n_hidden + 3, x.device)
    _potential_grad_fwd_kernel[(programs,)](
        x, t, *packed, u, p, ws, n, layout.dim, programs,
        x.stride(0), x.stride(1), t.stride(0), p.stride(0), p.stride(1),
        BLOCK_M=block_m, BLOCK_H=layout.block_h, H_PAD=layout.h_pad, D_PAD=layout.d_pad,
        N_HIDDEN=layout.n_hidden, ACT=layout.act, PRECISION=dot_precision(), num_warps=warps)
    return u, p


def potential_grad_backward(packed, layout, x, t, ubar, pbar):
    """Launch the backward kernel: -> (packed parameter gradients, xbar (N, d), tbar (N, 1))."""
    n = x.shape[0]
    grads = zeros_like_packed(packed)
    xbar = torch.zeros(n, layout.dim, dtype=torch.float32, device=x.device)
    tbar = torch.zeros(n, 1, dtype=torch.float32, device=x.device)
    if n == 0:
        return grads, xbar, tbar
    ubar = torch.zeros(n, dtype=torch.float32, device=x.device) if ubar is None else ubar.float()
    has_pbar = pbar is not None
    pbar = x if pbar is None else pbar.float()  # x: an unread placeholder pointer
    block_m, programs, warps, ws = launch_config(n, layout, 3 * layout.n_hidden + 3, x.device)
    _potential_grad_bwd_kernel[(programs,)](
        x, t, ubar.contiguous(), pbar, *packed, *grads, xbar, tbar, ws, n, layout.dim, programs,
        x.stride(0), x.stride(1), t.stride(0), pbar.stride(0), pbar.stride(1),
        BLOCK_M=block_m, BLOCK_H=layout.block_h, H_PAD=layout.h_pad, D_PAD=layout.d_pad,
        N_HIDDEN=layout.n_hidden, ACT=layout.act, PRECISION=dot_precision(),
        HAS_PBAR=has_pbar, num_warps=warps)
    return grads, xbar, tbar


# ------------------------------------------------------------------------ autograd wrapper
class PotentialAndGrad(torch.autograd.Function):
    """(act, x (N, d), t (N, 1), *params) -> u (N,), grad_x u (N, d), with the analytic backward
    of any scalar loss of (u, grad_x u) with respect to x, t and every parameter."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, act, x, t, *params):
        layout = mlp_layout(params, act, x, t)
        packed = pack_params(params, layout)
        u, p = potential_grad_forward(packed, layout, x, t)
        ctx.layout = layout
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
            return (None,) * (3 + n_params)
        grads, xbar, tbar = potential_grad_backward(packed, ctx.layout, x, t, ubar, pbar)
        param_grads = unpack_grads(grads, ctx.layout)
        need = ctx.needs_input_grad
        return (None, xbar if need[1] else None, tbar if need[2] else None,
                *(g if need[3 + i] else None for i, g in enumerate(param_grads)))


def potential_and_grad(params, act, x, t):
    """(u, grad_x u) from the fused Triton kernels: x (N, d), t (N, 1) -> (N,), (N, d).

    Differentiable in params, x and t through the analytic backward kernel. fp32 only; raises
    ValueError naming backend "torch" for models or inputs the kernels do not support.
    """
    return PotentialAndGrad.apply(act, x, t, *params)
