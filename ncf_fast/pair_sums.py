"""The energy distance's one primitive: sums over all pairs of distances and of unit vectors.

For a (N, d) and b (M, d), S = sum_ij |a_i - b_j| and the row / column sums of
u(a_i - b_j) = (a_i - b_j)/|a_i - b_j| (u(0) = 0): every estimator in :mod:`ncf_fast.energy` is
a weighted combination of these, with the gradient computed in the same pass (it costs no extra
pairs). :func:`pair_distance_sums` takes whole sets, :func:`segment_pair_distance_sums` K
label-sorted segments (classes) at once.

Backends (:func:`resolve_backend`, the vocabulary of :mod:`ncf_fast.backends`):

* ``triton`` (ncf_fast.kernels.energy_distance): tiled kernel, tensor cores for a.b, one launch
  for all classes; used by "auto" on CUDA for float32 with d <= 64 (:func:`ncf_fast.backends.resolve`),
  or on request (CPU under TRITON_INTERPRET=1).
* ``torch``: the compiled C loop (:func:`ncf_fast.native.pair_sums`, float32 with small d on the
  CPU), else row blocks of at most ``_BLOCK_ELEMS`` pairs, so memory stays O((N + M) d) plus one
  block. For d > ``_DIRECT_MAX_D`` distances come from the Gram form |a|^2 + |b|^2 - 2 a.b (a
  GEMM); that form cancels for nearby points, so pairs with |a - b|^2 < _NEAR (|a|^2 + |b|^2) are
  recomputed from explicit differences (the "near-pair correction"): every pair ends up with the
  accuracy of the direct form, and coinciding points get exactly zero distance and gradient. For
  small d explicit differences are used throughout (cheaper than the GEMM plus the correction,
  which low-dimensional data triggers often).
* ``reference`` runs here as ``torch``; the estimators' brute-force twin is ncf_fast.reference.
"""
from __future__ import annotations

import torch

from . import backends, native

__all__ = ["pair_distance_sums", "segment_pair_distance_sums", "resolve_backend"]

# Pairs per block: 2^18 fp32 entries = 1 MB per (rows x M) matrix, so that the handful of
# elementwise passes over a block run from cache (measured ~2x faster than 8 MB blocks on CPU).
_BLOCK_ELEMS = 1 << 18
# Near-pair threshold relative to |a|^2 + |b|^2: the Gram form's rounding error is a few ulps of
# that sum, so above 2^-10 of it the computed |a - b| keeps ~1e-4 relative accuracy in fp32.
_NEAR = 2.0 ** -10
# Columns per block: at 4096 the column sums (Gb) cost 1/64 of a block's pair work.
_BLOCK_COLS = 4096
# torch path: explicit differences up to this d. Measured on CPU (1 thread, N = M = 4096, value
# + both gradients, CPU seconds): d = 2 direct 0.24 vs GEMM + near-pair fix 0.45 (the fix touches
# ~1e-3 of the pairs at d = 2); d = 3: 0.33 vs 0.34; d = 4: 0.40 vs 0.23.
_DIRECT_MAX_D = 2


def resolve_backend(backend: str, a: torch.Tensor) -> str:
    """The primitive's backend for a: "torch" or "triton" (:func:`ncf_fast.backends.select`;
    "reference" is handled by callers, the primitive runs it as torch)."""
    choice = backends.select(backend, "energy", a.device, a.dtype, a.shape[1])
    return backends.TORCH if choice == backends.REFERENCE else choice


def _torch_pair_sums(a, b, grad_a, grad_b, same):
    """The torch backend of :func:`pair_distance_sums` (see the module docstring).

    Blocks of at most _BLOCK_COLS columns x (_BLOCK_ELEMS / columns) rows, so that the column
    sums (Gb) cost O(columns) per block of _BLOCK_ELEMS pairs, not O(M) per few rows.
    """
    if native.usable(a, b):  # fp32, d <= native.MAX_D: the compiled loop
        return native.pair_sums(a, b, grad_a, grad_b, same)
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    direct = d <= _DIRECT_MAX_D
    bc = min(m, _BLOCK_COLS)
    br = max(1, _BLOCK_ELEMS // max(bc, 1))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    ga = torch.zeros_like(a) if grad_a else None
    gb = torch.zeros_like(b) if grad_b else None
    if direct:
        bt = b.t().contiguous()
    else:
        a2 = (a * a).sum(1, keepdim=True)
        b2 = (b * b).sum(1, keepdim=True)
        one_a, one_b = torch.ones_like(a2), torch.ones_like(b2)
        # one GEMM gives |a|^2 + |b|^2 - 2 a.b: [a, |a|^2, 1] [-2 b, 1, |b|^2]^T; and [x, 1]
        # gives the weight sums with the weighted sums (fewer passes over each block)
        a_aug, b_aug = torch.cat([a, a2, one_a], 1), torch.cat([-2.0 * b, one_b, b2], 1)
        a_one, b_one = torch.cat([a, one_a], 1), torch.cat([b, one_b], 1)
        # per-row near threshold: _NEAR * (|a_i|^2 + max_j |b_j|^2) bounds _NEAR * (|a_i|^2 +
        # |b_j|^2), so it flags a superset of the pairs that need it (they are only made exact)
        thr = _NEAR * (a2.squeeze(1) + b2.max())
    for c0 in range(0, m, bc):
        c1 = min(m, c0 + bc)
        bb = b[c0:c1]
        for r0 in range(0, n, br):
            r1 = min(n, r0 + br)
            ab = a[r0:r1]
            diag = r0 - c0  # the (i, i) pairs of a same pass sit on this diagonal of the block
            if direct:
                diffs = [ab[:, k:k + 1] - bt[k, c0:c1] for k in range(d)]
                d2 = diffs[0] * diffs[0]
                for k in range(1, d):
                    d2.addcmul_(diffs[k], diffs[k])
                dist = d2.sqrt_()  # the diagonal of a same pass is exactly 0 here
                total += dist.sum(1).sum(dtype=torch.float64)  # fp32 rows of <= _BLOCK_COLS, then fp64
                if not (grad_a or grad_b):
                    continue
                w = torch.nan_to_num_(dist.reciprocal_(), posinf=0.0)  # u(0) = 0
                for k in range(d):
                    wd = diffs[k].mul_(w)
                    if grad_a:
                        ga[r0:r1, k] += wd.sum(1)
                    if grad_b:
                        gb[c0:c1, k] -= wd.sum(0)
                continue
            d2 = a_aug[r0:r1] @ b_aug[c0:c1].t()
            if same:  # the diagonal (i, i) is 0 by definition: keep it out of the near set
                d2.diagonal(offset=diag).fill_(float("inf"))
            rows = torch.nonzero(d2.amin(1) <= thr[r0:r1]).squeeze(1)
            fix = rows.numel() > 0
            if fix:  # the flagged pairs, from explicit differences
                sub = d2[rows] <= thr[r0:r1][rows].unsqueeze(1)
                si, nj = sub.nonzero(as_tuple=True)
                ni = rows[si]
                diff = ab[ni] - bb[nj]
                d2[ni, nj] = (diff * diff).sum(1)
            dist = d2.clamp_min_(0.0).sqrt_()
            if same:
                dist.diagonal(offset=diag).fill_(0.0)
            total += dist.sum(1).sum(dtype=torch.float64)
            if not (grad_a or grad_b):
                continue
            # Gram-form gradient sum_j w_ij (a_i - b_j) with w = 1/|a_i - b_j| for the regular
            # pairs; near pairs (coinciding ones included) get w = 0 and are added exactly below
            w = dist.reciprocal_()
            if same:
                w.diagonal(offset=diag).fill_(0.0)
            if fix:
                w[ni, nj] = 0.0
                dn = (diff * diff).sum(1, keepdim=True).sqrt()
                unit = diff / torch.where(dn > 0, dn, torch.ones_like(dn))
            if grad_a:
                wb = w @ b_one[c0:c1]  # (sum_j w_ij b_j, sum_j w_ij)
                g = ga[r0:r1]
                g.addcmul_(ab, wb[:, d:]).sub_(wb[:, :d])
                if fix:
                    g.index_add_(0, ni, unit)
            if grad_b:
                wa = w.t() @ a_one[r0:r1]
                g = gb[c0:c1]
                g.addcmul_(bb, wa[:, d:]).sub_(wa[:, :d])
                if fix:
                    g.index_add_(0, nj, -unit)
    return total, ga, gb


def pair_distance_sums(a: torch.Tensor, b: torch.Tensor, *, grad_a: bool = False,
                       grad_b: bool = False, same: bool = False, backend: str = "auto"):
    """Sums over all pairs (i, j) of |a_i - b_j| and of the unit vectors u(a_i - b_j).

    Returns (S, Ga, Gb): S = sum_ij |a_i - b_j| (a 0-d tensor, accumulated in float64),
    Ga (N, d) = sum_j u(a_i - b_j) if grad_a, Gb (M, d) = sum_i u(b_j - a_i) if grad_b (else None).
    ``same=True`` says b is a (the diagonal pairs are 0 and skipped).
    backend: "auto" (:func:`ncf_fast.backends.resolve`), "torch" (one block of at most _BLOCK_ELEMS
    pairs at a time) or "triton" (O(N + M) memory; Gb costs a second, swapped launch).
    """
    if resolve_backend(backend, a) == backends.TORCH:
        return _torch_pair_sums(a, b, grad_a, grad_b, same)
    from .kernels.energy_distance import pair_sums
    if grad_b and not grad_a:  # the swapped pass alone gives S and Gb
        s, gb = pair_sums(b, a, grad=True)
        return s.sum(), None, gb.to(b.dtype)
    s, ga = pair_sums(a, b, grad=grad_a)
    gb = pair_sums(b, a, grad=True)[1].to(b.dtype) if grad_b else None
    return s.sum(), (ga.to(a.dtype) if grad_a else None), gb


def segment_pair_distance_sums(a, b, row_lo, row_hi, col_lo, col_hi, *, grad_a: bool = False,
                               grad_b: bool = False, same: bool = False, backend: str = "auto",
                               bounds=None):
    """:func:`pair_distance_sums` within K segments: rows [row_lo_k, row_hi_k) of a against rows
    [col_lo_k, col_hi_k) of b (integer tensors (K,); segments may be empty). ``bounds``: the same
    segments as Python ints, ((r0, r1, c0, c1) per segment), which spares the torch backend's
    loop a device-to-host copy.

    Returns S (K,) float64 per segment, Ga (N, d), Gb (M, d) (0 on rows outside every segment, or
    None). The triton backend runs every segment in one launch (two with Gb); the torch backend
    loops over segments. ``same=True``: b is a and segment k of the rows is segment k of the
    columns.
    """
    k_count = len(row_lo)
    if resolve_backend(backend, a) == backends.TRITON:
        from .kernels.energy_distance import segment_pair_sums
        s_rows, ga = segment_pair_sums(a, b, row_lo, row_hi, col_lo, col_hi, grad=grad_a)
        gb = None
        if grad_b:
            gb = segment_pair_sums(b, a, col_lo, col_hi, row_lo, row_hi, grad=True)[1].to(b.dtype)
        csum = torch.nn.functional.pad(torch.cumsum(s_rows, 0), (1, 0))
        sums = csum[row_hi.to(csum.device).long()] - csum[row_lo.to(csum.device).long()]
        return sums, (ga.to(a.dtype) if grad_a else None), gb
    sums = torch.zeros(k_count, dtype=torch.float64, device=a.device)
    ga = torch.zeros_like(a) if grad_a else None
    gb = torch.zeros_like(b) if grad_b else None
    if bounds is None:
        bounds = torch.stack([torch.as_tensor(x).long().cpu()
                              for x in (row_lo, row_hi, col_lo, col_hi)]).t().tolist()
    for k, (r0, r1, c0, c1) in enumerate(bounds):
        if r1 <= r0 or c1 <= c0:
            continue
        s, g1, g2 = _torch_pair_sums(a[r0:r1], b[c0:c1], grad_a, grad_b, same)
        sums[k] = s
        if grad_a:
            ga[r0:r1] = g1
        if grad_b:
            gb[c0:c1] += g2
    return sums, ga, gb
