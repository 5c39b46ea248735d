"""Transport costs c(x, y) = t_f * l((y - x) / t_f), entering NCF only through the Hamiltonian.

h = l* (Legendre transform). The method needs h(p), grad h(p), the Lagrangian term
p . grad h(p) - h(p) (= l(grad h(p))), and, for the analytic backward, the Hessian-vector
product grad^2 h(p) v. Tensors carry points in the last dimension: p of shape (..., d).

A user cost subclasses :class:`Cost`, sets a unique ``name`` and implements ``h`` and
``grad_h``; ``hess_h_vec`` defaults to forward-mode autodiff of ``grad_h``. Give ``degree``
(the homogeneity degree of l) when l(s v) = s**degree * l(v), so that fitting may rescale the
data isotropically without changing the transport plan.
"""
from __future__ import annotations

import math

import torch

__all__ = ["Cost", "Quadratic", "Power", "get", "kernel_constants"]

_REGISTRY: dict[str, type["Cost"]] = {}


def _safe_norm2(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norm over the last axis and a mask of rows where it is > 0."""
    n2 = (p * p).sum(-1)
    return n2, n2 > 0


class Cost:
    """Base class of transport costs l(v), described by their Hamiltonian h = l*.

    Subclasses must define ``name`` and implement :meth:`h`, :meth:`grad_h` and :meth:`ell`.
    ``spec`` is the string :func:`get` parses back (saved in checkpoints).
    """

    name: str = ""
    #: homogeneity degree of l (2 for quadratic, q for power); None if l is not homogeneous.
    degree: float | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    @property
    def spec(self) -> str:
        return self.name

    def h(self, p: torch.Tensor) -> torch.Tensor:
        """Hamiltonian h(p): (..., d) -> (...)."""
        raise NotImplementedError

    def grad_h(self, p: torch.Tensor) -> torch.Tensor:
        """grad h(p): (..., d) -> (..., d). The velocity of the characteristic through p."""
        raise NotImplementedError

    def ell(self, v: torch.Tensor) -> torch.Tensor:
        """Lagrangian l(v): (..., d) -> (...), the cost of a unit-time displacement v."""
        raise NotImplementedError

    def lagrangian(self, p: torch.Tensor) -> torch.Tensor:
        """p . grad h(p) - h(p): (..., d) -> (...). Equals l(grad h(p)) (Fenchel equality)."""
        return (p * self.grad_h(p)).sum(-1) - self.h(p)

    def hess_h_vec(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """grad^2 h(p) v: (..., d), (..., d) -> (..., d). Default: forward-mode autodiff."""
        return torch.func.jvp(self.grad_h, (p,), (v,))[1]

    def cost(self, x: torch.Tensor, y: torch.Tensor, t_final: float = 1.0) -> torch.Tensor:
        """c(x, y) = t_f * l((y - x) / t_f): (..., d), (..., d) -> (...)."""
        return t_final * self.ell((y - x) / t_final)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return isinstance(other, Cost) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


class Quadratic(Cost):
    """l(v) = |v|^2 / 2, h(p) = |p|^2 / 2, grad h(p) = p."""

    name = "quadratic"
    degree = 2.0

    def h(self, p):
        return 0.5 * (p * p).sum(-1)

    def grad_h(self, p):
        return p

    def ell(self, v):
        return 0.5 * (v * v).sum(-1)

    def lagrangian(self, p):
        return 0.5 * (p * p).sum(-1)

    def hess_h_vec(self, p, v):
        return v


class Power(Cost):
    """l(v) = |v|^q / q for 1 < q <= 2; h(p) = |p|^q* / q* with q* = q / (q - 1) >= 2.

    grad h(p) = |p|^(q*-2) p and grad^2 h(p) v = |p|^(q*-2) (v + (q*-2) (p^.v) p^), p^ = p/|p|;
    both are continuous with value 0 / bounded at p = 0 because q* >= 2.
    """

    name = "power"

    def __init__(self, q: float):
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise TypeError(f"Power cost exponent q must be a number, got {type(q).__name__}")
        q = float(q)
        if not (1.0 < q <= 2.0) or not math.isfinite(q):
            raise ValueError(
                f"Power cost needs 1 < q <= 2 (so that h = l* is twice differentiable), got q={q}; "
                "use Quadratic() for q = 2")
        self.q = q
        self.q_star = q / (q - 1.0)
        self.degree = q

    @property
    def spec(self) -> str:
        return f"power:{self.q:g}"

    def __repr__(self) -> str:
        return f"Power(q={self.q:g})"

    def _norm_pow(self, p, exponent):
        """|p|^exponent over the last axis, exponent >= 0, with a finite gradient at p = 0."""
        n2, nz = _safe_norm2(p)
        safe = torch.where(nz, n2, torch.ones_like(n2))
        out = safe.pow(0.5 * exponent)
        return torch.where(nz, out, torch.zeros_like(out) if exponent > 0 else torch.ones_like(out))

    def h(self, p):
        return self._norm_pow(p, self.q_star) / self.q_star

    def grad_h(self, p):
        return self._norm_pow(p, self.q_star - 2.0).unsqueeze(-1) * p

    def ell(self, v):
        return self._norm_pow(v, self.q) / self.q

    def lagrangian(self, p):
        return self._norm_pow(p, self.q_star) / self.q

    def hess_h_vec(self, p, v):
        # |p|^(q*-2) v + (q*-2) |p|^(q*-4) (p.v) p ; the second factor written as |p|^(q*-2)
        # times unit vectors so that it is finite (0) at p = 0.
        n2, nz = _safe_norm2(p)
        scale = self._norm_pow(p, self.q_star - 2.0).unsqueeze(-1)
        inv_n2 = torch.where(nz, 1.0 / torch.where(nz, n2, torch.ones_like(n2)), torch.zeros_like(n2))
        pv = (p * v).sum(-1, keepdim=True)
        return scale * (v + (self.q_star - 2.0) * (pv * inv_n2.unsqueeze(-1)) * p)


def get(spec: "str | Cost") -> Cost:
    """Return a cost from a spec: ``"quadratic"``, ``"power:1.5"``, a registered name, or a Cost.

    >>> get("power:1.5")
    Power(q=1.5)
    """
    if isinstance(spec, Cost):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"cost must be a string like 'quadratic' or 'power:1.5' or a Cost, "
                        f"got {type(spec).__name__}")
    name, _, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown cost {spec!r}; known costs: {', '.join(sorted(_REGISTRY))} "
                         "(e.g. 'quadratic', 'power:1.5')")
    cls = _REGISTRY[name]
    if cls is Power:
        try:
            q = float(arg)
        except ValueError:
            raise ValueError(f"cost {spec!r}: write the exponent as 'power:q' with 1 < q <= 2, "
                             "e.g. 'power:1.5'") from None
        return Power(q)
    if arg:
        try:
            return cls(float(arg))
        except TypeError:
            raise ValueError(f"cost {name!r} takes no argument, got {spec!r}") from None
    return cls()


def kernel_constants(cost: Cost) -> tuple[int, float]:
    """(COST, q*) of ``cost`` for the Triton residual kernel (ncf_fast.kernels.COST_QUADRATIC or
    COST_POWER): exactly Quadratic and Power, whose h the kernel implements (a subclass may
    change h); ValueError naming backend "torch" for any other cost."""
    from .kernels import COST_POWER, COST_QUADRATIC  # no triton import
    if type(cost) is Quadratic:
        return COST_QUADRATIC, 2.0
    if type(cost) is Power:
        return COST_POWER, float(cost.q_star)
    raise ValueError(f"the triton kernels implement the Quadratic and Power costs only, got "
                     f"{cost!r}; use backend='torch' (the same fused algorithm in torch ops) for "
                     "this model")
