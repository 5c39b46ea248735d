"""The backend vocabulary and the one rule that picks the backend for a case.

Two ops have backends: ``"mlp"`` (the potential u, grad_x u and the characteristic residual;
:class:`ncf_fast.PotentialMLP`) and ``"energy"`` (the energy distance's pair sums;
:mod:`ncf_fast.energy`). Every op takes the same names (:data:`BACKENDS`):

* ``"reference"`` -- plain torch with autograd (mlp), brute force pairs (energy): the baseline;
* ``"torch"``     -- the fused algorithms in torch ops (mlp: :mod:`ncf_fast.torch_backend`; energy:
  blocks of pairs), any device and dtype;
* ``"triton"``    -- the Triton kernels (``ncf_fast.kernels``): CUDA tensors (on the CPU only
  under ``TRITON_INTERPRET=1``, for tests), within the kernels' limits below;
* ``"auto"``      -- the fastest backend that supports the case: :func:`resolve`.

:func:`resolve` is a pure function of its arguments (it never probes CUDA or imports triton),
so the choice can be tested on any machine. :func:`select` is what the library calls: it checks
a requested name, maps "auto" through :func:`resolve`, and refuses (``ValueError`` naming the
limit and the fallback) an explicit "triton" that cannot run the case.
"""
from __future__ import annotations

import os
import warnings

import torch

__all__ = ["AUTO", "REFERENCE", "TORCH", "TRITON", "BACKENDS", "OPS", "MLP_MAX_INPUT",
           "MLP_MAX_WIDTH", "ENERGY_MAX_D", "check_name", "triton_limit", "resolve", "check",
           "select"]

AUTO, REFERENCE, TORCH, TRITON = "auto", "reference", "torch", "triton"
BACKENDS = (AUTO, REFERENCE, TORCH, TRITON)
OPS = ("mlp", "energy")

# The kernels' limits, restated here because importing the kernel modules imports triton
# (tests/test_backends.py checks they equal kernels/mlp_launch.py's MAX_INPUT and MAX_WIDTH and
# kernels/energy_distance.py's MAX_D).
MLP_MAX_INPUT = 128   # d + 1: [x, t] is one register tile
MLP_MAX_WIDTH = 512   # hidden widths
ENERGY_MAX_D = 64     # the energy kernel's widest BLOCK_D
# costs the residual kernel implements (exact classes: a subclass may change h)
_KERNEL_COSTS = ("quadratic", "power")


def check_name(backend, what: str = "backend") -> str:
    """``backend`` lower-cased if it is one of :data:`BACKENDS`, else ValueError."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend.lower()


def _cost_name(cost) -> str | None:
    """"quadratic" / "power" for those exact cost classes or specs, else the cost's repr."""
    from .costs import Cost, Power, Quadratic

    if isinstance(cost, Cost):
        return {Quadratic: "quadratic", Power: "power"}.get(type(cost), repr(cost))
    return str(cost).partition(":")[0].strip().lower()


def triton_limit(op: str, dtype, dim: int | None = None, hidden=None, cost=None) -> str | None:
    """Why the Triton kernels cannot run this case (a phrase naming the limit), or None.

    op: "mlp" or "energy"; dtype: the tensors' torch dtype; dim: d of the samples; hidden: the
    MLP's hidden widths (an int or a sequence; mlp only); cost: a cost spec such as "quadratic"
    or "power:1.5", or a :class:`ncf_fast.costs.Cost` (mlp residual only). None skips a check.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if op == "energy":
        if dim is not None and dim > ENERGY_MAX_D:
            return f"the triton energy kernel takes d <= {ENERGY_MAX_D}, got d = {dim}"
        if dtype != torch.float32:  # float64 would be computed in float32
            return f"the triton energy kernel computes in float32, got {dtype}"
        return None
    if dtype != torch.float32:
        return f"the triton MLP kernels compute in float32, got {dtype}"
    if dim is not None and dim + 1 > MLP_MAX_INPUT:
        return f"the triton MLP kernels take d <= {MLP_MAX_INPUT - 1}, got d = {dim}"
    if hidden is not None:
        widest = max((hidden,) if isinstance(hidden, int) else tuple(hidden))
        if widest > MLP_MAX_WIDTH:
            return f"the triton MLP kernels take hidden widths <= {MLP_MAX_WIDTH}, got {widest}"
    if cost is not None and _cost_name(cost) not in _KERNEL_COSTS:
        return (f"the triton residual kernel implements the Quadratic and Power costs only, "
                f"got {cost!r}")
    return None


def resolve(op: str, device, dtype, dim: int | None = None, hidden=None, cost=None) -> str:
    """The fastest backend that supports the case: "triton" on CUDA within the kernels' limits
    (:func:`triton_limit`), else "torch". Depends on its arguments only.

    >>> resolve("mlp", "cuda", torch.float64, 2, (128, 128, 128), "quadratic")
    'torch'
    >>> resolve("mlp", "cuda", torch.float32, 2, (128, 128, 128), "quadratic")
    'triton'
    """
    if torch.device(device).type == "cuda" and triton_limit(op, dtype, dim, hidden, cost) is None:
        return TRITON
    return TORCH


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(backend: str, op: str, dtype, dim: int | None = None, hidden=None, cost=None,
          what: str = "backend") -> str:
    """``backend`` lower-cased, checked against the case (not the device): ValueError for an
    unknown name, or for "triton" outside the kernels' limits, naming the limit and the fallback.

    One exception: the energy kernel accepts explicitly requested float64 inputs (it computes
    them in float32, and :func:`select` warns); "auto" never does this.
    """
    backend = check_name(backend, what)
    if backend == TRITON:
        limit = triton_limit(op, dtype, dim, hidden, cost)
        if limit is not None and not _energy_float64(op, dtype, dim):
            raise ValueError(f"{what}='triton' cannot run this case: {limit}; {_fallback(what)}")
    return backend


def _fallback(what: str) -> str:
    return f"use {what}='torch' (or 'auto', which falls back to torch for this case)"


def _energy_float64(op, dtype, dim) -> bool:
    """float64 energy inputs the kernel can take (converted to float32)."""
    return op == "energy" and dtype == torch.float64 and triton_limit(op, torch.float32, dim) is None


def select(backend: str, op: str, device, dtype, dim: int | None = None, hidden=None,
           cost=None) -> str:
    """The backend that runs the case, for a requested name (what the library calls).

    "reference" and "torch" run as asked; "auto" is :func:`resolve` (torch when triton is not
    installed); "triton" is :func:`check`-ed, and needs CUDA tensors (the CPU is accepted under
    ``TRITON_INTERPRET=1``) and triton: else ValueError naming what is missing and the fallback.
    """
    backend = check(backend, op, dtype, dim, hidden, cost)
    if backend in (REFERENCE, TORCH):
        return backend
    if backend == AUTO:
        choice = resolve(op, device, dtype, dim, hidden, cost)
        return TORCH if choice == TRITON and not _triton_installed() else choice
    device = torch.device(device)
    if device.type != "cuda" and not _interpreted():
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device} (on the CPU only "
                         f"under TRITON_INTERPRET=1); {_fallback('backend')}")
    if not _triton_installed():
        raise ValueError(f"backend='triton' needs the triton package (pip install triton); "
                         f"{_fallback('backend')}")
    if _energy_float64(op, dtype, dim):
        warnings.warn(f"backend='triton' computes the energy distance of {dtype} inputs in "
                      f"float32; use backend='torch' to keep {dtype}", stacklevel=3)
    return TRITON


def _triton_installed() -> bool:
    from .kernels import triton_available
    return triton_available()
