"""Squared energy distance (MMD with kernel -|x - y|) in linear memory: its estimators.

Estimator (unbiased U-statistic, the one the trainer minimises), for a (N, d) and b (M, d):

    E(a, b) = 2/(NM) sum_ij |a_i - b_j| - 1/(N(N-1)) sum_{i!=i'} |a_i - a_i'|
              - 1/(M(M-1)) sum_{j!=j'} |b_j - b_j'|

Its expectation is the population squared energy distance, so its minimiser is not biased
towards contracted or spread-out pushes (the V-statistic, 1/N^2 weights, is). A within-set term
of a set with one sample has no pairs and is 0.

Gradients: dE/da_i = 2/(NM) sum_j u(a_i - b_j) - 2/(N(N-1)) sum_i' u(a_i - a_i'), with
u(v) = v/|v| and u(0) = 0 (the subgradient of minimal norm), likewise for b. All estimators
below are built from one primitive, the pair sums S = sum_ij |a_i - b_j| and the row / column
sums of u (:func:`ncf_fast.pair_sums.pair_distance_sums`, and its segmented form for
label-sorted classes), computed in the forward pass (they cost no extra pairs).

Every estimator is a plain function returning (value in float64, the gradient of each input
it was asked for); one autograd Function (:class:`_GradientInForward`) hands those gradients to
autograd. Backends: those of the primitive (:mod:`ncf_fast.pair_sums`), plus ``reference``
(brute force, O(NMd) memory, ncf_fast.reference) for :func:`energy_distance` and
:func:`class_conditional_energy_distance`.

Inputs are centred by the mean of the pooled set first (per class for the class-conditional
losses; the energy distance is translation invariant), which keeps |a|^2 + |b|^2 and hence the
flagged set small.

Class-conditional rule: every class must have at least one sample on each side (a class missing
on one side is a ValueError naming it); a class with one sample on a side has no within-set
pairs there, so that term is 0 (its cross term still counts).

Estimators over rows spread across processes (torchrun): :func:`rows_energy_distance` is one
rank's share of the union's U-statistic; :mod:`ncf_fast.distributed` gathers the rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends, reference
from .pair_sums import pair_distance_sums, resolve_backend, segment_pair_distance_sums

__all__ = ["energy_distance", "class_conditional_energy_distance", "witness_energy_distance",
           "class_conditional_witness_energy_distance", "ClassSegments", "class_segments",
           "segmented_energy_distance", "segmented_witness_energy_distance",
           "rows_energy_distance"]


# ---------------------------------------------------------------------------------------------
# the one autograd Function: the estimators compute their gradients in the forward pass

class _GradientInForward(torch.autograd.Function):
    """value = estimator(*inputs, *args, need=...)[0]; backward scales the gradients the
    estimator returned with it (they cost no extra pairs, so no pass is saved for backward)."""

    @staticmethod
    def forward(ctx, estimator, args, *inputs):
        value, *grads = estimator(*inputs, *args, need=ctx.needs_input_grad[2:])
        ctx.save_for_backward(*grads)
        return value.to(inputs[0].dtype)

    @staticmethod
    def backward(ctx, gout):
        return (None, None, *(gout * g if g is not None else None for g in ctx.saved_tensors))


def _estimate(estimator, inputs: tuple, *args) -> torch.Tensor:
    """estimator's value, differentiable in ``inputs`` (the tensors it returns gradients for);
    without autograd (no_grad, or no input requiring grad) only the value is computed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _GradientInForward.apply(estimator, args, *inputs)
    with torch.no_grad():
        return estimator(*inputs, *args, need=(False,) * len(inputs))[0].to(inputs[0].dtype)


# ---------------------------------------------------------------------------------------------
# estimators: (value float64, gradient per input or None)

def _plain(a, b, backend, need):
    """The U-statistic E(a, b) and dE/da, dE/db."""
    need_a, need_b = need
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


def _witness(a, passive, b, within_rows, backend, need):
    """The witness estimate (:func:`witness_energy_distance`) and its gradient for a."""
    n, k, m = a.shape[0], passive.shape[0], b.shape[0]
    (need_a,) = need
    center = 0.5 * (passive.mean(0) + b.mean(0))
    a_c, p_c, b_c = a - center, passive - center, b - center
    s_ab, g_ab, _ = pair_distance_sums(a_c, b_c, grad_a=need_a, backend=backend)
    s_ap, g_ap, _ = pair_distance_sums(a_c, p_c, grad_a=need_a, backend=backend)
    value = s_ab * (2.0 / (n * m)) - s_ap / (n * k)
    mb = min(m, within_rows)
    if mb > 1:  # E|Y - Y'| is a constant: an unbiased estimate from a subsample is enough
        s_bb, _, _ = pair_distance_sums(b_c[:mb], b_c[:mb], same=True, backend=backend)
        value = value - s_bb / (mb * (mb - 1))
    return value, (g_ab * (2.0 / (n * m)) - g_ap * (2.0 / (n * k)) if need_a else None)


def _class_conditional(a, b, seg_a, seg_b, backend, need):
    """The mean over classes of E(a_k, b_k) and both gradients."""
    need_a, need_b = need
    n, m = seg_a.counts.double(), seg_b.counts.double()
    a_c, b_c = _sorted_centred(((a, seg_a), (b, seg_b)), pooled=(0, 1))
    s_ab, g_ab, g_ba = _segment_sums(a_c, b_c, seg_a, seg_b, backend, grad_a=need_a, grad_b=need_b)
    s_aa, g_aa, _ = _segment_sums(a_c, a_c, seg_a, seg_a, backend, grad_a=need_a, same=True)
    s_bb, g_bb, _ = _segment_sums(b_c, b_c, seg_b, seg_b, backend, grad_a=need_b, same=True)
    w_aa, w_bb, w_ab = _within_weight(n), _within_weight(m), 2.0 / (n * m)
    value = (w_ab * s_ab - w_aa * s_aa - w_bb * s_bb).mean()
    ga = _class_gradient(a, seg_a, (w_ab, g_ab), (-2 * w_aa, g_aa)) if need_a else None
    gb = _class_gradient(b, seg_b, (w_ab, g_ba), (-2 * w_bb, g_bb)) if need_b else None
    return value, ga, gb


def _class_conditional_witness(a, passive, b, seg_a, seg_p, seg_b, within_rows, backend, need):
    """The mean over classes of the witness estimate and its gradient for a."""
    (need_a,) = need
    n, kk, m = (seg.counts.double() for seg in (seg_a, seg_p, seg_b))
    a_c, p_c, b_c = _sorted_centred(((a, seg_a), (passive, seg_p), (b, seg_b)), pooled=(1, 2))
    s_ab, g_ab, _ = _segment_sums(a_c, b_c, seg_a, seg_b, backend, grad_a=need_a)
    s_ap, g_ap, _ = _segment_sums(a_c, p_c, seg_a, seg_p, backend, grad_a=need_a)
    # the within-target constant from each class's first min(m_k, within_rows) rows
    lo_b = seg_b.lo
    hi_w = torch.minimum(seg_b.hi, lo_b + within_rows)
    bounds_w = tuple((l0, min(h0, l0 + within_rows)) * 2 for l0, h0 in seg_b.bounds)
    s_bb, _, _ = segment_pair_distance_sums(b_c, b_c, lo_b, hi_w, lo_b, hi_w, same=True,
                                            backend=backend, bounds=bounds_w)
    w_bb = _within_weight((hi_w - lo_b).double())
    value = (2.0 / (n * m) * s_ab - s_ap / (n * kk) - w_bb * s_bb).mean()
    ga = _class_gradient(a, seg_a, (2.0 / (n * m), g_ab), (-2.0 / (n * kk), g_ap)) if need_a else None
    return value, ga


def _rows(a, a_all, b, b_all, segs, world, backend, need):
    """world x this rank's rows of the union's class-conditional U-statistic, gradient for a."""
    sa, spa, sb, spb = segs
    (need_a,) = need
    n, m = spa.counts.double(), spb.counts.double()  # the union's class counts
    a_c, pa_c, b_c, pb_c = _sorted_centred(((a, sa), (a_all, spa), (b, sb), (b_all, spb)),
                                           pooled=(1, 3))
    s_ab, g_ab, _ = _segment_sums(a_c, pb_c, sa, spb, backend, grad_a=need_a)
    # this rank's rows against the union, itself included: the self pair is exactly 0 (equal
    # bits) and adds nothing, so the sum over i' != i is the sum over every i'
    s_aa, g_aa, _ = _segment_sums(a_c, pa_c, sa, spa, backend, grad_a=need_a)
    s_bb, _, _ = _segment_sums(b_c, pb_c, sb, spb, backend)
    w_aa, w_bb, w_ab = _within_weight(n), _within_weight(m), 2.0 / (n * m)
    value = world * (w_ab * s_ab - w_aa * s_aa - w_bb * s_bb).mean()
    # the factor 2 on the within term: this row's pairs and their mirror columns
    ga = _class_gradient(a, sa, (w_ab, g_ab), (-2 * w_aa, g_aa), scale=world) if need_a else None
    return value, ga


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


def _sorted_centred(sets, pooled):
    """The (x, segments) sets sorted by class, each row minus the midpoint of its class's means
    in the two sets ``pooled`` names (per-class centring: see the module docstring)."""
    xs = [x[seg.order] for x, seg in sets]
    (i, si), (j, sj) = ((k, sets[k][1]) for k in pooled)
    center = 0.5 * (_segment_mean(xs[i], si.ids, si.counts) + _segment_mean(xs[j], sj.ids, sj.counts))
    return tuple(x - center[seg.ids] for x, (_, seg) in zip(xs, sets))


def _segment_sums(x, y, seg_x: ClassSegments, seg_y: ClassSegments, backend, **flags):
    """:func:`segment_pair_distance_sums` of class k of x against class k of y, for every k."""
    return segment_pair_distance_sums(x, y, seg_x.lo, seg_x.hi, seg_y.lo, seg_y.hi,
                                      backend=backend, bounds=_pair_bounds(seg_x, seg_y), **flags)


def _class_gradient(x, seg: ClassSegments, *terms, scale=1.0):
    """scale x the mean over classes of sum_t w_t[class] g_t (sorted rows), in x's row order."""
    g = None
    for w, gt in terms:
        term = w[seg.ids, None] * gt
        g = term if g is None else g + term
    return _unsort((scale * g / len(seg.bounds)).to(x.dtype), seg.order, x.shape[0])


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


# ---------------------------------------------------------------------------------------------
# the public losses: checks, then one estimator through _estimate

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
    if backend == backends.REFERENCE:
        return reference.energy_distance(a, b)
    return _estimate(_plain, (a, b), resolve_backend(backend, a))


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
    return _estimate(_witness, (active,), passive.detach(), target.detach(), int(within_rows),
                     resolve_backend(backend, active))


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
    if backend == backends.REFERENCE:
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
    return _estimate(_class_conditional, (a, b), seg_a, seg_b, resolve_backend(backend, a))


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
    return _estimate(_class_conditional_witness, (active,), passive.detach(), target.detach(),
                     seg_active, seg_passive, seg_target, int(within_rows),
                     resolve_backend(backend, active))


def rows_energy_distance(a, a_all, b, b_all, world: int, labels_a=None, labels_a_all=None,
                         labels_b=None, labels_b_all=None, backend: str = "auto"):
    """world x (this rank's rows of the unbiased energy distance between a_all and b_all).

    a (n, d): this rank's pushed samples (differentiable); a_all (N, d), b_all (M, d): the union
    (``world`` ranks' a and b, gathered, no gradient), b (m, d): this rank's targets. With labels
    (all four), the class-conditional mean over the classes of labels_b_all. Summed over ranks
    and divided by ``world``, the values and the gradients are those of
    :func:`ncf_fast.energy.energy_distance` (or its class-conditional form) on the union.
    """
    what = "distributed energy_distance"
    if labels_a is None:
        labels_a, labels_b = (torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                              for x in (a, b))
        labels_a_all, labels_b_all = (torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                                      for x in (a_all, b_all))
    classes = torch.unique(labels_b_all)
    segs = [class_segments(lab, classes, what, side, require) for lab, side, require in
            ((labels_a, "source", False), (labels_a_all, "source", True),
             (labels_b, "target", False), (labels_b_all, "target", True))]
    return _estimate(_rows, (a,), a_all.detach(), b.detach(), b_all.detach(), segs, int(world),
                     resolve_backend(backend, a))
