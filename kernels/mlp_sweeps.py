"""Device sweeps shared by the fused MLP kernels (mlp_potential, mlp_residual); their host side
(layout, packing, launches) is mlp_launch.

Network (ncf_fast.torch_backend's notation, hidden layers k = 0..L-1):
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
mlp_launch.launch_config has the arithmetic) is far larger than L2: it lives in HBM. Tiles are written in
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
its own copy (mlp_launch.grad_buffers: stride grad_pstride), where its adds land in program order, and
reduces the copies in a fixed order (mlp_launch.reduce_grads): bitwise-identical gradients run to run,
for that memory.

Register budget (sm_90a has 255 per thread; tests/test_sm90_compile.py checks every kernel):
  * workspace and weight offsets are int64 tiles: with int32 offsets every 128-bit vector of a
    tile needs its own sign-extended 64-bit address per slot, which the compiler keeps live
    across whole phases (~80 registers); int64 offsets fold the row steps and slot offsets
    into the load's immediate, one address per tile;
  * the backward kernels use tiles of 16 columns, BLOCK_H = BLOCK_D = 16
    (mlp_launch.block_constexprs(..., backward=True)): every elementwise activation then holds 8 elements
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
opt-in fast mode (one product, ~1e-3 relative error, see :func:`.mlp_launch.set_dot_precision`).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["tile", "program_block", "program_grads", "stage_rows", "up_sweep", "tangent_sweep", "down_sweep"]

# Weight-gradient tiles dW[i0:i0+64, j0:j0+w] = sum over rows of abar^T z: 64 output rows make
# the product a Hopper warpgroup MMA (wgmma m64; fewer rows fall back to mma.sync, whose
# operands sit in registers, replicated across the 4 warps, which spilled), summed over the
# row block in chunks of 32 rows (fewer registers than 16- or 64-row chunks on sm_90a).
WGRAD_COLS = tl.constexpr(64)
WGRAD_ROWS = tl.constexpr(32)


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
def program_block(ws_ptr, block_start, N, N_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                  SLOT_W: tl.constexpr):
    """(this program's workspace of N_SLOTS (BLOCK_M, SLOT_W) tiles, its rows (BLOCK_M,) int64,
    rows < N): one row block per program, block_start + program id (the launcher loops over
    chunks)."""
    pid = tl.program_id(0)
    ws = ws_ptr + pid.to(tl.int64) * (N_SLOTS * BLOCK_M * SLOT_W)
    rows = (block_start + pid).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    return ws, rows, rows < N


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
def _slot_gemm_tile(ws, SRC, w_ptr, n0, K: tl.constexpr, BLOCK_K: tl.constexpr, LD: tl.constexpr,
                    COLS: tl.constexpr, TRANS: tl.constexpr, BLOCK_M: tl.constexpr,
                    SLOT_W: tl.constexpr, PRECISION: tl.constexpr):
    """Columns [n0, n0 + COLS) of V W^T (TRANS: the up and tangent sweeps' first layer) or of
    V W (the down sweep's adjoints), V the rows in slot SRC (K columns, BLOCK_K per dot), W the
    weight matrix at w_ptr (leading dimension LD)."""
    acc = tl.zeros((BLOCK_M, COLS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(tile(ws, SRC, k0, BLOCK_M, BLOCK_K, SLOT_W))
        if TRANS:
            w = tl.load(_weight_tile(w_ptr, n0, k0, LD, COLS, BLOCK_K, True))
        else:
            w = tl.load(_weight_tile(w_ptr, k0, n0, LD, BLOCK_K, COLS, False))
        acc += tl.dot(v, w, input_precision=PRECISION)
    return acc


@triton.jit
def _hidden_layer_tile(ws, A0, T0, k, w_k, n0, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                       H_PAD: tl.constexpr, SLOT_W: tl.constexpr, ACT: tl.constexpr,
                       PRECISION: tl.constexpr, TANGENT: tl.constexpr):
    """Columns [n0, n0 + BLOCK_H) of W_k v for hidden layer k >= 1: v = z_{k-1} = s(a_{k-1})
    (up sweep), or with TANGENT v = zdot_{k-1} = s'(a_{k-1}) adot_{k-1} (adot in slot T0 + k - 1)."""
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for j0 in range(0, H_PAD, BLOCK_H):
        v, d1, _ = _activation(tl.load(tile(ws, A0 + k - 1, j0, BLOCK_M, BLOCK_H, SLOT_W)), ACT)
        if TANGENT:
            v = d1 * tl.load(tile(ws, T0 + k - 1, j0, BLOCK_M, BLOCK_H, SLOT_W))
        wt = tl.load(_weight_tile(w_k, n0, j0, H_PAD, BLOCK_H, BLOCK_H, True))
        acc += tl.dot(v, wt, input_precision=PRECISION)
    return acc


@triton.jit
def _layer_chain(ws, SRC, A0, OUT0, w1_ptr, wh_ptr, b_ptr,
                 BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr,
                 N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                 TANGENT: tl.constexpr):
    """Every hidden layer's pre-activation into slots OUT0 + k from the input in slot SRC: a_k
    (OUT0 = A0, with the biases), or with TANGENT adot_k (the biases drop out)."""
    rh = tl.arange(0, BLOCK_H)
    for n0 in range(0, H_PAD, BLOCK_H):  # the first layer, from the [x, t]-sized input
        acc = _slot_gemm_tile(ws, SRC, w1_ptr, n0, D_PAD, BLOCK_D, D_PAD, BLOCK_H, True, BLOCK_M,
                              SLOT_W, PRECISION)
        if not TANGENT:
            acc += tl.load(b_ptr + n0 + rh)[None, :]
        tl.store(tile(ws, OUT0, n0, BLOCK_M, BLOCK_H, SLOT_W), acc)
    tl.debug_barrier()
    for k in range(1, N_HIDDEN):
        w_k = wh_ptr + (k - 1) * (H_PAD * H_PAD)
        for n0 in range(0, H_PAD, BLOCK_H):
            acc = _hidden_layer_tile(ws, A0, OUT0, k, w_k, n0, BLOCK_M, BLOCK_H, H_PAD, SLOT_W,
                                     ACT, PRECISION, TANGENT)
            if not TANGENT:
                acc += tl.load(b_ptr + k * H_PAD + n0 + rh)[None, :]
            tl.store(tile(ws, OUT0 + k, n0, BLOCK_M, BLOCK_H, SLOT_W), acc)
        tl.debug_barrier()


@triton.jit
def up_sweep(ws, Z, A0, w1_ptr, wh_ptr, b_ptr, wo_ptr, c_ptr,
             BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
             H_PAD: tl.constexpr, D_PAD: tl.constexpr, SLOT_W: tl.constexpr,
             N_HIDDEN: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr):
    """a_k = W_k z_{k-1} + b_k into slots A0 + k, from the input [x, t] in slot Z; returns u."""
    _layer_chain(ws, Z, A0, A0, w1_ptr, wh_ptr, b_ptr, BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD,
                 SLOT_W, N_HIDDEN, ACT, PRECISION, False)
    rh = tl.arange(0, BLOCK_H)
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
    _layer_chain(ws, ZD, A0, T0, w1_ptr, wh_ptr, w1_ptr, BLOCK_M, BLOCK_H, BLOCK_D, H_PAD, D_PAD,
                 SLOT_W, N_HIDDEN, ACT, PRECISION, True)


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
            acc = _slot_gemm_tile(ws, AB, w_k, j0, H_PAD, BLOCK_H, H_PAD, BLOCK_H, False, BLOCK_M,
                                  SLOT_W, PRECISION)
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
        acc = _slot_gemm_tile(ws, AB, w1_ptr, d0, H_PAD, BLOCK_H, D_PAD, BLOCK_D, False, BLOCK_M,
                              SLOT_W, PRECISION)
        tl.store(tile(ws, ZBAR, d0, BLOCK_M, BLOCK_D, SLOT_W), acc)
    tl.debug_barrier()
