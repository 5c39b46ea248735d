"""Problems with known answers and the metrics."""
import numpy as np
import pytest
import torch

from ncf_fast import metrics
from ncf_fast.problems import TOYS, ConvexOT, GaussianOT, toy


def test_gaussian_maps_push_forward_and_invert():
    prob = GaussianOT(4, seed=0, means=True)
    x = prob.sample_source(200_000)
    y = prob.forward_map(x)
    np.testing.assert_allclose(np.cov(y.T), prob.sigma1, atol=0.03)
    np.testing.assert_allclose(y.mean(0), prob.m1, atol=0.02)
    np.testing.assert_allclose(prob.inverse_map(y), x, atol=1e-10)
    # Gamma is symmetric positive definite: the map is the gradient of a convex function
    np.testing.assert_allclose(prob.gamma, prob.gamma.T, atol=1e-12)
    assert np.linalg.eigvalsh(prob.gamma).min() > 0
    # eigenvalues of the covariances lie in [1/2, 2] (log-uniform in [-ln 2, ln 2])
    for s in (prob.sigma0, prob.sigma1):
        ev = np.linalg.eigvalsh(s)
        assert ev.min() >= 0.5 - 1e-12 and ev.max() <= 2 + 1e-12


def test_gaussian_potential_gives_the_map():
    """x + grad u*(x, 0) = T*(x), with the gradient by central differences; torch in, torch out."""
    prob = GaussianOT(3, seed=2, means=True)
    xn = prob.sample_source(50)
    h = 1e-6
    grad = np.stack([(prob.potential(xn + h * e, 0.0) - prob.potential(xn - h * e, 0.0)) / (2 * h)
                     for e in np.eye(3)], 1)
    np.testing.assert_allclose(xn + grad, prob.forward_map(xn), atol=1e-6)
    u = prob.potential(torch.as_tensor(xn), torch.full((50,), 0.3, dtype=torch.float64))
    assert isinstance(u, torch.Tensor) and u.shape == (50,)


def test_from_samples_is_the_moment_matched_pair_and_checks_its_input():
    prob = GaussianOT(3, seed=4, means=True)
    x, y = prob.sample_source(4000), prob.sample_target(3000)
    fit = GaussianOT.from_samples(x, y)
    np.testing.assert_allclose(fit.sigma0, np.cov(x.T), atol=1e-12)
    np.testing.assert_allclose(fit.m1, y.mean(0), atol=1e-12)
    # the linear map it gives pushes x's moments onto y's exactly (Gamma Sigma0 Gamma = Sigma1)
    pushed = fit.forward_map(x)
    np.testing.assert_allclose(np.cov(pushed.T), np.cov(y.T), atol=1e-9)
    np.testing.assert_allclose(pushed.mean(0), y.mean(0), atol=1e-12)
    # and converges to the true map: sampling error only
    assert metrics.l2_uvp(fit.forward_map(x), prob.forward_map(x), y) < 1.0
    for bad in ((x, y[:, :2]), (x[:3], y), (x[:, 0], y)):
        with pytest.raises(ValueError, match="from_samples needs"):
            GaussianOT.from_samples(*bad)


def test_from_npz_roundtrip(tmp_path):
    prob = GaussianOT(3, seed=5)
    path = tmp_path / "pair.npz"
    np.savez(path, Sigma0=prob.sigma0, Sigma1=prob.sigma1)
    again = GaussianOT.from_npz(path)
    np.testing.assert_allclose(again.gamma, prob.gamma, atol=1e-12)
    np.savez(tmp_path / "bad.npz", Sigma0=prob.sigma0)
    with pytest.raises(ValueError, match="missing array.*Sigma1"):
        GaussianOT.from_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "notspd.npz", Sigma0=prob.sigma0, Sigma1=-prob.sigma1)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianOT.from_npz(tmp_path / "notspd.npz")


@pytest.mark.parametrize("dim", [1, 2, 3, 17])
def test_convex_maps_invert_and_are_gradients_of_convex_functions(dim):
    """T = grad phi + m with phi strongly convex: Newton's inverse to 1e-8 on fresh points (also
    far outside the data), T the gradient of the potential (central differences), T monotone."""
    prob = ConvexOT(dim, seed=dim)
    x = prob.sample_source(300)
    x[:20] *= 25.0  # far in the tails, where the softplus ridges saturate
    y = prob.forward_map(x)
    assert np.abs(prob.inverse_map(y) - x).max() < 1e-8
    yt = torch.as_tensor(y)
    back = prob.inverse_map(yt)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    np.testing.assert_allclose(prob.forward_map(back).numpy(), y, rtol=0, atol=1e-8)
    h = 1e-5
    xs = x[20:40]
    grad = np.stack([(prob.potential(xs + h * e) - prob.potential(xs - h * e)) / (2 * h)
                     for e in np.eye(dim)], 1)
    np.testing.assert_allclose(grad + prob.m, prob.forward_map(xs), atol=1e-6)
    a, b = x[40:170], x[170:300]  # strong monotonicity of grad phi: (T a - T b).(a - b) >= |a - b|^2
    gap = ((prob.forward_map(a) - prob.forward_map(b)) * (a - b)).sum(1) - ((a - b) ** 2).sum(1)
    assert gap.min() >= -1e-9


def test_convex_problem_is_translated_and_measurably_non_linear():
    prob = ConvexOT(2, seed=0)
    x = prob.sample_source(20_000)
    spread = np.sqrt(x.var(0).sum() / 2)
    # the mean shift is 3 source spreads (estimated from the mixture's exact variance)
    assert np.linalg.norm(prob.m) == pytest.approx(3 * spread, rel=0.05)
    fwd, bwd = prob.affine_uvp()
    assert fwd > 1.0 and bwd > 1.0  # the best affine map is more than 1 % off, both ways
    flat = ConvexOT(2, seed=0, strength=0.0)  # no ridges: a pure translation, affine exactly
    assert max(flat.affine_uvp()) < 1e-20
    np.testing.assert_allclose(flat.inverse_map(flat.forward_map(x[:10])), x[:10], atol=1e-12)
    np.testing.assert_array_equal(ConvexOT(2, seed=5).sample_source(10), ConvexOT(2, seed=5).sample_source(10))
    with pytest.raises(ValueError, match="shift"):
        ConvexOT(2, shift=-1.0)
    with pytest.raises(ValueError, match="dim"):
        ConvexOT(0)


def test_cycle_error_relative_definition():
    class Shifted:  # T(x) = x + 1, T^-1(y) = y - 0.9: the round trip is off by 0.1 per axis
        def transport(self, x):
            return x + 1.0

        def inverse(self, y):
            return y - 0.9
    x = np.random.default_rng(3).normal(size=(400, 2)) * 2
    assert metrics.cycle_error_relative(Shifted(), x) == pytest.approx(100 * 0.02 / x.var(0, ddof=1).sum())


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toys(name):
    x = toy(name, 500, seed=0)
    assert x.shape == (500, 2) and np.isfinite(x).all()
    np.testing.assert_array_equal(x, toy(name, 500, seed=0))
    assert 0.2 < x.std() < 5


def test_toy_errors():
    with pytest.raises(ValueError, match="unknown toy"):
        toy("donut", 10)
    with pytest.raises(ValueError, match="positive integer"):
        toy("moons", 0)


def test_l2_uvp_definition():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(1000, 3)) * 2
    true = rng.normal(size=(500, 3))
    pred = true + 0.1
    var = target.var(0, ddof=1).sum()
    assert metrics.l2_uvp(pred, true, target) == pytest.approx(100 * 0.03 / var)
    assert metrics.l2_uvp(true, true, target) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        metrics.l2_uvp(pred[:10], true, target)


def test_w2_exact_against_known_couplings():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(60, 2))
    assert metrics.w2_exact(a, a + np.array([3.0, 4.0])) == pytest.approx(5.0)
    perm = rng.permutation(60)
    assert metrics.w2_exact(a, a[perm]) == pytest.approx(0.0, abs=1e-12)
    # unequal sizes: each point duplicated is the same measure
    assert metrics.w2_exact(a, np.concatenate([a, a]), squared=True) == pytest.approx(0.0, abs=1e-9)
    b = rng.normal(size=(40, 2))
    w_lp = metrics.w2_exact(a[:30], b, squared=True)
    assert w_lp > 0


def test_energy_distance_metric_accepts_numpy_and_torch():
    a = np.random.default_rng(2).normal(size=(100, 2))
    assert metrics.energy_distance(a, torch.as_tensor(a + 1.0)) > 0.5


def test_characteristic_collocation_lies_on_the_pushed_segments():
    """Points x + (t / t_f)(T(x) - x): on the segment from a source sample to its push, at the
    fraction of the horizon their time says; without pushes they fall back to "path"."""
    from ncf_fast.sampling import Collocation
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(50, 3, dtype=torch.float64), torch.randn(60, 3, dtype=torch.float64)
    pushed = 2.0 * src + 1.0
    col = Collocation({"characteristic": 1.0}, torch.full((3,), -5.0), torch.full((3,), 5.0),
                      t_final=2.0)
    x, t = col.draw(200, src, tgt, gen, pushes=(src, pushed))
    assert x.shape == (200, 3) and t.shape == (200, 1)
    assert float(t.min()) >= 0 and float(t.max()) <= 2.0
    s = t / 2.0
    start = (x - s * 1.0) / (1.0 + s)  # x = (1 - s) x0 + s (2 x0 + 1) = (1 + s) x0 + s
    dist = torch.cdist(start, src, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(dist.max()) < 1e-12
    x, t = col.draw(20, src, tgt, gen)  # no pushes: straight source-target paths
    assert x.shape == (20, 3)
