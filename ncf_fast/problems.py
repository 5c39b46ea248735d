"""OT problems with known answers (Gaussians) and 2-D toy distributions.

Gaussian pairs follow the literature's benchmark (Korotin et al. 2021): Sigma = Q diag(lambda) Q^T
with Q random orthogonal and log lambda uniform in [-ln 2, ln 2]. For the quadratic cost and
t_f = 1 the OT map is affine, T*(x) = m1 + Gamma (x - m0),
Gamma = S0^(-1/2) (S0^(1/2) S1 S0^(1/2))^(1/2) S0^(-1/2), and the HJ potential is known in closed
form for every t in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["GaussianOT", "toy", "TOYS"]


def _sqrtm_spd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
    lam = np.exp(rng.uniform(-np.log(2.0), np.log(2.0), size=dim))
    return (q * lam) @ q.T


def _like(values: np.ndarray, template):
    """Return ``values`` as the same kind of array as ``template`` (numpy or torch, device)."""
    if isinstance(template, torch.Tensor):
        return torch.as_tensor(values, dtype=template.dtype if template.is_floating_point() else None,
                               device=template.device)
    return values


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class GaussianOT:
    """OT between N(m0, Sigma0) and N(m1, Sigma1) for the quadratic cost, with closed forms.

    Args:
        dim: dimension d.
        seed: seeds the covariances, means and the samplers.
        means: if True, draw means m0, m1 ~ N(0, I); else both are 0.
        sigma0, sigma1, m0, m1: give the parameters explicitly instead (see :meth:`from_npz`).
    """

    def __init__(self, dim: int, seed: int | None = None, means: bool = False, *,
                 sigma0=None, sigma1=None, m0=None, m1=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.sigma0 = np.array(sigma0, dtype=np.float64) if sigma0 is not None else _random_spd(dim, rng)
        self.sigma1 = np.array(sigma1, dtype=np.float64) if sigma1 is not None else _random_spd(dim, rng)
        for name, s in (("Sigma0", self.sigma0), ("Sigma1", self.sigma1)):
            if s.shape != (dim, dim):
                raise ValueError(f"{name} must have shape ({dim}, {dim}), got {s.shape}")
            if not np.allclose(s, s.T, rtol=1e-8, atol=1e-10) or np.linalg.eigvalsh(s).min() <= 0:
                raise ValueError(f"{name} must be symmetric positive definite")
        if m0 is None:
            m0 = rng.standard_normal(dim) if means else np.zeros(dim)
        if m1 is None:
            m1 = rng.standard_normal(dim) if means else np.zeros(dim)
        self.m0 = np.asarray(m0, dtype=np.float64).reshape(dim)
        self.m1 = np.asarray(m1, dtype=np.float64).reshape(dim)
        r0 = _sqrtm_spd(self.sigma0)
        r0_inv = np.linalg.inv(r0)
        self.gamma = r0_inv @ _sqrtm_spd(r0 @ self.sigma1 @ r0) @ r0_inv
        self.gamma = 0.5 * (self.gamma + self.gamma.T)
        self.gamma_inv = np.linalg.inv(self.gamma)
        self._chol0 = np.linalg.cholesky(self.sigma0)
        self._chol1 = np.linalg.cholesky(self.sigma1)
        self._rng = np.random.default_rng(None if seed is None else seed + 1)

    @classmethod
    def from_npz(cls, path, seed: int | None = None) -> "GaussianOT":
        """Load a pair from an .npz holding arrays ``Sigma0``, ``Sigma1`` (optional ``m0``, ``m1``)."""
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("Sigma0", "Sigma1") if k not in f.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {', '.join(missing)}; "
                                 f"an .npz Gaussian problem holds Sigma0 and Sigma1, found {f.files}")
            s0, s1 = np.asarray(f["Sigma0"], np.float64), np.asarray(f["Sigma1"], np.float64)
            m0 = np.asarray(f["m0"], np.float64) if "m0" in f.files else None
            m1 = np.asarray(f["m1"], np.float64) if "m1" in f.files else None
        if s0.ndim != 2 or s0.shape[0] != s0.shape[1]:
            raise ValueError(f"{path}: Sigma0 must be a square matrix, got shape {s0.shape}")
        return cls(s0.shape[0], seed=seed, sigma0=s0, sigma1=s1, m0=m0, m1=m1)

    def sample_source(self, n: int) -> np.ndarray:
        """n samples of N(m0, Sigma0), float64 (n, d)."""
        return self.m0 + self._rng.standard_normal((n, self.dim)) @ self._chol0.T

    def sample_target(self, n: int) -> np.ndarray:
        """n samples of N(m1, Sigma1), float64 (n, d)."""
        return self.m1 + self._rng.standard_normal((n, self.dim)) @ self._chol1.T

    def forward_map(self, x):
        """T*(x) = m1 + Gamma (x - m0); numpy or torch in, same out."""
        return _like(self.m1 + (_to_numpy(x) - self.m0) @ self.gamma, x)

    def inverse_map(self, y):
        """T*^-1(y) = m0 + Gamma^-1 (y - m1)."""
        return _like(self.m0 + (_to_numpy(y) - self.m1) @ self.gamma_inv, y)

    def potential(self, x, t):
        """Closed-form HJ potential u*(x, t), t in [0, 1] (a number or (N,)), zero residual.

        With A = Gamma - I, b = m1 - Gamma m0: u*(x, 0) = x^T A x / 2 + b^T x, and along the
        characteristic through x0, u*(x0 + t (A x0 + b), t) = u*(x0, 0) + t |A x0 + b|^2 / 2.
        For m0 = m1 = 0 this is x^T (Gamma - I) ((1 - t) I + t Gamma)^-1 x / 2.
        """
        xn = _to_numpy(x)
        tn = np.broadcast_to(np.asarray(_to_numpy(t), dtype=np.float64).reshape(-1), (xn.shape[0],))
        a = self.gamma - np.eye(self.dim)
        b = self.m1 - self.gamma @ self.m0
        out = np.empty(xn.shape[0])
        for tv in np.unique(tn):
            rows = tn == tv
            x0 = np.linalg.solve(np.eye(self.dim) + tv * a, (xn[rows] - tv * b).T).T
            p = x0 @ a + b
            out[rows] = 0.5 * np.einsum("ij,ij->i", x0 @ a, x0) + x0 @ b + 0.5 * tv * (p * p).sum(1)
        return _like(out, x)


def _eight_gaussians(n, rng):
    angles = rng.integers(0, 8, n) * (np.pi / 4)
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return centers + 0.15 * rng.standard_normal((n, 2))


def _moons(n, rng):
    k = rng.integers(0, 2, n)
    th = rng.uniform(0, np.pi, n)
    upper = np.stack([np.cos(th), np.sin(th)], 1)
    lower = np.stack([1 - np.cos(th), 0.5 - np.sin(th)], 1)
    pts = np.where(k[:, None] == 0, upper, lower) - np.array([0.5, 0.25])
    return 1.5 * pts + 0.06 * rng.standard_normal((n, 2))


def _circles(n, rng):
    r = np.where(rng.integers(0, 2, n) == 0, 2.0, 1.0)
    th = rng.uniform(0, 2 * np.pi, n)
    return r[:, None] * np.stack([np.cos(th), np.sin(th)], 1) + 0.08 * rng.standard_normal((n, 2))


def _checkerboard(n, rng):
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 1.0


def _spirals(n, rng):
    turn = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)
    pts = sign[:, None] * np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], 1)
    return pts / 3.0 + 0.1 * rng.standard_normal((n, 2))


def _swissroll(n, rng):
    turn = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    pts = np.stack([turn * np.cos(turn), turn * np.sin(turn)], 1)
    return pts / 5.0 + 0.1 * rng.standard_normal((n, 2))


def _gaussian(n, rng):
    return rng.standard_normal((n, 2))


TOYS = {"8gaussians": _eight_gaussians, "moons": _moons, "circles": _circles,
        "checkerboard": _checkerboard, "spirals": _spirals, "swissroll": _swissroll,
        "gaussian": _gaussian}


def toy(name: str, n: int, seed: int | None = None) -> np.ndarray:
    """n samples (n, 2), float64, of a 2-D toy distribution: one of :data:`TOYS`."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of {', '.join(TOYS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return TOYS[name](int(n), np.random.default_rng(seed))
