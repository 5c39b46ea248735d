"""Smooth activations with their first and second derivatives.

NCF's loss differentiates grad_x u, and its parameter gradient differentiates that once more,
so the fused paths need sigma, sigma' and sigma''. ReLU is refused: sigma'' = 0 almost everywhere
makes the characteristic residual blind to curvature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "check_activation", "activation", "activation_derivatives"]

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
