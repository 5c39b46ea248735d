"""Squared energy distance (MMD with kernel -|x - y|) in linear memory.

Estimator (unbiased U-statistic, the one the trainer minimises), for a (N, d) and b (M, d):

    E(a, b) = 2/(NM) sum_ij |a_i - b_j| - 1/(N(N-1)) sum_{i!=i'} |a_i - a_i'|
              - 1/(M(M-1)) sum_{j!=j'} |b_j - b_j'|

Its expectation is the population squared energy distance, so its minimiser is not biased
towards contracted or spread-out pushes (the V-statistic, 1/N^2 weights, is). A within-set term
of a set with one sample has no pairs and is 0.

Gradients: dE/da_i = 2/(NM) sum_j u(a_i - b_j) - 2/(N(N-1)) sum_i' u(a_i - a_i'), with
u(v) = v/|v| and u(0) = 0 (the subgradient of minimal norm), likewise for b. All estimators
below are built from one primitive, the pair sums S = sum_ij |a_i - b_j| and the row / column
sums of u (:func:`pair_distance_sums`, and :func:`segment_pair_distance_sums` for label-sorted
classes), computed in the forward pass (they cost no extra pairs).

Backends of the primitive:

* ``triton`` (ncf_fast.kernels.energy_distance): tiled kernel, tensor cores for a.b, one launch
  for all classes; used by "auto" on CUDA for float32 with d <= 64 (:func:`ncf_fast.backends.resolve`),
  or on request (CPU under TRITON_INTERPRET=1).
* ``torch``: row blocks of at most ``_BLOCK_ELEMS`` pairs, so memory stays O((N + M) d) plus one
  block. For d > ``_DIRECT_MAX_D`` distances come from the Gram form |a|^2 + |b|^2 - 2 a.b (a
  GEMM); that form cancels for nearby points, so pairs with |a - b|^2 < _NEAR (|a|^2 + |b|^2) are
  recomputed from explicit differences (the "near-pair correction"): every pair ends up with the
  accuracy of the direct form, and coinciding points get exactly zero distance and gradient. For
  small d explicit differences are used throughout (cheaper than the GEMM plus the correction,
  which low-dimensional data triggers often).
* ``reference`` (energy_distance only): brute force, O(NMd) memory (ncf_fast.reference).

Inputs are centred by the mean of the pooled set first (per class for the class-conditional
losses; the energy distance is translation invariant), which keeps |a|^2 + |b|^2 and hence the
flagged set small.

Class-conditional rule: every class must have at least one sample on each side (a class missing
on one side is a ValueError naming it); a class with one sample on a side has no within-set
pairs there, so that term is 0 (its cross term still counts).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends, native, reference

__all__ = ["energy_distance", "class_conditional_energy_distance", "witness_energy_distance",
           "class_conditional_witness_energy_distance", "per_class_mean", "pair_distance_sums",
           "segment_pair_distance_sums", "ClassSegments", "class_segments",
           "segmented_energy_distance", "segmented_witness_energy_distance"]

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


def _resolve(backend: str, a: torch.Tensor) -> str:
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
    if _resolve(backend, a) == "torch":
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
    if _resolve(backend, a) == "triton":
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


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _energy_terms(a, b, need_a, need_b, backend):
    """(value, dE/da or None, dE/db or None) of the U-statistic, value in float64."""
    n, m = a.shape[0], b.shape[0]
    center = 0.5 * (a.mean(0) + b.mean(0))
    a_c, b_c = a - center, b - center
    s_ab, g_ab, g_ba = pair_distance_sums(a_c, b_c, grad_a=need_a, grad_b=need_b, backend=backend)
    value = s_ab * (2.0 / (n * m))
    ga = gb = None
    if n > 1:
        s_aa, g_aa, _ = pair_distance_sums(a_c, a_c, grad_a=need_a, same=True, backend=backend)
        value = value - s_aa / (n * (n - 1))
    if m > 1:
        s_bb, g_bb, _ = pair_distance_sums(b_c, b_c, grad_a=need_b, same=True, backend=backend)
        value = value - s_bb / (m * (m - 1))
    if need_a:
        ga = g_ab * (2.0 / (n * m))
        if n > 1:
            ga -= g_aa * (2.0 / (n * (n - 1)))
    if need_b:
        gb = g_ba * (2.0 / (n * m))
        if m > 1:
            gb -= g_bb * (2.0 / (m * (m - 1)))
    return value, ga, gb


class _EnergyDistance(torch.autograd.Function):
    """E(a, b) with both gradients computed in the forward pass (they cost no extra pairs)."""

    @staticmethod
    def forward(ctx, a, b, backend):
        need_a, need_b = ctx.needs_input_grad[:2]
        value, ga, gb = _energy_terms(a, b, need_a, need_b, backend)
        ctx.save_for_backward(ga, gb)
        return value.to(a.dtype)

    @staticmethod
    def backward(ctx, gout):
        ga, gb = ctx.saved_tensors
        return (gout * ga if ga is not None else None), (gout * gb if gb is not None else None), \
            None


def _check_pair(a, b, what="energy_distance"):
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"{what} takes torch tensors, got {type(a).__name__}, {type(b).__name__}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what} needs a (N, d) and b (M, d) with the same d, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 1 or b.shape[0] < 1:
        raise ValueError(f"{what} needs at least one sample in each set, "
                         f"got N={a.shape[0]}, M={b.shape[0]}")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise TypeError(f"{what} needs two floating tensors of one dtype, got {a.dtype}, {b.dtype}")


def energy_distance(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Unbiased squared energy distance between a (N, d) and b (M, d): a 0-d tensor.

    Differentiable in a and b; the gradient at coinciding points is finite (0 for that pair).
    backend: "torch" (block-wise, linear memory), "reference" (brute force, O(NMd) memory),
    "triton" (tiled kernel, linear memory; CUDA, or CPU under TRITON_INTERPRET=1, computes in
    float32), "auto" (triton on CUDA for float32 with d <= 64, else torch:
    :func:`ncf_fast.backends.resolve`). Without autograd (no_grad, or no
    input requiring grad) only the value is computed.
    """
    _check_pair(a, b)
    if backend == "reference":
        return reference.energy_distance(a, b)
    backend = _resolve(backend, a)
    if not _needs_grad(a, b):
        return _energy_terms(a, b, False, False, backend)[0].to(a.dtype)
    return _EnergyDistance.apply(a, b, backend)


class _WitnessEnergy(torch.autograd.Function):
    """Value: unbiased estimate of E(T#mu, nu); gradient: unbiased for dE/da_i (see the wrapper)."""

    @staticmethod
    def forward(ctx, a, passive, b, within_rows, backend):
        n, k, m = a.shape[0], passive.shape[0], b.shape[0]
        need = ctx.needs_input_grad[0]
        center = 0.5 * (passive.mean(0) + b.mean(0))
        a_c, p_c, b_c = a - center, passive - center, b - center
        s_ab, g_ab, _ = pair_distance_sums(a_c, b_c, grad_a=need, backend=backend)
        s_ap, g_ap, _ = pair_distance_sums(a_c, p_c, grad_a=need, backend=backend)
        value = s_ab * (2.0 / (n * m)) - s_ap / (n * k)
        mb = min(m, within_rows)
        if mb > 1:  # E|Y - Y'| is a constant: an unbiased estimate from a subsample is enough
            s_bb, _, _ = pair_distance_sums(b_c[:mb], b_c[:mb], same=True, backend=backend)
            value = value - s_bb / (mb * (mb - 1))
        ctx.save_for_backward(g_ab * (2.0 / (n * m)) - g_ap * (2.0 / (n * k)) if need else None)
        return value.to(a.dtype)

    @staticmethod
    def backward(ctx, gout):
        (ga,) = ctx.saved_tensors
        return gout * ga, None, None, None, None


def witness_energy_distance(active: torch.Tensor, passive: torch.Tensor, target: torch.Tensor,
                            within_rows: int = 512, backend: str = "auto") -> torch.Tensor:
    """Energy distance estimated from the pushed samples' witness function (*ours*, for training).

    active (N, d): pushed samples T(x_i) that carry the gradient; passive (K, d): more pushed
    samples T(x'_k), independent of ``active`` (their gradient is not taken); target (M, d).

    Value: 2/(NM) sum |a_i - b_j| - 1/(NK) sum |a_i - c_k| - 1/(M'(M'-1)) sum_{j!=j'} |b_j - b_j'|
    (M' = min(M, within_rows) rows of the target), an unbiased estimate of E(T#mu, nu).
    Gradient with respect to a_i: 2/(NM) sum_j u(a_i - b_j) - 2/(NK) sum_k u(a_i - c_k), an
    unbiased estimate of the population gradient dE/dT(x_i) (the factor 2 on the second sum is
    the symmetry of E|T(X) - T(X')|). Its noise falls like 1/sqrt(M) + 1/sqrt(K) for O(N(M + K))
    pairs, against 1/sqrt(N) for the N^2 pairs of the U-statistic over N pushed samples: a few
    active samples against many passive ones and targets give a far quieter gradient per pair.
    backend: "auto" | "torch" | "triton", as for :func:`energy_distance`.
    """
    _check_pair(active, target, "witness_energy_distance")
    _check_pair(passive, target, "witness_energy_distance")
    backend = _resolve(backend, active)
    if not _needs_grad(active):
        with torch.no_grad():
            return _WitnessEnergy.forward(_ValueCtx(), active, passive, target, int(within_rows),
                                          backend)
    return _WitnessEnergy.apply(active, passive.detach(), target.detach(), int(within_rows),
                                backend)


class _ValueCtx:
    """Stands in for autograd's ctx when only the value is wanted (no gradient passes)."""
    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors):
        pass


# ---------------------------------------------------------------------------------------------
# class-conditional losses: label-sorted segments, one primitive call per term for all classes

class ClassSegments(NamedTuple):
    """Where each class sits in a set once its rows are sorted by class (K classes).

    order (n,): row indices of the set, class by class (stable); lo, hi (K,): class k is
    sorted rows [lo_k, hi_k); ids (n,): the class index of each sorted row; bounds: the (lo_k,
    hi_k) as Python ints. Computed once, they let a loss run with no device-to-host copy.
    """
    order: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    ids: torch.Tensor
    bounds: tuple

    @property
    def counts(self) -> torch.Tensor:
        return self.hi - self.lo

    @classmethod
    def blocks(cls, n_classes: int, per_class: int, batches: int = 1, device=None):
        """Segments of ``batches`` blocks concatenated, each holding ``per_class`` rows of class
        0, then of class 1, ... (the layout of stratified draws, :meth:`SampleSet.draw`)."""
        rows = torch.arange(batches * n_classes * per_class, device=device)
        order = rows.view(batches, n_classes, per_class).transpose(0, 1).reshape(-1)
        size = batches * per_class
        lo = torch.arange(n_classes, device=device) * size
        ids = torch.arange(n_classes, device=device).repeat_interleave(size)
        bounds = tuple((k * size, (k + 1) * size) for k in range(n_classes))
        return cls(order, lo, lo + size, ids, bounds)


def class_segments(labels, classes, what: str = "class_segments", side: str = "",
                   require: bool = True) -> ClassSegments:
    """:class:`ClassSegments` of the rows whose label is in ``classes`` (a sorted tensor (K,));
    rows of other labels are left out. ``require``: ValueError naming the classes with no row.
    Copies the class bounds to the host once."""
    if labels.dim() != 1:
        raise ValueError(f"{what}: {side} labels must be 1-d, got shape {tuple(labels.shape)}")
    classes = classes.to(labels.device, labels.dtype)
    rows = torch.nonzero(torch.isin(labels, classes)).squeeze(1)
    order = rows[torch.argsort(labels[rows], stable=True)]
    ordered = labels[order]
    lo = torch.searchsorted(ordered, classes)
    hi = torch.searchsorted(ordered, classes, right=True)
    bounds = tuple(map(tuple, torch.stack((lo, hi), 1).tolist()))
    empty = [c for c, (l0, h0) in zip(classes.tolist(), bounds) if h0 == l0]
    if require and empty:
        raise ValueError(f"{what}: classes {empty} have no {side} samples; every class needs at "
                         f"least one sample on each side (drop the class or sample it)")
    ids = torch.repeat_interleave(torch.arange(len(bounds), device=labels.device), hi - lo,
                                  output_size=len(order))
    return ClassSegments(order, lo, hi, ids, bounds)


def _pair_bounds(rows: ClassSegments, cols: ClassSegments) -> tuple:
    """(r0, r1, c0, c1) per class: :func:`segment_pair_distance_sums`' host bounds."""
    return tuple(r + c for r, c in zip(rows.bounds, cols.bounds))


def _segment_mean(x, seg, counts):
    total = torch.zeros((len(counts), x.shape[1]), dtype=x.dtype, device=x.device)
    return total.index_add_(0, seg, x) / counts.to(x.dtype).unsqueeze(1)


def _within_weight(counts):
    """1 / (c (c - 1)) per class of c samples: the within-set pairs' weight in the U-statistic; 0
    for a class with one sample, which has no within pairs (the class-conditional rule above)."""
    return torch.where(counts > 1, 1.0 / (counts * (counts - 1)).clamp_min(1.0),
                       torch.zeros_like(counts))


def _unsort(g, order, n_rows):
    """Rows of a label-sorted gradient back in input order (0 for rows of no listed class)."""
    out = g.new_zeros((n_rows, g.shape[1]))
    out[order] = g
    return out


class _ClassConditionalEnergy(torch.autograd.Function):
    """Mean over classes of E(a_k, b_k), both gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, a, b, seg_a, seg_b, backend):
        need_a, need_b = ctx.needs_input_grad[:2]
        n, m = seg_a.counts.double(), seg_b.counts.double()
        ids_a, ids_b = seg_a.ids, seg_b.ids
        a_s, b_s = a[seg_a.order], b[seg_b.order]
        center = 0.5 * (_segment_mean(a_s, ids_a, n) + _segment_mean(b_s, ids_b, m))
        a_c, b_c = a_s - center[ids_a], b_s - center[ids_b]
        kw = dict(backend=backend)
        s_ab, g_ab, g_ba = segment_pair_distance_sums(
            a_c, b_c, seg_a.lo, seg_a.hi, seg_b.lo, seg_b.hi, grad_a=need_a, grad_b=need_b,
            bounds=_pair_bounds(seg_a, seg_b), **kw)
        s_aa, g_aa, _ = segment_pair_distance_sums(
            a_c, a_c, seg_a.lo, seg_a.hi, seg_a.lo, seg_a.hi, grad_a=need_a, same=True,
            bounds=_pair_bounds(seg_a, seg_a), **kw)
        s_bb, g_bb, _ = segment_pair_distance_sums(
            b_c, b_c, seg_b.lo, seg_b.hi, seg_b.lo, seg_b.hi, grad_a=need_b, same=True,
            bounds=_pair_bounds(seg_b, seg_b), **kw)
        w_aa, w_bb = _within_weight(n), _within_weight(m)
        w_ab = 2.0 / (n * m)
        k = len(seg_a.bounds)
        value = (w_ab * s_ab - w_aa * s_aa - w_bb * s_bb).mean()
        ga = gb = None
        if need_a:
            ga = _unsort(((w_ab[ids_a, None] * g_ab - 2 * w_aa[ids_a, None] * g_aa) / k)
                         .to(a.dtype), seg_a.order, a.shape[0])
        if need_b:
            gb = _unsort(((w_ab[ids_b, None] * g_ba - 2 * w_bb[ids_b, None] * g_bb) / k)
                         .to(b.dtype), seg_b.order, b.shape[0])
        ctx.save_for_backward(ga, gb)
        return value.to(a.dtype)

    @staticmethod
    def backward(ctx, gout):
        ga, gb = ctx.saved_tensors
        return (gout * ga if ga is not None else None), (gout * gb if gb is not None else None), \
            None, None, None


def _check_labels(x, labels, what, side):
    if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{what}: {side} labels must be an integer tensor of shape "
                         f"({x.shape[0]},), got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{what}: labels must be integers, got {labels.dtype}")


def class_conditional_energy_distance(a, b, labels_a, labels_b, backend: str = "auto"):
    """Mean over classes k of the energy distances between a[labels_a == k] and b[labels_b == k].

    a (N, d), b (M, d); labels: integer tensors (N,), (M,). Every class present in one set must
    be present in the other (else ValueError); a class with a single sample on one side
    contributes its cross term (its within-set term has no pairs and is 0). All classes go
    through one call of the primitive per term (one kernel launch on the triton backend).
    backend: "auto" | "torch" | "triton" | "reference" (a Python loop over classes).
    Finding the classes copies them to the host; :func:`segmented_energy_distance` with
    segments computed once does not.
    """
    what = "class_conditional_energy_distance"
    _check_pair(a, b, what)
    _check_labels(a, labels_a, what, "source")
    _check_labels(b, labels_b, what, "target")
    classes_a, classes_b = torch.unique(labels_a), torch.unique(labels_b)
    if classes_a.shape != classes_b.shape or not torch.equal(classes_a.cpu(), classes_b.cpu()):
        only_a = sorted(set(classes_a.tolist()) - set(classes_b.tolist()))
        only_b = sorted(set(classes_b.tolist()) - set(classes_a.tolist()))
        raise ValueError(f"classes must appear in both sets: only in source {only_a}, "
                         f"only in target {only_b}")
    if backend == "reference":
        return torch.stack([reference.energy_distance(a[labels_a == k], b[labels_b == k])
                            for k in classes_a]).mean()
    return segmented_energy_distance(a, b, class_segments(labels_a, classes_a, what, "source"),
                                     class_segments(labels_b, classes_a, what, "target"), backend)


def segmented_energy_distance(a, b, seg_a: ClassSegments, seg_b: ClassSegments,
                              backend: str = "auto"):
    """:func:`class_conditional_energy_distance` for classes already located: ``seg_a``,
    ``seg_b`` (:class:`ClassSegments`, class k of one is class k of the other, every class
    non-empty) from :func:`class_segments` or :meth:`ClassSegments.blocks`. No host sync."""
    _check_pair(a, b, "segmented_energy_distance")
    backend = _resolve(backend, a)
    if not _needs_grad(a, b):
        with torch.no_grad():
            return _ClassConditionalEnergy.forward(_ValueCtx(), a, b, seg_a, seg_b, backend)
    return _ClassConditionalEnergy.apply(a, b, seg_a, seg_b, backend)


class _ClassConditionalWitness(torch.autograd.Function):
    """Mean over classes of the witness estimate (witness_energy_distance), one pass per term."""

    @staticmethod
    def forward(ctx, a, passive, b, seg_a, seg_p, seg_b, within_rows, backend):
        need = ctx.needs_input_grad[0]
        n, kk, m = (seg.counts.double() for seg in (seg_a, seg_p, seg_b))
        ids_a, ids_p, ids_b = seg_a.ids, seg_p.ids, seg_b.ids
        a_s, p_s, b_s = a[seg_a.order], passive[seg_p.order], b[seg_b.order]
        center = 0.5 * (_segment_mean(p_s, ids_p, kk) + _segment_mean(b_s, ids_b, m))
        a_c, p_c, b_c = a_s - center[ids_a], p_s - center[ids_p], b_s - center[ids_b]
        s_ab, g_ab, _ = segment_pair_distance_sums(
            a_c, b_c, seg_a.lo, seg_a.hi, seg_b.lo, seg_b.hi, grad_a=need, backend=backend,
            bounds=_pair_bounds(seg_a, seg_b))
        s_ap, g_ap, _ = segment_pair_distance_sums(
            a_c, p_c, seg_a.lo, seg_a.hi, seg_p.lo, seg_p.hi, grad_a=need, backend=backend,
            bounds=_pair_bounds(seg_a, seg_p))
        # the within-target constant from each class's first min(m_k, within_rows) rows
        lo_b = seg_b.lo
        hi_w = torch.minimum(seg_b.hi, lo_b + within_rows)
        bounds_w = tuple((l0, min(h0, l0 + within_rows)) * 2 for l0, h0 in seg_b.bounds)
        s_bb, _, _ = segment_pair_distance_sums(b_c, b_c, lo_b, hi_w, lo_b, hi_w, same=True,
                                                backend=backend, bounds=bounds_w)
        w_bb = _within_weight((hi_w - lo_b).double())
        value = (2.0 / (n * m) * s_ab - s_ap / (n * kk) - w_bb * s_bb).mean()
        ga = None
        if need:
            k = len(seg_a.bounds)
            g = ((2.0 / (n * m))[ids_a, None] * g_ab - (2.0 / (n * kk))[ids_a, None] * g_ap) / k
            ga = _unsort(g.to(a.dtype), seg_a.order, a.shape[0])
        ctx.save_for_backward(ga)
        return value.to(a.dtype)

    @staticmethod
    def backward(ctx, gout):
        (ga,) = ctx.saved_tensors
        return gout * ga, None, None, None, None, None, None, None


def class_conditional_witness_energy_distance(active, passive, target, labels_active,
                                              labels_passive, labels_target, classes=None,
                                              within_rows: int = 512, backend: str = "auto"):
    """Mean over ``classes`` (default: the classes of ``labels_target``) of
    witness_energy_distance(active_k, passive_k, target_k, within_rows), one primitive call per
    term for all classes. Every class needs at least one sample in each of the three sets
    (else ValueError); the within-target term of a class with one target sample is 0.
    Finding the classes copies them to the host; :func:`segmented_witness_energy_distance`
    with segments computed once does not.
    """
    what = "class_conditional_witness_energy_distance"
    _check_pair(active, target, what)
    _check_pair(passive, target, what)
    sets = ((active, labels_active, "active"), (passive, labels_passive, "passive"),
            (target, labels_target, "target"))
    for x, lab, side in sets:
        _check_labels(x, lab, what, side)
    classes = torch.unique(labels_target) if classes is None else torch.unique(
        torch.as_tensor(classes))
    segs = [class_segments(lab, classes, what, side) for x, lab, side in sets]
    return segmented_witness_energy_distance(active, passive, target, *segs,
                                             within_rows=within_rows, backend=backend)


def segmented_witness_energy_distance(active, passive, target, seg_active: ClassSegments,
                                      seg_passive: ClassSegments, seg_target: ClassSegments,
                                      within_rows: int = 512, backend: str = "auto"):
    """:func:`class_conditional_witness_energy_distance` for classes already located (see
    :func:`segmented_energy_distance`): what the trainer calls each step. No host sync."""
    what = "segmented_witness_energy_distance"
    _check_pair(active, target, what)
    _check_pair(passive, target, what)
    backend = _resolve(backend, active)
    args = (passive.detach(), target.detach(), seg_active, seg_passive, seg_target,
            int(within_rows), backend)
    if not _needs_grad(active):
        with torch.no_grad():
            return _ClassConditionalWitness.forward(_ValueCtx(), active, *args)
    return _ClassConditionalWitness.apply(active, *args)


def per_class_mean(fn, classes, *sets_and_labels):
    """Mean over ``classes`` of fn(x1[labels1 == k], x2[labels2 == k], ...).

    For fn = witness_energy_distance (the trainer's class-conditional loss) or energy_distance
    every class is done in one primitive call per term (label-sorted segments, one kernel launch
    on the triton backend); any other fn is called per class.
    """
    classes = torch.as_tensor(classes)
    if fn is witness_energy_distance and len(sets_and_labels) == 3:
        (a, la), (p, lp), (b, lb) = sets_and_labels
        return class_conditional_witness_energy_distance(a, p, b, la, lp, lb, classes=classes)
    if fn is energy_distance and len(sets_and_labels) == 2:
        (a, la), (b, lb) = sets_and_labels
        what = "per_class_mean(energy_distance)"
        _check_pair(a, b, what)
        classes = torch.unique(classes)
        return segmented_energy_distance(a, b, class_segments(la, classes, what, "source"),
                                         class_segments(lb, classes, what, "target"))
    terms = [fn(*(x[lab == k] for x, lab in sets_and_labels)) for k in classes]
    return torch.stack(terms).mean()
