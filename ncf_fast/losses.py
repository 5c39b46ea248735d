"""NCF's loss terms: the HJ characteristic residual and the energy-distance marginal term.

    r(x, t) = u(x, t) + t h(p) - t p . grad h(p) - u(x - t grad h(p), 0),   p = grad_x u(x, t)
    L_HJ    = E r^2            (Park et al. 2026, Eq. 13)
    L_MMD   = E(T(X), Y)       (unbiased squared energy distance, see ncf_fast.energy)

The residual dispatches on the model's backend; the energy distance takes its own ``backend``
(the trainer passes the estimator's ``energy_backend``); :mod:`ncf_fast.backends` resolves both.
"""
from __future__ import annotations

import numbers

import torch

from . import costs as costs_mod
from .energy import class_conditional_energy_distance, energy_distance

__all__ = ["hj_residual", "energy_distance", "class_conditional_energy_distance"]


def hj_residual(model, x: torch.Tensor, t, cost="quadratic", t_final: float = 1.0) -> torch.Tensor:
    """Characteristic residual r(x, t) per point, differentiable in the model's parameters.

    Args:
        model: a :class:`ncf_fast.PotentialMLP` (its ``backend`` picks the implementation).
        x: collocation points (N, d).
        t: times in [0, t_final]: a number, (N,) or (N, 1).
        cost: a :class:`ncf_fast.costs.Cost` or its spec string.
        t_final: the horizon t_f; a numeric t outside [0, t_final] is refused.

    Returns:
        r of shape (N,); zero for every (x, t) when u solves the HJ equation
        u_t + h(grad_x u) = 0 along non-crossing characteristics.
    """
    cost = costs_mod.get(cost)
    if isinstance(t, numbers.Real) and not 0.0 <= float(t) <= t_final:
        raise ValueError(f"t must lie in [0, t_final={t_final}], got {t}")
    return model.characteristic_residual(x, t, cost)
