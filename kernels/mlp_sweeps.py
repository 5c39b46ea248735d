"""Shared pieces of the fused MLP kernels (mlp_potential, mlp_residual): device sweeps and layout.

Network (ncf_fast.fused's notation, hidden layers k = 0..L-1):
    z_{-1} = [x, t],  a_k = W_k z_{k-1} + b_k,  z_k = s(a_k),  u = w . z_{L-1} + c.

Three sweeps over one block of BLOCK_M rows, each a chain of fp32 GEMM tiles:
    up       a_k for every layer (and u);
    tangent  adot_k = W_k zdot_{k-1},  zdot_k = s'(a_k) adot_k,  zdot_{-1} = [pbar, 0];
    down     zbar_{L-1} = ubar w,  abar_k = zbar_k s'(a_k) [+ g_k s''(a_k) adot_k],
             zbar_{k-1} = W_k^T abar_k; with ACCUM the weight gradients
             dW_k += abar_k^T z_{k-1} [+ delta_k^T zdot_{k-1}],  delta_k = g_k s'(a_k),
             where g_k is the down sweep's zbar_k for ubar = 1 (the input-gradient sweep).
The down sweep with ubar = 1 returns [grad_x u, du/dt]; with the bracketed second-order terms it
is reverse mode through the (primal, tangent) pair, i.e. the parameter gradient of
ubar u + pbar . grad_x u without autograd.grad(create_graph=True).

Fusion plan. Hidden widths are zero-padded to H_PAD, a multiple of the tile width BLOCK_H, and
[x, t] to D_PAD (a power of two >= 16); padded units have zero weights, so they contribute
nothing. A layer's activations never sit in registers whole: every GEMM streams BLOCK_H-wide
weight tiles (64 x 64 fp32 = 16 KB) and BLOCK_H-wide column tiles of the per-layer vectors
(a_k, adot_k, g_k, zbar_k, abar_k) through a per-program workspace of (slots, BLOCK_M, H_PAD)
fp32 tiles, which is what lets 256-wide layers (one weight matrix = 256 KB > 227 KB of shared
memory) compile without spills. The workspace is sized by the number of programs (a persistent
grid of ~2 per SM), not by N, so no (N, width) tensor is written to global memory and it stays
mostly in L2. Tiles are written in one register layout and read back in another, so a
tl.debug_barrier() (bar.sync) separates every producer phase from its consumers. Weight
gradients are reduced across programs with fp32 atomic adds of (BLOCK_H, BLOCK_H) tiles.

tl.dot input precision: "tf32x3" by default (three TF32 tensor-core products, fp32-level
accuracy; plain "ieee" fp32 compiles to FMA loops without tensor cores on Hopper); "tf32" is the
opt-in fast mode (one product, ~1e-3 relative error, see :func:`set_dot_precision`).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ACTIVATION_CODES", "MLPLayout", "mlp_layout", "pack_params", "unpack_grads",
           "launch_config", "set_dot_precision", "dot_precision", "MAX_WIDTH", "MAX_INPUT"]

ACTIVATION_CODES = {"softplus": 0, "tanh": 1, "silu": 2}
QUADRATIC, POWER = 0, 1

# Widths above this need a workspace of (programs, slots, 64, width) fp32 tiles large enough
# (> 100 MB at 512 for a 3-layer backward) that the torch backend's cuBLAS GEMMs are the better tool.
MAX_WIDTH = 512
# d + 1 <= 128: [x, t] is one (BLOCK_M, D_PAD) register tile; 256 would spill.
MAX_INPUT = 128

_PRECISIONS = ("tf32x3", "tf32")
_precision = os.environ.get("NCF_FAST_DOT_PRECISION", "tf32x3")


def set_dot_precision(precision: str) -> None:
    """Choose the tl.dot input precision of the MLP kernels: "tf32x3" (default) or "tf32".

    "tf32x3": about fp32 accuracy, the same tolerance rule as the float32 reference.
    "tf32":   one TF32 product per tile, ~2-3x faster GEMMs; 10-bit mantissas give relative
              errors up to ~1e-3 of max|value| on u, grad_x u and r, and ~5e-3 on gradients.
    The interpreter (TRITON_INTERPRET=1) computes in fp32 whatever is chosen.
    """
    global _precision
    if precision not in _PRECISIONS:
        raise ValueError(f"dot precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    _precision = precision


def dot_precision() -> str:
    return _precision


# ----------------------------------------------------------------------- device functions
@triton.jit
def _activation(a, ACT: tl.constexpr):
    """(s(a), s'(a), s''(a)) from tl.exp/tl.log only, overflow-safe (exp of -|a| <= 0 only).
    Unused outputs are removed by the compiler."""
    e = tl.exp(-tl.abs(a))
    inv = 1.0 / (1.0 + e)
    pos = a >= 0
    sig = tl.where(pos, inv, e * inv)          # sigmoid(a)
    one_minus = tl.where(pos, e * inv, inv)    # 1 - sigmoid(a), without cancellation
    if ACT == 0:  # softplus = max(a, 0) + log1p(e); log1p(e) = log(1 + e) * e / ((1 + e) - 1)
        one_p = 1.0 + e
        log1p = tl.where(one_p == 1.0, e, tl.log(one_p) * (e / (one_p - 1.0)))
        s = tl.maximum(a, 0.0) + log1p
        d1 = sig
        d2 = sig * one_minus
    elif ACT == 1:  # tanh(|a|) = (1 - e^2) / (1 + e^2); odd Taylor series near 0 (cancellation)
        ab = tl.abs(a)
        e2 = e * e
        big = (1.0 - e2) / (1.0 + e2)
        a2 = ab * ab
        small = ab * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333
                                                              + a2 * -0.05396825396825397)))
        th = tl.where(ab < 0.125, small, big)  # series error < 2e-10 relative below 0.125
        s = tl.where(a < 0, -th, th)
        d1 = 1.0 - s * s
        d2 = -2.0 * s * d1
    else:  # silu = a sigmoid(a)
        s = a * sig
        d1 = sig * (1.0 + a * one_minus)
        d2 = sig * one_minus * (2.0 + a * (one_minus - sig))
    return s, d1, d2


@triton.jit
def _tile_ptrs(ws, slot, col0, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
               H_PAD: tl.constexpr):
    """Pointers of the (BLOCK_M, BLOCK_H) column tile at col0 of workspace slot `slot`."""
    rm = tl.arange(0, BLOCK_M)
    rh = col0 + tl.arange(0, BLOCK_H)
    return ws + slot * (BLOCK_M * H_PAD) + rm[:, None] * H_PAD + rh[None, :]


@triton.jit
def _tile_ptrs_t(ws, slot, col0, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                 H_PAD: tl.constexpr):
    """Pointers of the same tile transposed, (BLOCK_H, BLOCK_M): the A operand of dW GEMMs."""
    rm = tl.arange(0, BLOCK_M)
    rh = col0 + tl.arange(0, BLOCK_H)
    return ws + slot * (BLOCK_M * H_PAD) + rm[None, :] * H_PAD + rh[:, None]


@triton.jit
def load_input(x_ptr, t_ptr, rows, N, D, stride_xn, stride_xd, stride_tn, D_PAD: tl.constexpr):
    """z = [x, t] zero-padded to (BLOCK_M, D_PAD) (rows >= N are zero); rows are int64."""
    rd = tl.arange(0, D_PAD)
    row_ok = rows < N
    x = tl.load(x_ptr + rows[:, None] * stride_xn + rd[None, :] * stride_xd,
                mask=row_ok[:, None] & (rd[None, :] < D), other=0.0)
    t = tl.load(t_ptr + rows * stride_tn, mask=row_ok, other=0.0)
    return x + tl.where(rd[None, :] == D, t[:, None], 0.0), t


@triton.jit
def up_sweep(z0, ws, A0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr,
             D_PAD: tl.constexpr, N_HIDDEN: tl.constexpr, ACT: tl.constexpr,
             PRECISION: tl.constexpr):
    """Store a_k in slots A0 + k; return u (BLOCK_M,)."""
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, D_PAD)
    for n0 in range(0, H_PAD, BLOCK_H):
        w1t = tl.load(w1_ptr + (n0 + rh)[None, :] * D_PAD + rd[:, None])   # W_0[n0:, :]^T
        a = tl.dot(z0, w1t, input_precision=PRECISION) + tl.load(b_ptr + n0 + rh)[None, :]
        tl.store(_tile_ptrs(ws, A0, n0, BLOCK_M, BLOCK_H, H_PAD), a)
    tl.debug_barrier()
    for k in range(1, N_HIDDEN):
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        for n0 in range(0, H_PAD, BLOCK_H):
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for j0 in range(0, H_PAD, BLOCK_H):
                a_in = tl.load(_tile_ptrs(ws, A0 + k - 1, j0, BLOCK_M, BLOCK_H, H_PAD))
                z, _, _ = _activation(a_in, ACT)
                wt = tl.load(w_k + (n0 + rh)[None, :] * H_PAD + (j0 + rh)[:, None])
                acc += tl.dot(z, wt, input_precision=PRECISION)
            acc += tl.load(b_ptr + k * H_PAD + n0 + rh)[None, :]
            tl.store(_tile_ptrs(ws, A0 + k, n0, BLOCK_M, BLOCK_H, H_PAD), acc)
        tl.debug_barrier()
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, H_PAD, BLOCK_H):
        z, _, _ = _activation(tl.load(_tile_ptrs(ws, A0 + N_HIDDEN - 1, j0, BLOCK_M, BLOCK_H,
                                                 H_PAD)), ACT)
        u += tl.sum(z * tl.load(wo_ptr + j0 + rh)[None, :], axis=1)
    return u + tl.load(c_ptr)


@triton.jit
def tangent_sweep(zdot0, ws, A0, T0, w1_ptr, wh_ptr,
                  BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr,
                  D_PAD: tl.constexpr, N_HIDDEN: tl.constexpr, ACT: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Store adot_k in slots T0 + k (needs a_k in slots A0 + k)."""
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, D_PAD)
    for n0 in range(0, H_PAD, BLOCK_H):
        w1t = tl.load(w1_ptr + (n0 + rh)[None, :] * D_PAD + rd[:, None])
        tl.store(_tile_ptrs(ws, T0, n0, BLOCK_M, BLOCK_H, H_PAD),
                 tl.dot(zdot0, w1t, input_precision=PRECISION))
    tl.debug_barrier()
    for k in range(1, N_HIDDEN):
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        for n0 in range(0, H_PAD, BLOCK_H):
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for j0 in range(0, H_PAD, BLOCK_H):
                _, d1, _ = _activation(tl.load(_tile_ptrs(ws, A0 + k - 1, j0, BLOCK_M, BLOCK_H,
                                                          H_PAD)), ACT)
                zdot = d1 * tl.load(_tile_ptrs(ws, T0 + k - 1, j0, BLOCK_M, BLOCK_H, H_PAD))
                wt = tl.load(w_k + (n0 + rh)[None, :] * H_PAD + (j0 + rh)[:, None])
                acc += tl.dot(zdot, wt, input_precision=PRECISION)
            tl.store(_tile_ptrs(ws, T0 + k, n0, BLOCK_M, BLOCK_H, H_PAD), acc)
        tl.debug_barrier()


@triton.jit
def _adjoint_preactivation(ws, k, zb_slot, gb_ptr, A0, G0, T0, AB,
                           BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr,
                           ACT: tl.constexpr, SECOND: tl.constexpr, ACCUM: tl.constexpr):
    """abar_k = zbar_k s'(a_k) [+ g_k s''(a_k) adot_k] into slot AB; db_k += column sums."""
    rh = tl.arange(0, BLOCK_H)
    for n0 in range(0, H_PAD, BLOCK_H):
        _, d1, d2 = _activation(tl.load(_tile_ptrs(ws, A0 + k, n0, BLOCK_M, BLOCK_H, H_PAD)), ACT)
        abar = tl.load(_tile_ptrs(ws, zb_slot, n0, BLOCK_M, BLOCK_H, H_PAD)) * d1
        if SECOND:
            abar += (tl.load(_tile_ptrs(ws, G0 + k, n0, BLOCK_M, BLOCK_H, H_PAD)) * d2
                     * tl.load(_tile_ptrs(ws, T0 + k, n0, BLOCK_M, BLOCK_H, H_PAD)))
        tl.store(_tile_ptrs(ws, AB, n0, BLOCK_M, BLOCK_H, H_PAD), abar)
        if ACCUM:
            tl.atomic_add(gb_ptr + k * H_PAD + n0 + rh, tl.sum(abar, axis=0))


@triton.jit
def _delta_t(ws, k, i0, A0, G0, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
             H_PAD: tl.constexpr, ACT: tl.constexpr):
    """delta_k^T = (g_k s'(a_k))^T for columns i0: (BLOCK_H, BLOCK_M)."""
    _, d1, _ = _activation(tl.load(_tile_ptrs_t(ws, A0 + k, i0, BLOCK_M, BLOCK_H, H_PAD)), ACT)
    return tl.load(_tile_ptrs_t(ws, G0 + k, i0, BLOCK_M, BLOCK_H, H_PAD)) * d1


@triton.jit
def _zbar_slot(k, G0, ZB0, STORE_G: tl.constexpr):
    """Where zbar_k lives: kept per layer (G0 + k) when it is g_k, else two ping-pong slots."""
    if STORE_G:
        slot = G0 + k
    else:
        slot = ZB0 + k % 2
    return slot


@triton.jit
def down_sweep(ubar, z0, zdot0, ws, w1_ptr, wh_ptr, wo_ptr,
               gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               A0, G0, T0, ZB0, AB,
               BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr,
               D_PAD: tl.constexpr, N_HIDDEN: tl.constexpr, ACT: tl.constexpr,
               PRECISION: tl.constexpr, STORE_G: tl.constexpr, SECOND: tl.constexpr,
               ACCUM: tl.constexpr):
    """Reverse sweep for the cotangent ubar (BLOCK_M,) (and the tangent in slots T0, SECOND);
    returns zbar of the input [x, t], (BLOCK_M, D_PAD). STORE_G keeps zbar_k in slots G0 + k;
    ACCUM adds the parameter gradients into gw1/gwh/gb/gwo/gc (fp32 atomics)."""
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, D_PAD)
    top = N_HIDDEN - 1
    # the output layer: zbar_{L-1} = ubar w, dw += ubar z_{L-1} [+ zdot_{L-1}], dc += ubar
    for n0 in range(0, H_PAD, BLOCK_H):
        wo = tl.load(wo_ptr + n0 + rh)
        tl.store(_tile_ptrs(ws, _zbar_slot(top, G0, ZB0, STORE_G), n0, BLOCK_M, BLOCK_H, H_PAD),
                 ubar[:, None] * wo[None, :])
        if ACCUM:
            z, d1, _ = _activation(tl.load(_tile_ptrs(ws, A0 + top, n0, BLOCK_M, BLOCK_H, H_PAD)),
                                   ACT)
            gwo = tl.sum(ubar[:, None] * z, axis=0)
            if SECOND:
                gwo += tl.sum(d1 * tl.load(_tile_ptrs(ws, T0 + top, n0, BLOCK_M, BLOCK_H, H_PAD)),
                              axis=0)
            tl.atomic_add(gwo_ptr + n0 + rh, gwo)
    if ACCUM:
        tl.atomic_add(gc_ptr, tl.sum(ubar, axis=0))
    tl.debug_barrier()
    # hidden-to-hidden layers k = L-1 .. 1
    for kk in range(0, N_HIDDEN - 1):
        k = top - kk
        _adjoint_preactivation(ws, k, _zbar_slot(k, G0, ZB0, STORE_G), gb_ptr, A0, G0, T0, AB,
                               BLOCK_M, BLOCK_H, H_PAD, ACT, SECOND, ACCUM)
        tl.debug_barrier()
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        if ACCUM:  # dW_k += abar_k^T z_{k-1} [+ delta_k^T zdot_{k-1}]
            gw_k = gwh_ptr + (k - 1) * (H_PAD * H_PAD)
            for i0 in range(0, H_PAD, BLOCK_H):
                abar_t = tl.load(_tile_ptrs_t(ws, AB, i0, BLOCK_M, BLOCK_H, H_PAD))
                if SECOND:
                    delta_t = _delta_t(ws, k, i0, A0, G0, BLOCK_M, BLOCK_H, H_PAD, ACT)
                for j0 in range(0, H_PAD, BLOCK_H):
                    z, d1, _ = _activation(
                        tl.load(_tile_ptrs(ws, A0 + k - 1, j0, BLOCK_M, BLOCK_H, H_PAD)), ACT)
                    acc = tl.dot(abar_t, z, input_precision=PRECISION)
                    if SECOND:
                        zdot = d1 * tl.load(_tile_ptrs(ws, T0 + k - 1, j0, BLOCK_M, BLOCK_H, H_PAD))
                        acc += tl.dot(delta_t, zdot, input_precision=PRECISION)
                    tl.atomic_add(gw_k + (i0 + rh)[:, None] * H_PAD + (j0 + rh)[None, :], acc)
        # zbar_{k-1} = abar_k W_k
        for j0 in range(0, H_PAD, BLOCK_H):
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for i0 in range(0, H_PAD, BLOCK_H):
                abar = tl.load(_tile_ptrs(ws, AB, i0, BLOCK_M, BLOCK_H, H_PAD))
                w = tl.load(w_k + (i0 + rh)[:, None] * H_PAD + (j0 + rh)[None, :])
                acc += tl.dot(abar, w, input_precision=PRECISION)
            tl.store(_tile_ptrs(ws, _zbar_slot(k - 1, G0, ZB0, STORE_G), j0, BLOCK_M, BLOCK_H,
                                H_PAD), acc)
        tl.debug_barrier()
    # the input layer k = 0: its input [x, t] (and tangent [pbar, 0]) are register tiles
    _adjoint_preactivation(ws, 0, _zbar_slot(0, G0, ZB0, STORE_G), gb_ptr, A0, G0, T0, AB,
                           BLOCK_M, BLOCK_H, H_PAD, ACT, SECOND, ACCUM)
    tl.debug_barrier()
    zbar0 = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for i0 in range(0, H_PAD, BLOCK_H):
        if ACCUM:
            abar_t = tl.load(_tile_ptrs_t(ws, AB, i0, BLOCK_M, BLOCK_H, H_PAD))
            acc = tl.dot(abar_t, z0, input_precision=PRECISION)
            if SECOND:
                delta_t = _delta_t(ws, 0, i0, A0, G0, BLOCK_M, BLOCK_H, H_PAD, ACT)
                acc += tl.dot(delta_t, zdot0, input_precision=PRECISION)
            tl.atomic_add(gw1_ptr + (i0 + rh)[:, None] * D_PAD + rd[None, :], acc)
        abar = tl.load(_tile_ptrs(ws, AB, i0, BLOCK_M, BLOCK_H, H_PAD))
        w1 = tl.load(w1_ptr + (i0 + rh)[:, None] * D_PAD + rd[None, :])
        zbar0 += tl.dot(abar, w1, input_precision=PRECISION)
    tl.debug_barrier()  # the caller's next phase may overwrite AB
    return zbar0


# ----------------------------------------------------------------------------- host side
class MLPLayout(NamedTuple):
    """How a PotentialMLP's parameters map onto the kernels' padded buffers."""

    dim: int                  # d
    widths: tuple             # hidden widths (h_1, ..., h_L)
    n_hidden: int             # L
    h_pad: int                # hidden widths padded to a multiple of block_h
    d_pad: int                # d + 1 padded to a power of two >= 16
    block_h: int              # tile width of every hidden-layer GEMM
    act: int                  # ACTIVATION_CODES value


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _fallback(reason: str) -> ValueError:
    return ValueError(f"{reason}; use backend='torch' (the same fused algorithm in torch ops) "
                      "for this model")


def _on_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mlp_layout(params, act: str, x: torch.Tensor, t: torch.Tensor) -> MLPLayout:
    """Check params (W_1, b_1, ..., W_{L+1}, b_{L+1}), x (N, d), t (N, 1); return the layout.

    Raises ValueError naming the torch backend for anything the kernels do not support.
    """
    if act not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATION_CODES)}, got {act!r}")
    if len(params) < 4 or len(params) % 2:
        raise ValueError(f"params must be (W_1, b_1, ..., W_{{L+1}}, b_{{L+1}}) with at least one "
                         f"hidden layer, got {len(params)} tensors")
    if x.dim() != 2 or t.dim() != 2 or t.shape != (x.shape[0], 1):
        raise ValueError(f"x must be (N, d) and t (N, 1), got {tuple(x.shape)} and {tuple(t.shape)}")
    for tensor in (x, t, *params):
        if tensor.dtype != torch.float32:
            raise _fallback(f"the triton kernels compute in float32, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, got one on {tensor.device}")
    if x.device.type != "cuda" and not _on_interpreter():
        raise _fallback(f"the triton backend needs CUDA tensors (got {x.device}; on CPU only "
                        "under TRITON_INTERPRET=1)")
    d = x.shape[1]
    widths = tuple(params[2 * k].shape[0] for k in range(len(params) // 2 - 1))
    fan_in = (d + 1,) + widths
    for k, (w, b) in enumerate(zip(params[0::2], params[1::2])):
        out = widths[k] if k < len(widths) else 1
        if w.shape != (out, fan_in[k]) or b.shape != (out,):
            raise ValueError(f"layer {k + 1}: expected weight {(out, fan_in[k])} and bias "
                             f"{(out,)}, got {tuple(w.shape)} and {tuple(b.shape)}")
    if d + 1 > MAX_INPUT:
        raise _fallback(f"the triton kernels support d + 1 <= {MAX_INPUT}, got d = {d}")
    if max(widths) > MAX_WIDTH:
        raise _fallback(f"the triton kernels support hidden widths <= {MAX_WIDTH}, "
                        f"got {max(widths)}")
    # tiles of 64 columns: 64x64 fp32 weight tiles are 16 KB, a dot shape wgmma runs at full
    # rate; narrower networks use one power-of-two tile >= 16 (the minimum tl.dot dimension)
    block_h = min(64, max(16, _next_pow2(max(widths))))
    h_pad = -(-max(widths) // block_h) * block_h
    return MLPLayout(d, widths, len(widths), h_pad, max(16, _next_pow2(d + 1)), block_h,
                     ACTIVATION_CODES[act])


def pack_params(params, layout: MLPLayout):
    """(w1 (H_PAD, D_PAD), wh (max(L-1, 1), H_PAD, H_PAD), b (L, H_PAD), wo (H_PAD,), c (1,)),
    zero-padded fp32 copies of the parameters."""
    h, dp, L = layout.h_pad, layout.d_pad, layout.n_hidden
    ref = params[0]
    w1 = ref.new_zeros(h, dp)
    wh = ref.new_zeros(max(L - 1, 1), h, h)
    b = ref.new_zeros(L, h)
    wo = ref.new_zeros(h)
    with torch.no_grad():
        w1[:layout.widths[0], :layout.dim + 1] = params[0]
        for k in range(L):
            b[k, :layout.widths[k]] = params[2 * k + 1]
            if k > 0:
                wh[k - 1, :layout.widths[k], :layout.widths[k - 1]] = params[2 * k]
        wo[:layout.widths[-1]] = params[-2][0]
        c = params[-1].detach().reshape(1).contiguous()
    return w1, wh, b, wo, c


def unpack_grads(grads, layout: MLPLayout):
    """Slice the padded gradient buffers back to the parameters' shapes (the inverse of pack)."""
    gw1, gwh, gb, gwo, gc = grads
    L, widths = layout.n_hidden, layout.widths
    out = []
    for k in range(L):
        if k == 0:
            out.append(gw1[:widths[0], :layout.dim + 1])
        else:
            out.append(gwh[k - 1, :widths[k], :widths[k - 1]])
        out.append(gb[k, :widths[k]])
    out.append(gwo[:widths[-1]].unsqueeze(0))
    out.append(gc)
    return out


def zeros_like_packed(packed):
    return tuple(torch.zeros_like(p) for p in packed)


_SM_COUNT: dict = {}


def launch_config(n_rows: int, layout: MLPLayout, n_slots: int, device: torch.device):
    """(BLOCK_M, number of programs, num_warps, workspace) for one launch.

    BLOCK_M = 64: the M of one Hopper warpgroup MMA (wgmma m64nNk8) and >= 16 as the K of the
    weight-gradient dots. Programs: a persistent grid of 2 per SM (two CTAs hide each other's
    barriers), so the workspace is sized by the GPU, not by N; under the interpreter 2 programs,
    which still exercises the persistent loop. No autotuning: the backward kernels accumulate
    into their outputs with atomics, which autotune's repeated launches would double-count.
    """
    block_m = 64
    n_blocks = max(1, -(-n_rows // block_m))
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        cap = 2 * _SM_COUNT[device]
    else:
        cap = 2
    programs = min(n_blocks, cap)
    workspace = torch.empty(programs * n_slots * block_m * layout.h_pad, dtype=torch.float32,
                            device=device)
    return block_m, programs, 4, workspace
