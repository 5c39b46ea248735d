"""Energy-distance pair sums by tiles, FlashAttention-style: linear memory, one or K segments.

Math. For a (N, d) and b (M, d) the energy distance and its gradients (ncf_fast.energy) are built
from row sums over all pairs, never from the N x M matrix:

    S_i  = sum_j |a_i - b_j|                      (N,)   value; summed in float64 on the host
    Ga_i = sum_j u(a_i - b_j),  u(v) = v / |v|    (N, d) gradient, u(0) = 0 (coinciding points)

The column sums Gb_j = sum_i u(b_j - a_i) are the row sums of the swapped pass (b, a): a second
launch (atomics in one pass would save it, at N*M*d/BLOCK_N contended atomic adds). The
within-set passes (a, a) need no diagonal mask: a point against itself has an exactly zero
difference, hence |.| = 0 and u = 0. Segmented mode: rows and columns are label-sorted, segment
k owns rows [row_lo_k, row_hi_k) and columns [col_lo_k, col_hi_k); a block table maps each
program to (segment, first row), so all classes run in ONE launch.

Tiling. A program owns BLOCK_N rows of a (loaded once, BLOCK_D >= d columns, zero padded) and
loops over the BLOCK_M-row tiles of b in its column range, keeping S_i (float64: one add per
row per tile) and Ga_i (float32) in registers. Two arithmetic modes, picked from d:

* GRAM (d > 4): |a - b|^2 = |a|^2 + |b|^2 - 2 a.b with a.b = A B^T and the gradient
  sum_j w_ij (a_i - b_j) = a_i sum_j w_ij - W B, w = 1/|a_i - b_j|, both on tensor cores as
  tf32x3: x = hi + lo (hi = x truncated to tf32; the launcher splits a and b, the kernel splits
  w) and A B^T = lo.hi + hi.lo + hi.hi, three tl.dot(input_precision="tf32") -- ~2^-20 relative,
  where plain tf32 (2^-11) would cancel and "ieee" has no tensor-core path. Splitting on the host
  lets the loop-invariant A operand sit in shared memory (Triton's own tf32x3 split keeps it in
  registers, which spills at BLOCK_D = 64). The Gram form cancels for nearby points, so pairs
  with |a - b|^2 <= NEAR (|a|^2 + |b|^2) are redone from explicit differences (value, and unit
  vectors added atomically into the program's own rows of Ga) -- only in tiles that contain such
  a pair (a runtime branch) -- which bounds the Gram rounding to ~2^-20 / NEAR of |a - b|^2 for
  every pair it keeps.
* DIRECT (d <= 4): explicit differences for every pair (3d + ~10 flops): cheaper than the
  padded dot plus the near-pair fix, which low-dimensional data triggers in almost every tile.

One rsqrt per pair gives both |a - b| = d2 * rsqrt(d2) and w = rsqrt(d2). tl.rsqrt is
rsqrt.approx.ftz on the GPU: a subnormal d2 (|a - b| < 1.1e-19) would give inf, so the Gram
threshold is floored at the smallest normal (such pairs take the exact near-pair path, which
lifts a subnormal d2 by 2^64 before the rsqrt: _rsqrt_subnormal_safe) and DIRECT mode computes
with every d2 lifted by 2^24, undone on the row sums. Value-only mode
(GRAD=False) skips the gradient dot and stores only S. Results are deterministic: every row's
S and Ga are summed by one program in a fixed order (its atomics touch only its own rows, and a
barrier orders the near-pair adds before the final one).

Bound on an H200 (value and both gradients, N = M = 1e6, d = 16): the estimator needs the
(a, b), (b, a), (a, a), (b, b) passes = 4e12 pairs (3e12 for the value alone). The
direct form costs 3d + 10 = 58 fp32 flops per pair: 4e12 * 58 / 67e12 flop/s = 3.5 s. GRAM mode
moves the d-proportional part to tensor cores: 2 dots * 3 (tf32x3) * 2 * 16 = 192 tf32 flops per
pair -> 1.55 s at 495 TFLOP/s; ~16 fp32 instructions per pair stay on the CUDA cores (norms,
d2, the near test and its count, selects, d2 * w, two row sums, the split of w) -> 1.9 s at
33.5e12 instr/s; one MUFU rsqrt per pair -> 0.96 s at 16 * 132 SMs * 1.98 GHz = 4.2e12/s. The
units overlap, so the bound is ~1.9 s, CUDA-core bound (value only: 3e12 pairs * ~11
instructions -> ~1.0 s). Measured times, against this bound: benchmarks/RESULTS.md.

Shapes: a (N, d), b (M, d), float32 (the launchers convert other float dtypes and make them
contiguous); outputs S (N,) float64, Ga (N, d) float32. d <= MAX_D = 64 (at BLOCK_D = 128 the
gradient variant spills on sm_90a); larger d uses ncf_fast.energy's torch path. Tile shapes are
the largest without spills in tests/test_sm90_compile_energy.py (128 x 32, 128 x 16 at d > 32).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import interpreter
from .mlp_launch import device_guard

__all__ = ["pair_sums", "segment_pair_sums", "config_for", "all_configs", "MAX_D", "NEAR"]

# Largest d the kernel takes: with BLOCK_D = 128 the gradient variant spills on sm_90a at every
# tile shape tried (tests/test_sm90_compile_energy.py); larger d uses the torch path (cuBLAS Gram
# blocks), which "auto" picks.
MAX_D = 64
# d <= DIRECT_MAX_D uses explicit differences: at d <= 4 they cost <= 22 flops per pair, and the
# near-pair fix of the Gram form fires in nearly every tile of low-dimensional data anyway.
DIRECT_MAX_D = 4
# Near-pair threshold relative to |a|^2 + |b|^2. tf32x3 rounds a.b to ~2^-20 (|a|^2 + |b|^2), so
# every pair the Gram form keeps has |a - b|^2 to ~2^-12 relative (|a - b| to ~1e-4), and the
# flagged set is still ~1e-12 of the pairs at d = 16 (Gaussian data).
NEAR = 2.0 ** -8


interpreter.patch_if_interpreted()  # runtime loop bounds (for k in range(0, d)) under numpy >= 2.3


# Smallest normal fp32, and the power-of-two rescaling that lifts a subnormal squared distance
# into the normal range (2^-149 * 2^64 = 2^-85) for the rsqrt, undone exactly by 2^32 after it.
MIN_NORMAL = tl.constexpr(2.0 ** -126)
_LIFT = tl.constexpr(2.0 ** 64)
_UNLIFT = tl.constexpr(2.0 ** 32)
# DIRECT mode lifts every d2 by 2^24 (the smallest even power that makes 2^-149 normal): S comes
# out 2^12 too large and the unit-vector sums 2^12 too small. A d2 above 2^104 (|a - b| > 4.5e15)
# overflows to inf, and S to NaN: loud, far outside fp32 data that has a meaningful distance.
_DIRECT_LIFT = tl.constexpr(2.0 ** 24)
_DIRECT_UNLIFT = tl.constexpr(2.0 ** -12)
_DIRECT_REGAIN = tl.constexpr(2.0 ** 12)


@triton.jit
def _rsqrt_subnormal_safe(d2):
    """1/sqrt(d2) for every d2 > 0. tl.rsqrt compiles to rsqrt.approx.ftz.f32, which flushes a
    subnormal d2 (|a - b| < 1.1e-19) to zero and returns inf, and inf * d2 or inf * (a - b)
    then poisons S and G; a subnormal d2 is scaled by 2^64 first, exactly."""
    tiny = d2 < MIN_NORMAL
    return tl.rsqrt(tl.where(tiny, d2 * _LIFT, d2)) * tl.where(tiny, _UNLIFT, 1.0)


@triton.jit
def _direct_d2(a_ptr, b_ptr, rows64, cols64, row_ok, col_ok, d, stride_ad, stride_bd,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """|a_i - b_j|^2 for a tile from explicit differences, one coordinate at a time."""
    d2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, d):
        ak = tl.load(a_ptr + rows64 + k * stride_ad, mask=row_ok, other=0.0).to(tl.float32)
        bk = tl.load(b_ptr + cols64 + k * stride_bd, mask=col_ok, other=0.0).to(tl.float32)
        diff = ak[:, None] - bk[None, :]
        d2 += diff * diff
    return d2


@triton.jit
def _direct_unit_sums(a_ptr, b_ptr, rows64, cols64, row_ok, col_ok, w, d, stride_ad, stride_bd,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_j w_ij (a_i - b_j) from explicit differences: (BLOCK_N, BLOCK_D), no cancellation."""
    offs_d = tl.arange(0, BLOCK_D)
    g = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k in range(0, d):
        ak = tl.load(a_ptr + rows64 + k * stride_ad, mask=row_ok, other=0.0).to(tl.float32)
        bk = tl.load(b_ptr + cols64 + k * stride_bd, mask=col_ok, other=0.0).to(tl.float32)
        gk = tl.sum(w * (ak[:, None] - bk[None, :]), axis=1)
        g += tl.where(offs_d[None, :] == k, gk[:, None], 0.0)
    return g


@triton.jit
def _near_pair_sums(g_ptr, a_ptr, b_ptr, rows, rows64, cols64, row_ok, col_ok, near_pair, d,
                    stride_ad, stride_bd, stride_gn, stride_gd,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GRAD: tl.constexpr):
    """The flagged pairs of a GRAM tile from explicit differences: returns their row sums of
    |a_i - b_j| and (GRAD) atomically adds sum_j u(a_i - b_j) into this program's own rows of
    g, one coordinate at a time, so that no (BLOCK_N, BLOCK_D) tile is held in registers."""
    d2 = _direct_d2(a_ptr, b_ptr, rows64, cols64, row_ok, col_ok, d, stride_ad, stride_bd,
                    BLOCK_N, BLOCK_M)
    pos = near_pair & (d2 > 0.0)
    w = tl.where(pos, _rsqrt_subnormal_safe(tl.where(pos, d2, 1.0)), 0.0)
    if GRAD:
        g_rows = rows.to(tl.int64) * stride_gn
        for k in range(0, d):
            ak = tl.load(a_ptr + rows64 + k * stride_ad, mask=row_ok, other=0.0).to(tl.float32)
            bk = tl.load(b_ptr + cols64 + k * stride_bd, mask=col_ok, other=0.0).to(tl.float32)
            gk = tl.sum(w * (ak[:, None] - bk[None, :]), axis=1)
            tl.atomic_add(g_ptr + g_rows + k * stride_gd, gk, mask=row_ok, sem="relaxed")
    return tl.sum(d2 * w, axis=1)


@triton.jit
def _tf32_split(x):
    """x = hi + lo with hi = x truncated to tf32 (10 mantissa bits): the tf32x3 operand split."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


# d and the row strides (= d for the contiguous inputs the launcher passes) are not value-
# specialised: one compile per (d bucket, GRAD) serves every d of the bucket (d = 1 and
# d % 16 == 0 would otherwise each compile their own variant), which the GPU check's warm-up
# relies on; nothing in the kernel vectorises along a row stride.
@triton.jit(do_not_specialize=["d", "stride_an", "stride_bm", "stride_gn"])
def _pair_sums_kernel(
        a_ptr, b_ptr, ahi_ptr, alo_ptr, bhi_ptr, blo_ptr, a2_ptr, b2_ptr, s_ptr, g_ptr,
        blk_seg_ptr, blk_row_ptr, row_hi_ptr, col_lo_ptr, col_hi_ptr,
        d,
        stride_an, stride_ad, stride_bm, stride_bd, stride_gn, stride_gd,
        near,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        GRAM: tl.constexpr, GRAD: tl.constexpr):
    """S_i = sum_j |a_i - b_j| (and Ga_i = sum_j u(a_i - b_j) if GRAD) for one BLOCK_N row block.

    The block table gives this program's segment and first row; the segment gives the row end and
    the column range. S is stored in float64, Ga in float32. GRAM mode reads the tf32 split
    (hi, lo) of a and b, zero padded to BLOCK_D columns, and |a|^2, |b|^2 from the launcher.
    """
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)
    row_lo = tl.load(blk_row_ptr + pid)
    row_hi = tl.load(row_hi_ptr + seg)
    col_lo = tl.load(col_lo_ptr + seg)
    col_hi = tl.load(col_hi_ptr + seg)

    rows = row_lo + tl.arange(0, BLOCK_N)
    row_ok = rows < row_hi
    rows64 = rows.to(tl.int64) * stride_an  # int64: N * d may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    if GRAM:
        # the split operands stay in shared memory (loaded once, straight into the dots) rather
        # than in registers, which BLOCK_D >= 64 would exhaust
        split_rows = rows.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :]
        a_hi = tl.load(ahi_ptr + split_rows, mask=row_ok[:, None], other=0.0)
        a_lo = tl.load(alo_ptr + split_rows, mask=row_ok[:, None], other=0.0)
        a2 = tl.load(a2_ptr + rows, mask=row_ok, other=0.0)

    s_acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    g_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of the Gram-form weights (GRAM only)
    for col_start in range(col_lo, col_hi, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_ok = cols < col_hi
        cols64 = cols.to(tl.int64) * stride_bm
        valid = row_ok[:, None] & col_ok[None, :]
        if GRAM:
            split_cols = cols.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :]
            b_hi = tl.load(bhi_ptr + split_cols, mask=col_ok[:, None], other=0.0)
            b_lo = tl.load(blo_ptr + split_cols, mask=col_ok[:, None], other=0.0)
            b2 = tl.load(b2_ptr + cols, mask=col_ok, other=0.0)
            norms = a2[:, None] + b2[None, :]
            # tf32x3: a.b = lo.hi + hi.lo + hi.hi (small terms first), ~2^-20 relative
            ab = tl.dot(a_lo, tl.trans(b_hi), input_precision="tf32")
            ab = tl.dot(a_hi, tl.trans(b_lo), acc=ab, input_precision="tf32")
            ab = tl.dot(a_hi, tl.trans(b_hi), acc=ab, input_precision="tf32")
            d2 = norms - 2.0 * ab
            # the Gram form is trusted above the threshold (hence d2 > 0 and, by the floor at
            # the smallest normal, never subnormal: the main loop's plain rsqrt stays finite)
            thr = tl.maximum(near * norms, MIN_NORMAL)
            far = d2 > thr
            near_pair = valid & (d2 <= thr)
            if tl.sum(near_pair.to(tl.int32)) > 0:  # rare beyond d = 4: a runtime branch
                s_acc += _near_pair_sums(g_ptr, a_ptr, b_ptr, rows, rows64, cols64, row_ok,
                                         col_ok, near_pair, d, stride_ad, stride_bd, stride_gn,
                                         stride_gd, BLOCK_N, BLOCK_M, GRAD).to(tl.float64)
            pos = valid & far
        else:
            # lifted by 2^24 (exact): no nonzero d2 is subnormal (2^-149 * 2^24 = 2^-125), so
            # the flushing rsqrt never sees one; w and d2 w are 2^-12 and 2^12 times the true
            # values, undone once per row below (one multiply per pair: a per-pair guard or a
            # per-tile branch made this variant spill on sm_90a)
            d2 = _direct_d2(a_ptr, b_ptr, rows64, cols64, row_ok, col_ok, d,
                            stride_ad, stride_bd, BLOCK_N, BLOCK_M) * _DIRECT_LIFT
            pos = valid & (d2 > 0.0)
        # one MUFU rsqrt gives both 1/|a - b| and |a - b| = d2 w; rsqrt(1) off the support keeps
        # inf out of the interpreter (no cost on the GPU beyond one select)
        w = tl.where(pos, tl.rsqrt(tl.where(pos, d2, 1.0)), 0.0)
        s_acc += tl.sum(d2 * w, axis=1).to(tl.float64)
        if GRAD:
            if GRAM:
                w_acc += tl.sum(w, axis=1)
                # - sum_j w_ij b_j in tf32x3 (w is split here, b by the launcher)
                w_hi, w_lo = _tf32_split(-w)
                g_acc = tl.dot(w_lo, b_hi, acc=g_acc, input_precision="tf32")
                g_acc = tl.dot(w_hi, b_lo, acc=g_acc, input_precision="tf32")
                g_acc = tl.dot(w_hi, b_hi, acc=g_acc, input_precision="tf32")
            else:
                g_acc += _direct_unit_sums(a_ptr, b_ptr, rows64, cols64, row_ok, col_ok, w, d,
                                           stride_ad, stride_bd, BLOCK_N, BLOCK_D)

    if not GRAM:
        s_acc = s_acc * _DIRECT_UNLIFT
        g_acc = g_acc * _DIRECT_REGAIN
    tl.store(s_ptr + rows, s_acc, mask=row_ok)
    if GRAD:
        d_ok = offs_d < d
        g_ptrs = g_ptr + (rows.to(tl.int64) * stride_gn)[:, None] + offs_d[None, :] * stride_gd
        if GRAM:
            # + a_i sum_j w_ij (a reloaded: keeping the tile live through the loop spills), added
            # to the near pairs' sums already in g (zeroed by the launcher)
            a_tile = tl.load(a_ptr + rows64[:, None] + offs_d[None, :] * stride_ad,
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            g_acc += a_tile * w_acc[:, None]
            # the near-pair adds into these rows came from other threads of this program: the
            # barrier orders them before this add, so the sum's order (and bits) never vary
            tl.debug_barrier()
            tl.atomic_add(g_ptrs, g_acc, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            tl.store(g_ptrs, g_acc, mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# launchers

def config_for(d: int) -> dict:
    """The launch configuration for dimension d: constexprs plus num_warps / num_stages.

    Tiles of BLOCK_N x BLOCK_M = 128 x 32 pairs over 8 warps: 16 fp32 registers per thread per
    tile-sized temporary (d2, w, masks, the split of w); 128 x 64 spills on sm_90a. BLOCK_D = 64
    halves BLOCK_M to make room for the (128 x 64) gradient accumulator (32 registers per thread).
    Each choice is the largest tile that compiles without spills in the sm_90a check.
    """
    if not 1 <= d <= MAX_D:
        raise ValueError(f"the Triton energy-distance kernel takes 1 <= d <= {MAX_D}, got d={d}; "
                         f"use backend='torch' for larger d")
    if d <= DIRECT_MAX_D:
        return dict(BLOCK_N=128, BLOCK_M=32, BLOCK_D=4, GRAM=False, num_warps=8, num_stages=2)
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16 (tf32: K % 8 == 0)
    return dict(BLOCK_N=128, BLOCK_M=16 if block_d >= 64 else 32, BLOCK_D=block_d, GRAM=True,
                num_warps=8, num_stages=2)


def all_configs():
    """Every (d bucket, GRAD) configuration the launcher can pick: for the sm_90a compile check."""
    out = []
    for d in (DIRECT_MAX_D, 16, 32, 64):
        for grad in (False, True):
            out.append((d, grad, config_for(d)))
    return out


@functools.lru_cache(maxsize=64)
def _plain_table(n: int, m: int, block_n: int, device: str):
    """Block table of the unsegmented case: one segment, rows [0, n), columns [0, m)."""
    dev = torch.device(device)
    rows = torch.arange(0, n, block_n, dtype=torch.int32, device=dev)
    seg = torch.zeros_like(rows)
    # three allocations, not slices of one: every table pointer is then 16-byte aligned, as in
    # the segmented launches, so both share one compiled kernel
    row_hi, col_lo, col_hi = (torch.tensor([v], dtype=torch.int32, device=dev) for v in (n, 0, m))
    return seg, rows, row_hi, col_lo, col_hi


def _segment_table(row_lo, row_hi, block_n):
    """(segment, first row) of every BLOCK_N row block of every segment (one host sync)."""
    counts = torch.div(row_hi - row_lo + block_n - 1, block_n, rounding_mode="floor").clamp_min(0)
    seg = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    rows = row_lo[seg] + (torch.arange(len(seg), device=seg.device) - first[seg]) * block_n
    return seg.to(torch.int32), rows.to(torch.int32)


def _check(a, b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"pair sums need a (N, d) and b (M, d), got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    if a.shape[0] >= 2 ** 31 or b.shape[0] >= 2 ** 31:
        raise ValueError("pair sums take fewer than 2^31 rows per set (int32 block table)")
    # fp32 arithmetic whatever comes in; contiguous, so that the unit column stride specialises
    return a.float().contiguous(), b.float().contiguous()


def _gram_operands(x, block_d):
    """(hi, lo, |x|^2): x = hi + lo, hi = x truncated to tf32 (as the kernel splits w), both
    zero padded to block_d columns and contiguous; |x|^2 summed in float64, stored in float32."""
    n, d = x.shape
    hi = torch.zeros((n, block_d), dtype=torch.float32, device=x.device)
    lo = torch.zeros_like(hi)
    hi[:, :d] = (x.view(torch.int32) & -8192).view(torch.float32)  # -8192 = 0xFFFFE000
    lo[:, :d] = x - hi[:, :d]
    return hi, lo, x.double().square().sum(1).float()


def _launch(a, b, grad, seg, rows, row_hi, col_lo, col_hi, zero_init):
    n, d = a.shape
    cfg = dict(config_for(d))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    alloc = torch.zeros if zero_init else torch.empty
    s = alloc(n, dtype=torch.float64, device=a.device)
    g = None
    if grad:  # GRAM mode accumulates into g atomically: zeros
        g = (torch.zeros if cfg["GRAM"] else alloc)((n, d), dtype=torch.float32, device=a.device)
    if cfg["GRAM"]:
        a_hi, a_lo, a2 = _gram_operands(a, cfg["BLOCK_D"])
        b_hi, b_lo, b2 = _gram_operands(b, cfg["BLOCK_D"])
    else:  # unused pointers
        a_hi = a_lo = a2 = a
        b_hi = b_lo = b2 = b
    if len(rows) > 0:
        with device_guard(a):  # Triton launches on the current device: make it a's
            _pair_sums_kernel[(len(rows),)](
                a, b, a_hi, a_lo, b_hi, b_lo, a2, b2, s, g if grad else s, seg, rows, row_hi,
                col_lo, col_hi, d,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                g.stride(0) if grad else 0, g.stride(1) if grad else 0,
                NEAR, GRAD=grad, num_warps=num_warps, num_stages=num_stages, **cfg)
    return s, g


def pair_sums(a: torch.Tensor, b: torch.Tensor, grad: bool = False):
    """Row sums over all pairs: S (N,) float64 = sum_j |a_i - b_j|, Ga (N, d) float32 or None.

    a (N, d), b (M, d) on one device (CUDA, or CPU under TRITON_INTERPRET=1), 1 <= d <= MAX_D.
    """
    a, b = _check(a, b)
    n, m = a.shape[0], b.shape[0]
    block_n = config_for(a.shape[1])["BLOCK_N"]
    table = _plain_table(n, m, block_n, str(a.device))
    return _launch(a, b, grad, *table, zero_init=False)


def segment_pair_sums(a: torch.Tensor, b: torch.Tensor, row_lo, row_hi, col_lo, col_hi,
                      grad: bool = False):
    """Row sums within segments, all segments in one launch.

    Segment k pairs rows [row_lo[k], row_hi[k]) of a with rows [col_lo[k], col_hi[k]) of b
    (integer tensors (K,) on a's device; segments may be empty). Returns S (N,) float64 and Ga
    (N, d) float32 (or None), both 0 on rows outside every segment.
    """
    a, b = _check(a, b)
    block_n = config_for(a.shape[1])["BLOCK_N"]
    seg, rows = _segment_table(row_lo.long(), row_hi.long(), block_n)
    as32 = lambda x: x.to(device=a.device, dtype=torch.int32).contiguous()  # noqa: E731
    return _launch(a, b, grad, seg, rows, as32(row_hi), as32(col_lo), as32(col_hi),
                   zero_init=True)

