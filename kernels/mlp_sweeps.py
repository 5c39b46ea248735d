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

Fusion plan. Hidden widths are zero-padded to H_PAD, a multiple of the tile width BLOCK_H (32;
16 for width <= 16), and [x, t] to D_PAD (a power of two >= 16, tiles of BLOCK_D <= 32); padded
units have zero weights, so they contribute nothing. A layer's activations never sit in
registers whole: every GEMM streams (BLOCK_H, BLOCK_H) weight tiles and BLOCK_H-wide column
tiles of the per-row vectors (a_k, adot_k, g_k, zbar_k, abar_k, [x, t], ...) through a
per-program workspace of (slots, BLOCK_M, max(H_PAD, D_PAD)) fp32 tiles, which is what lets
256-wide layers (one fp32 weight matrix = 256 KB > 227 KB of shared memory) compile. One
program handles one 64-row block; a launch has at most PROGRAMS_PER_SM (3) programs per SM and
the launcher loops over launches, so the workspace is sized by the GPU, not by N: no
(N, width) tensor is written to global memory. The workspace itself (110-441 MB on an H100,
launch_config has the arithmetic) is far larger than L2: it lives in HBM. Tiles are written in
one register layout and read back in another, so a tl.debug_barrier() (bar.sync) separates
every producer phase from its consumers.

Weight gradients. Every program adds its row block's contribution to every weight and bias
with relaxed fp32 atomic adds (red.global.add, no acquire/release fence: nothing reads the
gradients until the launch ends), visiting a layer's (64, BLOCK_H) tiles in an order rotated by
its program id, so that the ~3 programs per SM x 132 SMs of a launch start on different tiles
(64 tiles per layer at width 256) instead of queueing on the same L2 lines. Per-program
partial gradients reduced afterwards would avoid the contention altogether but cost one
gradient copy per resident program (396 x 660 KB = 261 MB at width 256, d = 64) and a
reduction pass; with the rotation the atomics' traffic (one add per weight per row block and
accumulating sweep: ~340 M adds for d = 64, width 256, 65,536 rows in the residual backward)
spreads over the L2 slices, so the shared buffer is the default. Atomics make the summation
order, hence the last bits, vary between runs; ``deterministic=True`` points every program at
its own copy (grad_buffers: stride grad_pstride), where its adds land in program order, and
reduces the copies in a fixed order (reduce_grads): bitwise-identical gradients run to run,
for that memory.

Register budget (sm_90a has 255 per thread; tests/test_sm90_compile.py checks every kernel):
  * workspace and weight offsets are int64 tiles: with int32 offsets every 128-bit vector of a
    tile needs its own sign-extended 64-bit address per slot, which the compiler keeps live
    across whole phases (~80 registers); int64 offsets fold the row steps and slot offsets
    into the load's immediate, one address per tile;
  * the backward kernels use tiles of 16 columns, BLOCK_H = BLOCK_D = 16
    (block_constexprs(..., backward=True)): every elementwise activation then holds 8 elements
    per thread instead of 16 (the tanh/softplus temporaries were the peaks), and so does every
    [x, t]-sized tile next to the per-row scalars of the power cost;
  * the weight-gradient GEMMs take plain workspace tiles: the down sweep stages
    delta_k = g_k s'(a_k) (over zbar_k, in place), z_{k-1} = s(a_{k-1}) (in the free zbar
    ping-pong slot) and zdot_{k-1} = s'(a_{k-1}) adot_{k-1} (in the input-adjoint slot, written
    only at the end) once per layer, instead of re-evaluating activations inside every dot;
    and they compute 64-row output tiles (WGRAD_COLS) so that the product is a wgmma, not an
    mma.sync with its operands replicated in every warp's registers.

tl.dot input precision: "tf32x3" by default (three TF32 tensor-core products, fp32-level
accuracy; plain "ieee" fp32 compiles to FMA loops without tensor cores on Hopper); "tf32" is the
opt-in fast mode (one product, ~1e-3 relative error, see :func:`set_dot_precision`).
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ACTIVATION_CODES", "MLPLayout", "mlp_layout", "pack_params", "unpack_grads",
           "launch_config", "grad_buffers", "reduce_grads", "device_guard",
           "unit_feature_stride", "set_dot_precision", "dot_precision", "MAX_WIDTH", "MAX_INPUT",
           "PROGRAMS_PER_SM", "THREE_PER_SM_REGISTERS", "LAUNCH_OPTIONS", "BATCH_ARGS"]

ACTIVATION_CODES = {"softplus": 0, "tanh": 1, "silu": 2}
QUADRATIC, POWER = 0, 1
# Weight-gradient tiles dW[i0:i0+64, j0:j0+w] = sum over rows of abar^T z: 64 output rows make
# the product a Hopper warpgroup MMA (wgmma m64; fewer rows fall back to mma.sync, whose
# operands sit in registers, replicated across the 4 warps, which spilled), summed over the
# row block in chunks of 32 rows (fewer registers than 16- or 64-row chunks on sm_90a).
WGRAD_COLS = tl.constexpr(64)
WGRAD_ROWS = tl.constexpr(32)

# Widths above this need a workspace of (programs, slots, 64, width) fp32 tiles large enough
# (> 100 MB at 512 for a 3-layer backward) that the torch backend's cuBLAS GEMMs are the better tool.
MAX_WIDTH = 512
# d + 1 <= 128: [x, t] is one (BLOCK_M, D_PAD) register tile; 256 would spill.
MAX_INPUT = 128

# Integer kernel arguments whose value can change with the batch: @triton.jit(do_not_specialize=
# ...) so that Triton does not compile a kernel per value class (== 1, divisible by 16), which
# made a batch above 16,896 rows compile each kernel twice. (grad_pstride is fixed per model and
# padded to a multiple of 16, so its specialisation is kept: it makes the deterministic mode's
# gradient adds 128-bit vector atomics.)
BATCH_ARGS = ("N", "block_start", "stride_tn")

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
    elif ACT == 1:  # tanh(|a|) = -m / (2 + m), m = expm1(-2|a|) by Kahan's exp(y)-1 = (u-1) y / log u
        y = -2.0 * tl.abs(a)
        u = tl.exp(y)
        m = tl.where(u == 1.0, y, (u - 1.0) * (y / tl.log(tl.where(u > 0.0, u, 1.0))))
        # |a| > 9: 1 - tanh = 2e^-18 < half an fp32 ulp of 1 (and exp(y) nears the denormals)
        th = tl.where(y < -18.0, 1.0, -m / (2.0 + m))
        s = tl.where(a < 0, -th, th)
        d1 = 4.0 * u / ((1.0 + u) * (1.0 + u))  # sech^2 without the cancellation of 1 - tanh^2
        d2 = -2.0 * s * d1
    else:  # silu = a sigmoid(a)
        s = a * sig
        d1 = sig * (1.0 + a * one_minus)
        d2 = sig * one_minus * (2.0 + a * (one_minus - sig))
    return s, d1, d2


@triton.jit
def tile(ws, slot, col0, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, SLOT_W: tl.constexpr):
    """Pointers of the (BLOCK_M, WIDTH) column tile at col0 of workspace slot `slot`; every
    slot is a (BLOCK_M, SLOT_W) row-major fp32 tile."""
    # scalar base + one int64 offset tile shared by every call (CSE): the row steps fold into
    # the loads' immediates, so no per-vector, per-slot pointers stay alive in registers
    offs = tl.arange(0, BLOCK_M).to(tl.int64)[:, None] * SLOT_W + tl.arange(0, WIDTH)[None, :]
    return (ws + (slot * (BLOCK_M * SLOT_W) + col0)) + offs


@triton.jit
def _weight_tile(w_ptr, r0, c0, LD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                 TRANS: tl.constexpr):
    """Pointers of W[r0:r0+ROWS, c0:c0+COLS] of a row-major matrix with row length LD, or of
    its transpose (COLS, ROWS) with TRANS."""
    if TRANS:
        offs = tl.arange(0, ROWS).to(tl.int64)[None, :] * LD + tl.arange(0, COLS)[:, None]
    else:
        offs = tl.arange(0, ROWS).to(tl.int64)[:, None] * LD + tl.arange(0, COLS)[None, :]
    return (w_ptr + (r0 * LD + c0)) + offs


@triton.jit
def program_grads(gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr, grad_pstride,
                  DETERMINISTIC: tl.constexpr):
    """This program's gradient buffers: the shared ones, or with DETERMINISTIC its own copy,
    copy pid of a (programs, grad_pstride) buffer (see grad_buffers). A constexpr, not just a
    zero stride: five pointers computed at run time instead of read from the kernel parameters
    cost the shared-buffer kernels ~60 registers (residual_bwd: 168 -> 230 on sm_90a)."""
    if DETERMINISTIC:
        off = tl.program_id(0).to(tl.int64) * grad_pstride
        gw1_ptr += off
        gwh_ptr += off
        gb_ptr += off
        gwo_ptr += off
        gc_ptr += off
    return gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr


@triton.jit
def stage_rows(ws, slot, src_ptr, t_ptr, rows, N, D, stride_n, stride_d, stride_tn,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr,
               SLOT_W: tl.constexpr, WITH_T: tl.constexpr):
    """Copy rows of src (N, D) into slot as [src, t] (WITH_T) or [src, 0], zero-padded to D_PAD;
    rows >= N are zero. Returns t (BLOCK_M,) (zeros without WITH_T)."""
    row_ok = rows < N
    if WITH_T:
        t = tl.load(t_ptr + rows * stride_tn, mask=row_ok, other=0.0)
    else:
        t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(src_ptr + rows[:, None] * stride_n + rd[None, :] * stride_d,
                    mask=row_ok[:, None] & (rd[None, :] < D), other=0.0)
        v += tl.where(rd[None, :] == D, t[:, None], 0.0)
        tl.store(tile(ws, slot, d0, BLOCK_M, BLOCK_D, SLOT_W), v)
    tl.debug_barrier()
    return t


@triton.jit
def up_sweep(ws, Z, A0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
             H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr,
             N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr):
    """a_k = W_k z_{k-1} + b_k into slots A0 + k, from the input [x, t] in slot Z; returns u."""
    rh = tl.arange(0, BLOCK_H)
    for n0 in range(0, H_PAD, BLOCK_H):
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D_PAD, BLOCK_D):
            z = tl.load(tile(ws, Z, d0, BLOCK_M, BLOCK_D, SLOT_W))
            w1t = tl.load(_weight_tile(w1_ptr, n0, d0, D_PAD, BLOCK_H, BLOCK_D, True))
            acc += tl.dot(z, w1t, input_precision=PRECISION)
        acc += tl.load(b_ptr + n0 + rh)[None, :]
        tl.store(tile(ws, A0, n0, BLOCK_M, BLOCK_H, SLOT_W), acc)
    tl.debug_barrier()
    for k in range(1, N_HIDDEN):
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        for n0 in range(0, H_PAD, BLOCK_H):
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for j0 in range(0, H_PAD, BLOCK_H):
                z, _, _ = _activation(tl.load(tile(ws, A0 + k - 1, j0, BLOCK_M, BLOCK_H, SLOT_W)),
                                      ACT)
                wt = tl.load(_weight_tile(w_k, n0, j0, H_PAD, BLOCK_H, BLOCK_H, True))
                acc += tl.dot(z, wt, input_precision=PRECISION)
            acc += tl.load(b_ptr + k * H_PAD + n0 + rh)[None, :]
            tl.store(tile(ws, A0 + k, n0, BLOCK_M, BLOCK_H, SLOT_W), acc)
        tl.debug_barrier()
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, H_PAD, BLOCK_H):
        z, _, _ = _activation(tl.load(tile(ws, A0 + N_HIDDEN - 1, j0, BLOCK_M, BLOCK_H, SLOT_W)),
                              ACT)
        u += tl.sum(z * tl.load(wo_ptr + j0 + rh)[None, :], axis=1)
    return u + tl.load(c_ptr)


@triton.jit
def tangent_sweep(ws, ZD, A0, T0, w1_ptr, wh_ptr,
                  BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr,
                  N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr):
    """adot_k into slots T0 + k from zdot_{-1} in slot ZD (needs a_k in slots A0 + k)."""
    rh = tl.arange(0, BLOCK_H)
    for n0 in range(0, H_PAD, BLOCK_H):
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D_PAD, BLOCK_D):
            zdot = tl.load(tile(ws, ZD, d0, BLOCK_M, BLOCK_D, SLOT_W))
            w1t = tl.load(_weight_tile(w1_ptr, n0, d0, D_PAD, BLOCK_H, BLOCK_D, True))
            acc += tl.dot(zdot, w1t, input_precision=PRECISION)
        tl.store(tile(ws, T0, n0, BLOCK_M, BLOCK_H, SLOT_W), acc)
    tl.debug_barrier()
    for k in range(1, N_HIDDEN):
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        for n0 in range(0, H_PAD, BLOCK_H):
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for j0 in range(0, H_PAD, BLOCK_H):
                _, d1, _ = _activation(tl.load(tile(ws, A0 + k - 1, j0, BLOCK_M, BLOCK_H, SLOT_W)),
                                       ACT)
                zdot = d1 * tl.load(tile(ws, T0 + k - 1, j0, BLOCK_M, BLOCK_H, SLOT_W))
                wt = tl.load(_weight_tile(w_k, n0, j0, H_PAD, BLOCK_H, BLOCK_H, True))
                acc += tl.dot(zdot, wt, input_precision=PRECISION)
            tl.store(tile(ws, T0 + k, n0, BLOCK_M, BLOCK_H, SLOT_W), acc)
        tl.debug_barrier()


@triton.jit
def _adjoint_preactivation(ws, k, zb_slot, gb_ptr, A0, G0, T0, AB, ZS, ZDS,
                           BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, H_PAD: tl.constexpr,
                           SLOT_W: tl.constexpr, ACT: tl.constexpr, SECOND: tl.constexpr,
                           ACCUM: tl.constexpr, STAGE_IN: tl.constexpr):
    """abar_k = zbar_k s'(a_k) [+ g_k s''(a_k) adot_k] into slot AB; with ACCUM db_k += its
    column sums and the weight-gradient operands are staged as plain tiles: [delta_k =
    g_k s'(a_k) over zbar_k in zb_slot (SECOND)], and with STAGE_IN the layer input
    z_{k-1} = s(a_{k-1}) into slot ZS [and zdot_{k-1} = s'(a_{k-1}) adot_{k-1} into ZDS]."""
    rh = tl.arange(0, BLOCK_H)
    for n0 in range(0, H_PAD, BLOCK_H):
        _, d1, d2 = _activation(tl.load(tile(ws, A0 + k, n0, BLOCK_M, BLOCK_H, SLOT_W)), ACT)
        zb_ptrs = tile(ws, zb_slot, n0, BLOCK_M, BLOCK_H, SLOT_W)
        abar = tl.load(zb_ptrs) * d1
        if SECOND:
            g = tl.load(tile(ws, G0 + k, n0, BLOCK_M, BLOCK_H, SLOT_W))
            abar += g * d2 * tl.load(tile(ws, T0 + k, n0, BLOCK_M, BLOCK_H, SLOT_W))
            if ACCUM:  # in place: every thread rewrites only the zbar_k elements it just read
                tl.store(zb_ptrs, g * d1)
        tl.store(tile(ws, AB, n0, BLOCK_M, BLOCK_H, SLOT_W), abar)
        if ACCUM:
            tl.atomic_add(gb_ptr + k * H_PAD + n0 + rh, tl.sum(abar, axis=0), sem="relaxed")
    if ACCUM and STAGE_IN:  # a loop of its own: one activation's temporaries live at a time
        for n0 in range(0, H_PAD, BLOCK_H):
            z, e1, _ = _activation(tl.load(tile(ws, A0 + k - 1, n0, BLOCK_M, BLOCK_H, SLOT_W)),
                                   ACT)
            tl.store(tile(ws, ZS, n0, BLOCK_M, BLOCK_H, SLOT_W), z)
            if SECOND:
                tl.store(tile(ws, ZDS, n0, BLOCK_M, BLOCK_H, SLOT_W),
                         e1 * tl.load(tile(ws, T0 + k - 1, n0, BLOCK_M, BLOCK_H, SLOT_W)))


@triton.jit
def _row_tile(ws, slot, m0, col0, ROWS: tl.constexpr, WIDTH: tl.constexpr,
              BLOCK_M: tl.constexpr, SLOT_W: tl.constexpr):
    """Pointers of rows m0:m0+ROWS, columns col0:col0+WIDTH of workspace slot `slot`."""
    offs = tl.arange(0, ROWS).to(tl.int64)[:, None] * SLOT_W + tl.arange(0, WIDTH)[None, :]
    return (ws + (slot * (BLOCK_M * SLOT_W) + m0 * SLOT_W + col0)) + offs


@triton.jit
def _weight_grad_tile(ws, AB, DELTA, ZIN, ZDIN, i0, j0, gw_ptr, LD: tl.constexpr,
                      BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, H_PAD: tl.constexpr,
                      SLOT_W: tl.constexpr, PRECISION: tl.constexpr, SECOND: tl.constexpr):
    """gw[i0:i0+WGRAD_COLS, j0:j0+WIDTH] += abar^T zin [+ delta^T zdin] over the block's rows:
    abar, delta columns i0.. of slots AB, DELTA (columns >= H_PAD masked to zero), zin, zdin
    columns j0.. of slots ZIN, ZDIN; every operand a plain workspace tile."""
    ri = i0 + tl.arange(0, WGRAD_COLS)
    i_ok = ri < H_PAD
    acc = tl.zeros((WGRAD_COLS, WIDTH), dtype=tl.float32)
    for m0 in range(0, BLOCK_M, WGRAD_ROWS):
        abar = tl.load(_row_tile(ws, AB, m0, i0, WGRAD_ROWS, WGRAD_COLS, BLOCK_M, SLOT_W),
                       mask=i_ok[None, :], other=0.0)
        z = tl.load(_row_tile(ws, ZIN, m0, j0, WGRAD_ROWS, WIDTH, BLOCK_M, SLOT_W))
        acc += tl.dot(tl.trans(abar), z, input_precision=PRECISION)
        if SECOND:
            delta = tl.load(_row_tile(ws, DELTA, m0, i0, WGRAD_ROWS, WGRAD_COLS, BLOCK_M, SLOT_W),
                            mask=i_ok[None, :], other=0.0)
            zdot = tl.load(_row_tile(ws, ZDIN, m0, j0, WGRAD_ROWS, WIDTH, BLOCK_M, SLOT_W))
            acc += tl.dot(tl.trans(delta), zdot, input_precision=PRECISION)
    tl.atomic_add(_weight_tile(gw_ptr, i0, j0, LD, WGRAD_COLS, WIDTH, False), acc,
                  mask=i_ok[:, None], sem="relaxed")


@triton.jit
def _weight_grads(ws, AB, DELTA, ZIN, ZDIN, gw_ptr, LD: tl.constexpr, IN_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, H_PAD: tl.constexpr,
                  SLOT_W: tl.constexpr, PRECISION: tl.constexpr, SECOND: tl.constexpr):
    """Every (WGRAD_COLS, WIDTH) tile of one layer's weight gradient gw (H_PAD, IN_PAD), in an
    order rotated by the program id: concurrent programs start on different tiles, so their
    atomic adds spread over the layer's tiles instead of queueing on the same L2 lines."""
    n_j: tl.constexpr = IN_PAD // WIDTH
    n_tiles: tl.constexpr = ((H_PAD + WGRAD_COLS - 1) // WGRAD_COLS) * n_j
    first = tl.program_id(0) % n_tiles
    for step in range(0, n_tiles):
        idx = first + step
        idx = tl.where(idx >= n_tiles, idx - n_tiles, idx)
        _weight_grad_tile(ws, AB, DELTA, ZIN, ZDIN, (idx // n_j) * WGRAD_COLS,
                          (idx % n_j) * WIDTH, gw_ptr, LD, BLOCK_M, WIDTH, H_PAD, SLOT_W,
                          PRECISION, SECOND)


@triton.jit
def _zbar_slot(k, G0, ZB0, STORE_G: tl.constexpr):
    """Where zbar_k lives: kept per layer (G0 + k) when it is g_k, else two ping-pong slots."""
    if STORE_G:
        slot = G0 + k
    else:
        slot = ZB0 + k % 2
    return slot


@triton.jit
def down_sweep(ubar, ws, Z, ZD, ZBAR, A0, G0, T0, ZB0, AB,
               w1_ptr, wh_ptr, wo_ptr, gw1_ptr, gwh_ptr, gb_ptr, gwo_ptr, gc_ptr,
               BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
               H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr,
               N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
               STORE_G: tl.constexpr, SECOND: tl.constexpr, ACCUM: tl.constexpr):
    """Reverse sweep for the cotangent ubar (BLOCK_M,) [and the tangent adot_k in slots T0 + k,
    zdot_{-1} in slot ZD, g_k in slots G0 + k: SECOND]; writes the adjoint of the input [x, t]
    into slot ZBAR. STORE_G keeps zbar_k in slots G0 + k (the input-gradient sweep, ubar = 1);
    ACCUM adds the parameter gradients into gw1/gwh/gb/gwo/gc with fp32 atomics."""
    rh = tl.arange(0, BLOCK_H)
    top = N_HIDDEN - 1
    # the output layer: zbar_{L-1} = ubar w, dw += ubar z_{L-1} [+ zdot_{L-1}], dc += ubar
    for n0 in range(0, H_PAD, BLOCK_H):
        wo = tl.load(wo_ptr + n0 + rh)
        tl.store(tile(ws, _zbar_slot(top, G0, ZB0, STORE_G), n0, BLOCK_M, BLOCK_H, SLOT_W),
                 ubar[:, None] * wo[None, :])
        if ACCUM:
            z, d1, _ = _activation(tl.load(tile(ws, A0 + top, n0, BLOCK_M, BLOCK_H, SLOT_W)), ACT)
            gwo = tl.sum(ubar[:, None] * z, axis=0)
            if SECOND:
                gwo += tl.sum(d1 * tl.load(tile(ws, T0 + top, n0, BLOCK_M, BLOCK_H, SLOT_W)),
                              axis=0)
            tl.atomic_add(gwo_ptr + n0 + rh, gwo, sem="relaxed")
    if ACCUM:
        tl.atomic_add(gc_ptr, tl.sum(ubar, axis=0), sem="relaxed")
    tl.debug_barrier()
    # hidden-to-hidden layers k = L-1 .. 1
    for kk in range(0, N_HIDDEN - 1):
        k = top - kk
        zb_k = _zbar_slot(k, G0, ZB0, STORE_G)
        # with ACCUM: delta_k over zbar_k, z_{k-1} into the free ping-pong slot (zbar_{k-1} is
        # written after the weight gradient), zdot_{k-1} into ZBAR (written only at the end)
        zs = _zbar_slot(k - 1, G0, ZB0, STORE_G)
        _adjoint_preactivation(ws, k, zb_k, gb_ptr, A0, G0, T0, AB, zs, ZBAR,
                               BLOCK_M, BLOCK_H, H_PAD, SLOT_W, ACT, SECOND, ACCUM, True)
        tl.debug_barrier()
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        if ACCUM:  # dW_k += abar_k^T z_{k-1} [+ delta_k^T zdot_{k-1}]
            gw_k = gwh_ptr + (k - 1) * (H_PAD * H_PAD)
            _weight_grads(ws, AB, zb_k, zs, ZBAR, gw_k, H_PAD, H_PAD, BLOCK_M, BLOCK_H,
                          H_PAD, SLOT_W, PRECISION, SECOND)
            tl.debug_barrier()  # zs is overwritten by zbar_{k-1} below
        # zbar_{k-1} = abar_k W_k
        for j0 in range(0, H_PAD, BLOCK_H):
            acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
            for i0 in range(0, H_PAD, BLOCK_H):
                abar = tl.load(tile(ws, AB, i0, BLOCK_M, BLOCK_H, SLOT_W))
                w = tl.load(_weight_tile(w_k, i0, j0, H_PAD, BLOCK_H, BLOCK_H, False))
                acc += tl.dot(abar, w, input_precision=PRECISION)
            tl.store(tile(ws, zs, j0, BLOCK_M, BLOCK_H, SLOT_W), acc)
        tl.debug_barrier()
    # the input layer k = 0, whose input [x, t] (tangent [pbar, 0]) is in slot Z (ZD)
    zb_0 = _zbar_slot(0, G0, ZB0, STORE_G)
    _adjoint_preactivation(ws, 0, zb_0, gb_ptr, A0, G0, T0, AB, Z, ZD,
                           BLOCK_M, BLOCK_H, H_PAD, SLOT_W, ACT, SECOND, ACCUM, False)
    tl.debug_barrier()
    if ACCUM:
        _weight_grads(ws, AB, zb_0, Z, ZD, gw1_ptr, D_PAD, D_PAD, BLOCK_M, BLOCK_D, H_PAD,
                      SLOT_W, PRECISION, SECOND)
    for d0 in range(0, D_PAD, BLOCK_D):
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for i0 in range(0, H_PAD, BLOCK_H):
            abar = tl.load(tile(ws, AB, i0, BLOCK_M, BLOCK_H, SLOT_W))
            w1 = tl.load(_weight_tile(w1_ptr, i0, d0, D_PAD, BLOCK_H, BLOCK_D, False))
            acc += tl.dot(abar, w1, input_precision=PRECISION)
        tl.store(tile(ws, ZBAR, d0, BLOCK_M, BLOCK_D, SLOT_W), acc)
    tl.debug_barrier()


# ----------------------------------------------------------------------------- host side
class MLPLayout(NamedTuple):
    """How a PotentialMLP's parameters map onto the kernels' padded buffers."""

    dim: int                  # d
    widths: tuple             # hidden widths (h_1, ..., h_L)
    n_hidden: int             # L
    h_pad: int                # hidden widths padded to a multiple of block_h
    d_pad: int                # d + 1 padded to a power of two >= 16
    block_h: int              # tile width of the forward kernels' hidden-layer GEMMs
    block_d: int              # tile width over the input columns [x, t]
    slot_w: int               # row length of a workspace slot: max(h_pad, d_pad)
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
    # 32-column tiles for the forward kernels: with tf32x3 every dot operand is split into
    # hi/lo halves in registers, and 64-column tiles spilled on sm_90a
    # (tests/test_sm90_compile.py); networks of width <= 16 use 16 (the minimum tl.dot
    # dimension), and so do the backward kernels (BACKWARD_TILE)
    block_h = 16 if max(widths) <= 16 else 32
    h_pad = -(-max(widths) // block_h) * block_h
    d_pad = max(16, _next_pow2(d + 1))
    return MLPLayout(d, widths, len(widths), h_pad, d_pad, block_h, min(d_pad, 32),
                     max(h_pad, d_pad), ACTIVATION_CODES[act])


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


BACKWARD_TILE = 16  # BLOCK_H and BLOCK_D of the backward kernels: 8 elements per thread per
                    # (64, 16) tile (why: the module docstring's register budget)


def block_constexprs(block_m: int, layout: MLPLayout, backward: bool = False) -> dict:
    """The tile-shape constexprs every MLP kernel takes (BLOCK_H = BLOCK_D = BACKWARD_TILE for
    the backward kernels; h_pad and d_pad are multiples of it)."""
    block_h = BACKWARD_TILE if backward else layout.block_h
    block_d = BACKWARD_TILE if backward else layout.block_d
    assert layout.h_pad % block_h == 0 and layout.d_pad % block_d == 0
    return dict(BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_D=block_d,
                H_PAD=layout.h_pad, D_PAD=layout.d_pad, SLOT_W=layout.slot_w,
                N_HIDDEN=layout.n_hidden, ACT=layout.act)


def grad_buffers(packed, programs: int, deterministic: bool):
    """Zeroed fp32 gradient buffers shaped like ``packed`` -> (views, flat, per-program stride).

    Shared (default): one buffer every program adds into (stride 0). Deterministic: one private
    copy per program of a launch (stride = the packed size), reduced by :func:`reduce_grads`.
    """
    sizes = [p.numel() for p in packed]
    total = -(-sum(sizes) // 16) * 16  # copies start 64-byte aligned (every size but c's is
    copies = programs if deterministic else 1  # a multiple of 16 too)
    flat = torch.zeros(copies, total, dtype=torch.float32, device=packed[0].device)
    return _views(flat[0], packed, sizes), flat, total if deterministic else 0


def _views(row, packed, sizes):
    return tuple(v.view(p.shape) for v, p in zip(torch.split(row[:sum(sizes)], sizes), packed))


def reduce_grads(packed, flat):
    """The packed gradients from the buffers of :func:`grad_buffers`: copy 0 when shared, else
    the sum over the programs' copies. torch.sum over dim 0 reduces in an order fixed by the
    shape (no atomics), so the deterministic mode gives bitwise-identical results run to run."""
    row = flat[0] if flat.shape[0] == 1 else flat.sum(0)
    return _views(row, packed, [p.numel() for p in packed])


def unit_feature_stride(x: torch.Tensor) -> torch.Tensor:
    """x with stride(1) == 1 (a copy only for column-strided views such as a transpose): the
    kernels then specialise the feature stride to 1, and no batch-sized stride reaches them."""
    if x.stride(1) == 1:
        return x
    if x.shape[1] == 1:  # contiguous() keeps the stride of a size-1 dimension: set it
        return x.as_strided(x.shape, (x.stride(0), 1))
    return x.contiguous()


def device_guard(x: torch.Tensor):
    """Launch inside x's CUDA device (Triton launches on the current device: without this a
    cuda:1 tensor would be read by a kernel running on device 0); a no-op on CPU."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


_SM_COUNT: dict = {}

# Row blocks per streaming multiprocessor per launch: 3 programs of 4 warps at <= 168 registers
# per thread fit one SM's 64 K registers (3 x 128 x 168 = 64,512). The sm_90a check
# (tests/test_sm90_compile.py) reports 103-168 registers for every configuration but one
# (residual backward with tanh and the power cost: 170, so 2 fit and the scheduler starts
# the third as one ends). Capping with maxnreg=168 was tried: it made ptxas spill (the
# width-256 tf32 residual backward: 142 registers uncapped, 12 bytes of spills capped).
PROGRAMS_PER_SM = 3
THREE_PER_SM_REGISTERS = 168
LAUNCH_OPTIONS = dict(num_warps=4, num_stages=1)
# the grid under the interpreter: 2 programs per launch still exercises several launches
# sharing one workspace (and several per-program gradient copies)
_INTERPRETER_PROGRAMS = 2


def launch_config(n_rows: int, layout: MLPLayout, n_slots: int, device: torch.device):
    """(BLOCK_M, chunks, launch options, workspace) for one kernel call; ``n_slots`` is the
    kernel's count of (BLOCK_M, slot_w) workspace tiles per program, ``chunks`` the launches as
    (first row block, number of programs) pairs, the options LAUNCH_OPTIONS.

    BLOCK_M = 64: the M of one Hopper warpgroup MMA (wgmma m64nNk8) and >= 16 as the K of the
    weight-gradient dots; one 4-warp program (one warpgroup) per row block. Each launch runs up
    to PROGRAMS_PER_SM x SMs programs, i.e. whole waves that are resident at once (registers
    allow 3 programs per SM; shared memory, 8-12 KB each, is no limit), and the launcher loops
    over launches, the last one taking the remainder. That loop replaces a persistent in-kernel
    loop, across which the compiler hoisted every workspace pointer tile and spilled. On an
    H100/H200 (132 SMs, so 396 programs per launch):

        rows      row blocks   launches x programs        programs per SM (waves)
        512            8       1 x 8                      0.06  (GPU idle: use large batches)
        8192         128       1 x 128                    0.97  (4 warps per SM)
        16384        256       1 x 256                    1.94
        32768        512       396 + 116                  3 + 0.9
        65536       1024       396 + 396 + 232            3 + 3 + 1.8 = 8 program-times per
                                                          SM, = ceil(1024 / 132): no wave lost

    A row block cannot be split across programs (the layers are sequential), so batches below
    ~8192 rows leave SMs idle whatever the launch plan: the GPU path is for large batches.
    The workspace is sized by the launch, not by N: programs x n_slots x 64 x slot_w x 4 B, e.g.
    the residual backward (3L + 8 slots) at width 256, L = 3: 1.11 MB per program, 441 MB for
    396 programs; width 128: 220 MB; width 64 (d <= 63): 110 MB. That is far more than the
    50 MB L2, so the workspace lives in HBM: L2 holds only the tiles a layer phase is working
    on (396 programs x ~3 slots x 64 x slot_w x 4 B: 19 MB at width 64, 78 MB at 256), and
    wide networks stream their workspace through HBM: a backward row block at width 256, d = 64
    moves an estimated ~4 x 1.1 MB (every slot written once, read ~3 times) for ~170 MFLOP of
    GEMMs, ~38 FLOP per byte, about the H100/H200 balance point in tf32x3 (165 TFLOP/s over
    3.4-4.3 TB/s: 38-49) and below it in the tf32 fast mode (115-150): not measured.
    No autotuning: the backward kernels accumulate into their outputs with atomics, which
    autotune's repeated launches would double-count.
    """
    block_m = 64
    n_blocks = max(1, -(-n_rows // block_m))
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        cap = PROGRAMS_PER_SM * _SM_COUNT[device]
    else:
        cap = _INTERPRETER_PROGRAMS
    programs = min(n_blocks, cap)
    workspace = torch.empty(programs * n_slots * block_m * layout.slot_w, dtype=torch.float32,
                            device=device)
    chunks = [(start, min(programs, n_blocks - start)) for start in range(0, n_blocks, programs)]
    return block_m, chunks, LAUNCH_OPTIONS, workspace
