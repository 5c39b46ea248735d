"""Triton kernels for ncf_fast, installed as ``ncf_fast.kernels``.

Importing this package never imports triton; the kernel modules do, on first use.
"""
from __future__ import annotations

import functools

__all__ = ["triton_available", "COST_QUADRATIC", "COST_POWER"]

# The residual kernel's COST constexpr: the caller turns its cost into (COST, q*) with these
# (q* = 2 for the quadratic cost; q* = q / (q - 1) for |v|^q / q).
COST_QUADRATIC, COST_POWER = 0, 1


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


def potential_and_grad(params, act, x, t, deterministic: bool = False, precision=None):
    """(u (N,), grad_x u (N, d)) of the MLP ``params`` (W_1, b_1, ..., W_{L+1}, b_{L+1}) at
    x (N, d), t (N, 1); ``deterministic``: bitwise-reproducible weight gradients (per-program
    copies reduced in a fixed order) instead of atomic adds; ``precision``: the tl.dot input
    precision (None: :func:`set_dot_precision`'s). See :func:`.mlp_potential.potential_and_grad`."""
    from .mlp_potential import potential_and_grad as fused
    return fused(params, act, x, t, deterministic=deterministic, precision=precision)


def characteristic_residual(params, act, cost, x, t, deterministic: bool = False, precision=None):
    """r(x, t) (N,) of the MLP ``params``; ``cost``: the kernel constants (COST_QUADRATIC, 2.0)
    or (COST_POWER, q*); ``deterministic`` and ``precision`` as for :func:`potential_and_grad`.
    See :func:`.mlp_residual.characteristic_residual`."""
    from .mlp_residual import characteristic_residual as fused
    return fused(params, act, cost, x, t, deterministic=deterministic, precision=precision)


def set_dot_precision(precision: str) -> None:
    """The default tl.dot input precision of the MLP kernels: "tf32x3" (default, fp32-level) or
    "tf32" (opt-in fast mode); see :func:`.mlp_launch.set_dot_precision`."""
    from .mlp_launch import set_dot_precision as setter
    setter(precision)

