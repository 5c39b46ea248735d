"""Smooth activations with their first and second derivatives.

NCF's loss differentiates grad_x u, and its parameter gradient differentiates that once more,
so the fused paths need sigma, sigma' and sigma''. ReLU is refused: sigma'' = 0 almost everywhere
makes the characteristic residual blind to curvature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "check_activation", "activation", "activation_derivatives",
           "times_second_derivative"]

ACTIVATIONS = ("softplus", "tanh", "silu")


def check_activation(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (smooth: the loss "
                         f"differentiates grad_x u), got {name!r}")
    return name.lower()


def activation(name: str, a: torch.Tensor) -> torch.Tensor:
    """sigma(a), from torch's overflow-safe implementations (the reference path)."""
    if name == "softplus":
        return F.softplus(a)
    if name == "tanh":
        return torch.tanh(a)
    return F.silu(a)


def activation_derivatives(name: str, a: torch.Tensor, order: int = 2):
    """(sigma(a), sigma'(a), sigma''(a)) with sigma'' only when order == 2 (else None)."""
    if name == "softplus":
        s = torch.sigmoid(a)
        return F.softplus(a), s, (s * (1 - s) if order == 2 else None)
    if name == "tanh":
        y = torch.tanh(a)
        d1 = 1 - y * y
        return y, d1, (-2 * y * d1 if order == 2 else None)
    s = torch.sigmoid(a)
    one_minus = 1 - s
    d1 = s * (1 + a * one_minus)
    d2 = s * one_minus * (2 + a * (one_minus - s)) if order == 2 else None
    return a * s, d1, d2


def times_second_derivative(name: str, a, y, d1, g, delta) -> torch.Tensor:
    """g * sigma''(a), given y = sigma(a), d1 = sigma'(a) and delta = g * sigma'(a) from the
    input-gradient sweep: one fused elementwise op for softplus, two for tanh.

    softplus: sigma'' = s(1 - s) with s = sigma' -> delta - delta * s.
    tanh: sigma'' = -2 y sigma' -> -2 y delta.
    """
    if name == "softplus":
        return torch.addcmul(delta, delta, d1, value=-1.0)
    if name == "tanh":
        return torch.mul(y, delta).mul_(-2.0)
    return g * activation_derivatives(name, a, order=2)[2]
