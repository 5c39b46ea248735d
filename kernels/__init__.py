"""Triton kernels for ncf_fast, installed as ``ncf_fast.kernels``.

Importing this package never imports triton; the kernel modules do, on first use.
"""
from __future__ import annotations

import functools

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


# --- fused MLP kernels (mlp_potential, mlp_residual); triton is imported on first call ---
__all__ += ["potential_and_grad", "characteristic_residual", "set_dot_precision"]


def potential_and_grad(params, act, x, t, deterministic: bool = False):
    """(u (N,), grad_x u (N, d)) of the PotentialMLP ``params`` at x (N, d), t (N, 1);
    ``deterministic``: bitwise-reproducible weight gradients (per-program copies reduced in a
    fixed order) instead of atomic adds. See
    :func:`ncf_fast.kernels.mlp_potential.potential_and_grad`."""
    from .mlp_potential import potential_and_grad as fused
    return fused(params, act, x, t, deterministic=deterministic)


def characteristic_residual(params, act, cost, x, t, deterministic: bool = False):
    """r(x, t) (N,) of the PotentialMLP ``params``; ``deterministic`` as for
    :func:`potential_and_grad`. See
    :func:`ncf_fast.kernels.mlp_residual.characteristic_residual`."""
    from .mlp_residual import characteristic_residual as fused
    return fused(params, act, cost, x, t, deterministic=deterministic)


def set_dot_precision(precision: str) -> None:
    """tl.dot input precision of the MLP kernels: "tf32x3" (default, fp32-level) or "tf32"
    (opt-in fast mode); see :func:`ncf_fast.kernels.mlp_sweeps.set_dot_precision`."""
    from .mlp_sweeps import set_dot_precision as setter
    setter(precision)


# --- energy distance (energy_distance.py); triton is imported on first call ---
__all__ += ["energy_pair_sums", "energy_segment_pair_sums"]


def energy_pair_sums(a, b, grad=False):
    """Row sums over all pairs, (S (N,) float64, Ga (N, d) float32 or None), by tiles in linear
    memory; see :func:`ncf_fast.kernels.energy_distance.pair_sums`."""
    from .energy_distance import pair_sums
    return pair_sums(a, b, grad=grad)


def energy_segment_pair_sums(a, b, row_lo, row_hi, col_lo, col_hi, grad=False):
    """The same within label-sorted segments, all in one launch; see
    :func:`ncf_fast.kernels.energy_distance.segment_pair_sums`."""
    from .energy_distance import segment_pair_sums
    return segment_pair_sums(a, b, row_lo, row_hi, col_lo, col_hi, grad=grad)
