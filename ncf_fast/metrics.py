"""Accuracy metrics for transport maps.

    L2-UVP(T^) = 100 E_mu |T^(x) - T*(x)|^2 / Var(nu)     (%, Var = trace of the covariance)
"""
from __future__ import annotations

import numpy as np
import torch

from .energy import energy_distance as _energy_distance

__all__ = ["l2_uvp", "energy_distance", "w2_exact", "cycle_error", "cycle_error_relative",
           "transport_metrics"]


def _np(x, name) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got {x.shape}")
    return x


def l2_uvp(pred, true, target) -> float:
    """L2 unexplained variance percentage of a map.

    Args:
        pred: T^(x) at samples x ~ mu, (N, d).
        true: T*(x) at the same samples, (N, d).
        target: samples of the target measure (M, d), for Var(nu) = trace Cov.
    Returns:
        100 mean_i |pred_i - true_i|^2 / Var(target), in percent.
    For a backward map pass T^-1(y), T*^-1(y) for y ~ nu and samples of mu as ``target``.
    """
    pred, true, target = _np(pred, "pred"), _np(true, "true"), _np(target, "target")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    var = target.var(axis=0, ddof=1).sum()
    return float(100.0 * ((pred - true) ** 2).sum(1).mean() / var)


def energy_distance(a, b) -> float:
    """Unbiased squared energy distance between samples a (N, d) and b (M, d), in float64."""
    a = torch.as_tensor(_np(a, "a"))
    b = torch.as_tensor(_np(b, "b"))
    return float(_energy_distance(a, b))


def w2_exact(a, b, squared: bool = False) -> float:
    """Exact 2-Wasserstein distance between two empirical measures (uniform weights).

    W2^2 = min over couplings of E |x - y|^2 (no 1/2). Equal sizes use the assignment problem
    (scipy's linear_sum_assignment, a few thousand points); unequal sizes solve the transport LP
    (scipy's HiGHS, up to ~250k variables). Returns W2, or W2^2 with ``squared=True``.
    """
    from scipy.optimize import linear_sum_assignment, linprog
    from scipy.spatial.distance import cdist

    a, b = _np(a, "a"), _np(b, "b")
    cost = cdist(a, b, "sqeuclidean")
    n, m = cost.shape
    if n == m:
        rows, cols = linear_sum_assignment(cost)
        w2 = cost[rows, cols].mean()
    else:
        if n * m > 250_000:
            raise ValueError(f"w2_exact with unequal sizes solves an LP with N*M = {n * m} variables; "
                             "use at most 250,000 (subsample) or equal sizes")
        from scipy.sparse import csr_matrix
        cols = np.arange(n * m)
        a_eq = csr_matrix((np.ones(2 * n * m), (np.concatenate([cols // m, n + cols % m]),
                                                 np.concatenate([cols, cols]))), shape=(n + m, n * m))
        b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
        res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
        if not res.success:
            raise RuntimeError(f"w2_exact: the transport LP failed: {res.message}")
        w2 = res.fun
    w2 = max(float(w2), 0.0)
    return w2 if squared else float(np.sqrt(w2))


def cycle_error(model, x) -> float:
    """Mean |T^-1(T(x)) - x| over the rows of x, in the data's units.

    ``model`` is a fitted :class:`ncf_fast.NCF`. Zero for an exact pair of inverse maps; it
    measures how consistent the closed-form forward and backward maps are.
    """
    back = model.inverse(model.transport(x))
    diff = _np(back, "T^-1(T(x))") - _np(x, "x")
    return float(np.linalg.norm(diff, axis=1).mean())


def cycle_error_relative(model, x) -> float:
    """100 E|T^-1(T(x)) - x|^2 / Var(x) over the rows of x (%, Var = trace of the covariance).

    The cycle error on L2-UVP's scale: the squared round-trip error of a fitted
    :class:`ncf_fast.NCF` relative to the variance of the samples ``x`` (N >= 2, the source's).
    """
    xs = _np(x, "x")
    if xs.shape[0] < 2:
        raise ValueError(f"cycle_error_relative needs at least 2 rows, got {xs.shape[0]}")
    back = _np(model.inverse(model.transport(x)), "T^-1(T(x))")
    return float(100.0 * ((back - xs) ** 2).sum(1).mean() / xs.var(axis=0, ddof=1).sum())


def transport_metrics(model, x, y, pushed, pulled, rows_x, rows_y, oracle=None) -> dict:
    """The accuracy block of ``ncf-fast evaluate`` and of a run's metrics.json.

    x (N, d), y (M, d): source and target samples; pushed = T(x) (N, d), pulled = T^-1(y) (M, d);
    rows_x, rows_y: the rows the O(n^2) energy distances and the cycle error use (index arrays);
    oracle: an object with ``forward_map``/``inverse_map`` (the exact maps, e.g.
    :class:`ncf_fast.problems.GaussianOT`) adds the L2-UVP of both maps over all rows.
    Returns floats: energy distances in data units, the relative cycle error and L2-UVP in %.
    """
    xs, ys = x[rows_x], y[rows_y]
    out = {"energy_distance_initial": energy_distance(xs, ys),
           "energy_distance_forward": energy_distance(pushed[rows_x], ys),
           "energy_distance_backward": energy_distance(pulled[rows_y], xs),
           "cycle_error": cycle_error(model, xs),
           "cycle_error_relative": cycle_error_relative(model, xs)}
    if oracle is not None:
        out["l2_uvp_forward"] = l2_uvp(pushed, oracle.forward_map(x), y)
        out["l2_uvp_backward"] = l2_uvp(pulled, oracle.inverse_map(y), x)
    return out
