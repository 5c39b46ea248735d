"""The scalar potential u(x, t) and backend dispatch."""
from __future__ import annotations

import torch
from torch import nn

from . import backends, costs, reference, torch_backend
from .activations import check_activation

__all__ = ["PotentialMLP", "as_time_column"]


def as_time_column(t, x: torch.Tensor) -> torch.Tensor:
    """Broadcast t (a number, (N,) or (N, 1)) to a (N, 1) column like x's rows, dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0], 1)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2 or t.shape[1] != 1 or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t must be a number, shape (N,) or (N, 1) with N = {x.shape[0]}, "
                         f"got shape {tuple(t.shape)}")
    return t.expand(x.shape[0], 1)


class PotentialMLP(nn.Module):
    """u_theta(x, t): R^d x [0, t_f] -> R, an MLP on the concatenated input [x, t].

    Args:
        dim: d, the dimension of the samples.
        hidden: widths of the hidden layers (at least one).
        activation: "softplus", "tanh" or "silu" (smooth: the loss differentiates grad_x u).
        backend: how :meth:`value_and_grad` and the characteristic residual are computed:
            "reference" (autograd), "torch" (fused analytic algorithm in torch ops),
            "triton" (fused GPU kernels), "auto" (the fastest that supports the case:
            :func:`ncf_fast.backends.resolve`, e.g. torch for float64 or d >= 128).
            (per-program gradient copies reduced in a fixed order) instead of atomic adds.

    The state_dict (``layers.k.weight``, ``layers.k.bias``) is the same for every backend.
    """

    def __init__(self, dim: int, hidden=(64, 64, 64), activation: str = "softplus",
                 backend: str = "auto", deterministic: bool = False):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        hidden = tuple(hidden) if not isinstance(hidden, int) else (hidden,)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive widths, got {hidden!r}")
        self.dim = dim
        self.hidden = hidden
        self.activation = check_activation(activation)
        self.backend = backends.check_name(backend)
        self.deterministic = bool(deterministic)
        widths = (dim + 1,) + hidden + (1,)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, activation={self.activation!r}, backend={self.backend!r}"

    @property
    def params(self) -> list[torch.Tensor]:
        """(W_1, b_1, ..., W_{L+1}, b_{L+1}): the flat parameter list every backend takes."""
        return [p for layer in self.layers for p in (layer.weight, layer.bias)]

    def _backend(self, x: torch.Tensor, cost=None) -> str:
        """The backend that runs for x (and cost): :func:`ncf_fast.backends.select`."""
        dtype = torch.promote_types(x.dtype, self.layers[0].weight.dtype)
        return backends.select(self.backend, "mlp", x.device, dtype, self.dim, self.hidden, cost)

    def _inputs(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        return x, as_time_column(t, x)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """u(x, t): x (N, d), t a number, (N,) or (N, 1) -> (N,)."""
        x, t = self._inputs(x, t)
        return reference.potential(self.params, self.activation, x, t)

    def value_and_grad(self, x: torch.Tensor, t, create_graph: bool = False):
        """(u, grad_x u): x (N, d) -> (N,), (N, d).

        With ``create_graph=True`` the result is differentiable with respect to the parameters
        and x (every backend); otherwise it is detached.
        """
        x, t = self._inputs(x, t)
        backend = self._backend(x)
        if backend == backends.REFERENCE:
            return reference.potential_and_grad(self.params, self.activation, x, t,
                                                create_graph=create_graph)
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            if backend == backends.TORCH:
                u, p = torch_backend.potential_and_grad(self.params, self.activation, x, t)
            else:
                from .kernels import potential_and_grad as triton_potential_and_grad
                u, p = triton_potential_and_grad(self.params, self.activation, x, t,
                                                 deterministic=self.deterministic)
        return (u, p) if create_graph else (u.detach(), p.detach())

    def characteristic_residual(self, x: torch.Tensor, t, cost):
        """r(x, t) per point (N,), differentiable in the parameters; see ncf_fast.losses."""
        x, t = self._inputs(x, t)
        backend = self._backend(x, cost)
        if backend == backends.REFERENCE:
            return reference.characteristic_residual(self.params, self.activation, cost, x, t)
        if backend == backends.TORCH:
            return torch_backend.characteristic_residual(self.params, self.activation, cost, x, t)
        from .kernels import characteristic_residual as triton_residual
        return triton_residual(self.params, self.activation, costs.kernel_constants(cost), x, t,
                               deterministic=self.deterministic)
