"""OT problems with known answers (Gaussians) and 2-D toy distributions.

Gaussian pairs follow the literature's benchmark (Korotin et al. 2021): Sigma = Q diag(lambda) Q^T
with Q random orthogonal and log lambda uniform in [-ln 2, ln 2]. For the quadratic cost and
t_f = 1 the OT map is affine, T*(x) = m1 + Gamma (x - m0),
Gamma = S0^(-1/2) (S0^(1/2) S1 S0^(1/2))^(1/2) S0^(-1/2), and the HJ potential is known in closed
form for every t in [0, 1].

:class:`ConvexOT` has a known non-linear map with a translation: a Gaussian-mixture source pushed
by T = grad phi + m, phi(x) = |x|^2 / 2 + sum_k a_k softplus(w_k . x + b_k), a_k >= 0. phi is
strongly convex (Hessian >= I), so by Brenier's theorem T is THE quadratic-cost OT map from the
source to its push-forward, and T^-1 is a strongly convex minimisation (Newton).
"""
from __future__ import annotations

import difflib
import os

import numpy as np
import torch

from .data import check_regular_file, first_line

__all__ = ["GaussianOT", "ConvexOT", "toy", "TOYS", "NamedProblem", "parse_problem"]


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

    @classmethod
    def from_samples(cls, x, y, seed: int | None = None) -> "GaussianOT":
        """The pair of Gaussians with the sample means and covariances of ``x`` and ``y`` (n, d):
        its :meth:`forward_map` is the linear OT estimator from sample moments (POT's
        ``LinearTransport``), exact up to sampling error when the sets are Gaussian."""
        x, y = _to_numpy(x), _to_numpy(y)
        if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) <= x.shape[1]:
            raise ValueError(f"from_samples needs two (n, d) arrays with the same d and n > d, "
                             f"got shapes {x.shape} and {y.shape}")
        return cls(x.shape[1], seed=seed, sigma0=np.cov(x, rowvar=False).reshape(x.shape[1], -1),
                   sigma1=np.cov(y, rowvar=False).reshape(y.shape[1], -1),
                   m0=x.mean(0), m1=y.mean(0))

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


SHARPNESS = 4.0  # ridges bend within about a quarter of a source spread

def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


class ConvexOT:
    """Quadratic-cost OT with a known non-linear map and a translation (a Brenier map).

    Source mu: an equal-weight mixture of ``modes`` Gaussians (means ~ N(0, I), covariances
    0.3 * the GaussianOT SPD draws). Map T(x) = grad phi(x) + m with

        phi(x) = |x|^2 / 2 + sum_k a_k softplus(w_k . x + b_k),   k = 1..ridges, a_k >= 0,

    w_k = sharpness * unit direction / spread, b_k = sharpness * U(-1, 1) - w_k . (mixture centre),
    a_k = strength * spread^2 / sharpness * U(0.5, 1.5), and m a
    random direction times ``shift`` source spreads (spread = sqrt(Var(mu) / d)). Target nu = T#mu.
    How non-linear an instance is: :meth:`affine_uvp` (L2-UVP of the best affine map).

    Args:
        dim: dimension d.
        seed: seeds the instance and the samplers.
        shift: length of the mean shift m, in source spreads (0: no translation).
        strength: scales every a_k (0: T is the translation x + m).
        sharpness: |w_k| in inverse source spreads: how sharply each ridge bends the map.
        ridges: number of softplus terms (default 2 d).
        modes: Gaussian components of the source.
    """

    def __init__(self, dim: int, seed: int | None = None, shift: float = 3.0, strength: float = 1.0,
                 sharpness: float = SHARPNESS, ridges: int | None = None, modes: int = 3):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        for name, v in (("shift", shift), ("strength", strength), ("sharpness", sharpness)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if not sharpness > 0:
            raise ValueError("sharpness must be positive")
        ridges = 2 * dim if ridges is None else ridges
        for name, v in (("ridges", ridges), ("modes", modes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.means = rng.standard_normal((modes, dim))
        self._chols = np.stack([np.linalg.cholesky(0.3 * _random_spd(dim, rng)) for _ in range(modes)])
        covs = self._chols @ self._chols.transpose(0, 2, 1)
        center = self.means.mean(0)
        var = float(np.trace(covs.mean(0)) + ((self.means - center) ** 2).sum(1).mean())
        spread = np.sqrt(var / dim)
        w = rng.standard_normal((ridges, dim))
        self.w = sharpness * w / np.linalg.norm(w, axis=1, keepdims=True) / spread
        # b_k offsets from the ridge's projection of the centre: every bend cuts through the data
        self.b = sharpness * rng.uniform(-1.0, 1.0, ridges) - self.w @ center
        # a_k |w_k| ~ spread: each ridge moves points by up to about one source spread
        self.a = strength * spread ** 2 / sharpness * rng.uniform(0.5, 1.5, ridges)
        direction = rng.standard_normal(dim)
        self.m = shift * spread * direction / np.linalg.norm(direction)
        self._rng = np.random.default_rng(None if seed is None else seed + 1)
        self._affine = None

    def sample_source(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """n samples of the Gaussian mixture mu, float64 (n, d) (from ``rng``, default the
        problem's stream)."""
        rng = self._rng if rng is None else rng
        k = rng.integers(0, self.means.shape[0], n)
        z = rng.standard_normal((n, self.dim))
        return self.means[k] + np.einsum("nij,nj->ni", self._chols[k], z)

    def sample_target(self, n: int) -> np.ndarray:
        """n samples of nu = T#mu, float64 (n, d)."""
        return self.forward_map(self.sample_source(n))

    def potential(self, x) -> np.ndarray:
        """phi(x) (without the translation's m . x), (N,)."""
        xn = _to_numpy(x)
        return _like(0.5 * (xn * xn).sum(1) + _softplus(xn @ self.w.T + self.b) @ self.a, x)

    def _grad_phi(self, x: np.ndarray) -> np.ndarray:
        return x + (_sigmoid(x @ self.w.T + self.b) * self.a) @ self.w

    def forward_map(self, x):
        """T(x) = grad phi(x) + m; numpy or torch in, same out."""
        return _like(self._grad_phi(_to_numpy(x)) + self.m, x)

    def inverse_map(self, y, tol: float = 1e-12, max_iter: int = 100):
        """T^-1(y): the minimiser of phi(x) - (y - m) . x, by Newton's method with backtracking.

        The objective is strongly convex (Hessian I + sum_k a_k s'(z_k) w_k w_k^T >= I), so the
        damped Newton iteration converges from any start; it stops when every row's step is
        below ``tol`` (relative to 1 + |x|). Raises RuntimeError if it does not within max_iter.
        """
        yn = _to_numpy(y) - self.m
        x = yn.copy()

        def objective(v):
            return 0.5 * (v * v).sum(1) + _softplus(v @ self.w.T + self.b) @ self.a - (yn * v).sum(1)

        for _ in range(max_iter):
            z = x @ self.w.T + self.b
            s = _sigmoid(z)
            grad = x + (s * self.a) @ self.w - yn
            hess = np.eye(self.dim) + np.einsum("nk,ki,kj->nij", s * (1 - s) * self.a, self.w, self.w)
            step = np.linalg.solve(hess, grad[..., None])[..., 0]
            f0, lr = objective(x), np.ones(x.shape[0])
            for _ in range(30):  # halve where the full step does not decrease the objective
                worse = objective(x - lr[:, None] * step) > f0 + 1e-14 * (1 + np.abs(f0))
                if not worse.any():
                    break
                lr[worse] *= 0.5
            x = x - lr[:, None] * step
            if np.abs(lr[:, None] * step).max(1).max(initial=0.0) <= tol * (1 + np.abs(x).max(initial=0.0)):
                return _like(x, y)
        raise RuntimeError(f"ConvexOT.inverse_map: Newton did not converge in {max_iter} iterations")

    def affine_uvp(self, n: int = 50_000) -> tuple[float, float]:
        """(forward, backward) L2-UVP % of the best affine maps (least squares on n fresh pairs):
        how far the instance is from the affine maps a Gaussian fit would give."""
        if self._affine is None:
            x = self.sample_source(n, np.random.default_rng(12345))  # the same pairs every call
            y = self.forward_map(x)

            def uvp(a, b):  # best affine fit of b on a, relative to Var(b's measure)
                design = np.hstack([a, np.ones((n, 1))])
                coef, *_ = np.linalg.lstsq(design, b, rcond=None)
                return float(100 * ((design @ coef - b) ** 2).sum(1).mean() / b.var(0, ddof=1).sum())
            self._affine = (uvp(x, y), uvp(y, x))
        return self._affine


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


class NamedProblem:
    """A problem named on the command line: a toy pair "SRC:TGT" / "TGT" (source N(0, I)), or a
    Gaussian pair (``oracle``: its :class:`GaussianOT`, which knows the exact map).

    ``title`` names it in plain words for figure titles, e.g. "Gaussian pair (d = 2, seed 1)"."""

    def __init__(self, spec, dim, source, target, oracle=None, title=None):
        self.spec, self.dim, self._source, self._target, self.oracle = spec, dim, source, target, oracle
        self.title = title or spec

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n source and n target samples, (n, dim) each, float64; the same seed, the same draws."""
        return self._source(n, seed), self._target(n, seed + 1)


# Problems with a known map, by name: --problem NAME:d=D[:seed=S] (short NAME:D[:S]).
KNOWN_MAPS = ("gaussian", "convex")


def _short_spec(text: str) -> str:
    """The readable problem names -> the short ones (both accepted): toy:TGT -> TGT,
    toy:SRC:TGT -> SRC:TGT, gaussian:d=D[:seed=S] -> gaussian:D[:S] (convex alike). "gaussian"
    alone is also a toy (N(0, I)), which is why gaussian:circles and gaussian:2:1 read alike."""
    parts = text.split(":")
    if parts[0] == "toy" and len(parts) in (2, 3):
        return ":".join(parts[1:])
    if parts[0] in KNOWN_MAPS and len(parts) in (2, 3) and parts[1].startswith("d="):
        out = [parts[0], parts[1][2:]]
        if len(parts) == 3:
            if not parts[2].startswith("seed="):
                raise ValueError(f"--problem {text}: write {parts[0]}:d=D:seed=S (e.g. "
                                 f"{parts[0]}:d=2:seed=1)")
            out.append(parts[2][5:])
        return ":".join(out)
    return text


def parse_problem(spec: str) -> NamedProblem:
    """gaussian:d=D[:seed=S], convex:d=D[:seed=S], toy:TGT, toy:SRC:TGT, their short forms, or a .npz path holding
    Sigma0 and Sigma1 -> a :class:`NamedProblem`; a ValueError (FileNotFoundError for a missing
    .npz) naming what is accepted otherwise."""
    text = _short_spec(str(spec).strip())
    if text.lower().endswith(".npz") or os.path.sep in text:
        check_regular_file(text, ".npz file (a Gaussian problem holds Sigma0 and Sigma1)")
        try:
            gauss = GaussianOT.from_npz(text, seed=0)
        except (ValueError, OSError, KeyError) as exc:
            msg = first_line(exc)
            raise ValueError(msg if msg.startswith(text) else f"{text}: not a usable Gaussian "
                             f"problem ({msg})") from None
        except Exception as exc:  # zipfile.BadZipFile and friends
            raise ValueError(f"{text}: not a valid .npz file ({first_line(exc)})") from None
        return _gaussian_problem(text, gauss, f"Gaussian pair from {os.path.basename(text)} "
                                 f"(d = {gauss.dim})")
    parts = text.split(":")
    if parts[0] in KNOWN_MAPS and len(parts) in (2, 3) and parts[1].isdigit():
        dim = int(parts[1])
        if not 1 <= dim <= 4096:
            raise ValueError(f"--problem {spec}: dimension must be between 1 and 4096")
        if len(parts) == 3 and not parts[2].isdigit():
            raise ValueError(f"--problem {spec}: the seed in {parts[0]}:D:SEED must be a "
                             "non-negative integer")
        seed = int(parts[2]) if len(parts) == 3 else 0
        if parts[0] == "convex":
            return _convex_problem(text, ConvexOT(dim, seed=seed))
        return _gaussian_problem(text, GaussianOT(dim, seed=seed),
                                 f"Gaussian pair (d = {dim}, seed {seed})")
    names = parts if len(parts) == 2 else (["gaussian", parts[0]] if len(parts) == 1 else None)
    bad = [n for n in (names or []) if n not in TOYS]
    if names is None or bad:
        near = difflib.get_close_matches(bad[0], list(TOYS), n=1) if bad else []
        raise ValueError(f"--problem {spec!r}: unknown problem" + (f" {bad[0]!r}" if bad else "")
                         + (f" (did you mean {near[0]!r}?)" if near else "")
                         + f"; use toy:TGT (source N(0, I)) or toy:SRC:TGT with toys "
                         f"{', '.join(TOYS)}; gaussian:d=D[:seed=S] (a Gaussian pair with "
                         "a known map); convex:d=D[:seed=S] (a known non-linear map with a "
                         "translation, ConvexOT); or a .npz with Sigma0 and Sigma1")
    a, b = names

    def name(toy_name):
        return "N(0, I)" if toy_name == "gaussian" else toy_name
    return NamedProblem(f"{a}:{b}", 2, lambda n, s: toy(a, n, seed=s), lambda n, s: toy(b, n, seed=s),
                        title=f"{name(a)} → {name(b)} (toys)")


def _gaussian_problem(spec, gauss, title) -> NamedProblem:
    chol0, chol1 = np.linalg.cholesky(gauss.sigma0), np.linalg.cholesky(gauss.sigma1)

    def source(n, seed):
        return gauss.m0 + np.random.default_rng([seed, 0]).standard_normal((n, gauss.dim)) @ chol0.T

    def target(n, seed):
        return gauss.m1 + np.random.default_rng([seed, 1]).standard_normal((n, gauss.dim)) @ chol1.T
    return NamedProblem(spec, gauss.dim, source, target, oracle=gauss, title=title)


def _convex_problem(spec, convex: ConvexOT) -> NamedProblem:
    def source(n, seed):
        return convex.sample_source(n, np.random.default_rng([seed, 0]))

    def target(n, seed):
        return convex.forward_map(convex.sample_source(n, np.random.default_rng([seed, 1])))
    return NamedProblem(spec, convex.dim, source, target, oracle=convex,
                        title=f"non-linear map with a translation (ConvexOT, d = {convex.dim})")
