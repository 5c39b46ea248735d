"""NCF estimator: input validation, map types, chunking, save/load."""
import os

import numpy as np
import pytest
import torch

import ncf_fast
from ncf_fast import NCF

TINY = dict(steps=5, batch_size=32, mmd_batch_size=32, mmd_active=8, eval_every=5, progress=False)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(300, 2)).astype(np.float32)
    tgt = (rng.normal(size=(200, 2)) * 2 + 1).astype(np.float32)
    return NCF(2, hidden=(16, 16), seed=0, device="cpu").fit(src, tgt, **TINY), src, tgt


def test_numpy_in_numpy_out_torch_in_torch_out(fitted):
    model, src, _ = fitted
    out = model.transport(src)
    assert isinstance(out, np.ndarray) and out.shape == src.shape and out.dtype == np.float32
    out64 = model.transport(src.astype(np.float64))
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out, out64, rtol=1e-5, atol=1e-5)
    t = torch.as_tensor(src, dtype=torch.float64)
    tout = model.inverse(t)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float64 and tout.device == t.device
    np.testing.assert_allclose(tout.numpy(), model.inverse(src.astype(np.float64)), rtol=1e-12)
    assert model.potential(src).shape == (300,)
    assert model.interpolate(src, 0.5).shape == src.shape


def test_interpolate_endpoints_and_chunking(fitted, monkeypatch):
    model, src, _ = fitted
    x = src.astype(np.float64)
    np.testing.assert_allclose(model.interpolate(x, 0.0), x, atol=1e-12)
    np.testing.assert_allclose(model.interpolate(x, model.t_final), model.transport(x), atol=1e-10)
    per_row = model.interpolate(x, np.linspace(0, 1, len(x)))
    np.testing.assert_allclose(per_row[-1], model.transport(x)[-1], atol=1e-10)
    full = model.transport(x)
    monkeypatch.setattr(NCF, "_chunk_rows", lambda self: 7)
    # float32 model: chunk sizes change GEMM blocking, so agreement is to fp32 rounding
    np.testing.assert_allclose(model.transport(x), full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="t must lie in"):
        model.interpolate(x, 1.5)


def test_save_load_gives_identical_maps(fitted, tmp_path):
    model, src, tgt = fitted
    path = tmp_path / "m.pt"
    model.save(path)
    loaded = NCF.load(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.transport(src), model.transport(src))
    np.testing.assert_array_equal(loaded.inverse(tgt), model.inverse(tgt))
    assert loaded.history["step"] == model.history["step"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_load_refuses_pickled_objects_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))
    bad = tmp_path / "evil.pt"
    torch.save({"format": "x", "payload": Evil()}, bad)
    with pytest.raises(ValueError, match="pickled Python objects"):
        NCF.load(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupted"):
        NCF.load(junk)
    with pytest.raises(FileNotFoundError):
        NCF.load(tmp_path / "missing.pt")


def _fit(src, tgt, **kw):
    return NCF(2, hidden=(8,), seed=0, device="cpu").fit(src, tgt, **{**TINY, **kw})


GOOD = np.random.default_rng(1).normal(size=(50, 2))


@pytest.mark.parametrize("src,exc,match", [
    (np.full((50, 2), np.nan), ValueError, r"100 NaN value\(s\) in 50 row\(s\), first at row 0"),
    (np.where(np.arange(100).reshape(50, 2) == 21, np.inf, GOOD), ValueError, "1 Inf value.*row 10"),
    (np.zeros((50, 3)), ValueError, "dimension 3 but the model has dim=2"),
    (np.zeros(50), ValueError, r"reshape\(-1, 1\)"),
    (np.zeros((0, 2)), ValueError, "0 sample"),
    (np.zeros((1, 2)), ValueError, "at least 2"),
    (np.zeros((50, 2), dtype=np.int64), TypeError, "dtype int64.*floating"),
    (np.zeros((50, 2), dtype=object), TypeError, "dtype object"),
    ([[0.0, 1.0]] * 50, TypeError, "numpy array or torch tensor"),
])
def test_bad_samples_are_refused(src, exc, match):
    with pytest.raises(exc, match=match):
        _fit(src, GOOD)


def test_bad_labels_and_options_are_refused():
    lab = np.zeros(50, dtype=np.int64)
    with pytest.raises(ValueError, match="49 entries but there are 50 samples"):
        _fit(GOOD, GOOD, source_labels=lab[:49], target_labels=lab)
    with pytest.raises(ValueError, match="both source_labels and target_labels"):
        _fit(GOOD, GOOD, source_labels=lab)
    with pytest.raises(ValueError, match="only in source"):
        _fit(GOOD, GOOD, source_labels=np.arange(50) % 2, target_labels=lab)
    with pytest.raises(TypeError, match="integer class labels"):
        _fit(GOOD, GOOD, source_labels=lab + 0.5, target_labels=lab)
    with pytest.raises(TypeError, match="did you mean 'mmd_batch_size'"):
        _fit(GOOD, GOOD, mmd_batchsize=10)
    with pytest.raises(ValueError, match="steps must be positive"):
        _fit(GOOD, GOOD, steps=0)
    with pytest.raises(TypeError, match="steps must be an integer"):
        _fit(GOOD, GOOD, steps=2.5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        NCF(0)
    with pytest.raises(ValueError, match="activation must be one of"):
        NCF(2, activation="relu")
    with pytest.raises(ValueError, match="backend must be one of"):
        NCF(2, backend="cuda")
    with pytest.raises(ValueError, match="t_final"):
        NCF(2, t_final=0)
    with pytest.raises(ValueError, match="dtype"):
        NCF(2, dtype=torch.float16)


def test_samplers_and_unequal_sizes():
    rng = np.random.default_rng(3)
    model = NCF(2, hidden=(8,), seed=1, device="cpu").fit(
        lambda n: rng.normal(size=(n, 2)), rng.normal(size=(77, 2)) + 3, **TINY)
    assert len(model.history["hj"]) == TINY["steps"]
    assert len(model.history["heldout"]) == 1 and np.isfinite(model.history["heldout"][0])
    with pytest.raises(ValueError, match="returned 3 rows"):
        NCF(2, seed=1, device="cpu").fit(lambda n: np.zeros((3, 2)), GOOD, **TINY)


def test_callback_can_stop_and_history_is_complete():
    seen = []

    def cb(step, logs):
        seen.append(logs["step"])
        return step >= 3
    model = _fit(GOOD, GOOD + 1, callback=cb, steps=10)
    assert seen == [1, 2, 3]
    assert model.history["step"] == [1, 2, 3]
    assert set(model.history) >= {"hj", "mmd", "lr", "heldout"}


def test_seeded_fits_are_reproducible():
    a = _fit(GOOD, GOOD + 1).transport(GOOD)
    b = _fit(GOOD, GOOD + 1).transport(GOOD)
    np.testing.assert_array_equal(a, b)


def test_public_names():
    for name in ("NCF", "PotentialMLP", "costs", "losses", "metrics", "problems", "__version__"):
        assert hasattr(ncf_fast, name)
    from ncf_fast.losses import class_conditional_energy_distance, energy_distance, hj_residual  # noqa
    from ncf_fast.metrics import cycle_error, l2_uvp, w2_exact  # noqa
    from ncf_fast.problems import GaussianOT, toy  # noqa


DATA = os.path.join(os.path.dirname(__file__), "data")


def test_checkpoint_from_before_per_set_centring_gives_the_same_maps():
    """A checkpoint written by main at 9748ee1 (one shared shift, no "target_shift"; data moved by
    (4, 4)): its maps, potential and path are the ones that code computed."""
    model = NCF.load(os.path.join(DATA, "checkpoint_9748ee1.pt"))
    ref = np.load(os.path.join(DATA, "checkpoint_9748ee1_maps.npz"))
    np.testing.assert_array_equal(model.target_shift, model.shift)
    np.testing.assert_allclose(model.transport(ref["x"]), ref["transport"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.inverse(ref["y"]), ref["inverse"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.interpolate(ref["x"], 0.3), ref["interpolate"], rtol=0, atol=1e-12)
    # the potential is evaluated in float32 from float64 coordinates now: agreement to fp32 rounding
    np.testing.assert_allclose(model.potential(ref["x"], 0.0), ref["potential0"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.potential(ref["y"], 1.0), ref["potential1"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cost", ["quadratic", "power:1.5"])
def test_each_set_is_centred_for_the_quadratic_cost_only(cost, tmp_path):
    """Quadratic cost: each set loses its own mean and the maps add the translation back, so the
    potential's gradient is the displacement of the characteristic through every (x, t); other
    costs keep one shared shift (a relative shift of the sets would change their OT map)."""
    rng = np.random.default_rng(4)
    src = rng.normal(size=(300, 2))
    tgt = rng.normal(size=(300, 2)) @ np.array([[1.3, 0.2], [0.2, 0.6]]) + np.array([4.0, -3.0])
    model = NCF(2, hidden=(16, 16), seed=0, device="cpu", dtype=torch.float64, cost=cost).fit(
        src, tgt, **TINY)
    if cost == "quadratic":
        np.testing.assert_allclose(model.shift, src.mean(0), atol=1e-12)
        np.testing.assert_allclose(model.target_shift, tgt.mean(0), atol=1e-12)
        spread = ((src - src.mean(0)) ** 2).sum(1).mean() + ((tgt - tgt.mean(0)) ** 2).sum(1).mean()
        assert model.scale == pytest.approx(np.sqrt(spread / 4))
        x = src[:10]
        for t in (0.0, 0.4, 1.0):
            pts = x + 0.7 * rng.normal(size=x.shape) + t * model.translation.numpy()
            h = 1e-6
            grad = np.stack([(model.potential(pts + h * e, t) - model.potential(pts - h * e, t)) / (2 * h)
                             for e in np.eye(2)], 1)
            disp = model._displacement(torch.as_tensor(pts), t).numpy()
            np.testing.assert_allclose(grad, disp, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(model.transport(x) - x,
                                   model._displacement(torch.as_tensor(x), 0.0).numpy(), atol=1e-12)
        # the inverse of T reads u at t_f on the target's side: y - displacement(y, t_f)
        np.testing.assert_allclose(model.inverse(tgt[:5]),
                                   tgt[:5] - model._displacement(torch.as_tensor(tgt[:5]), 1.0).numpy(),
                                   atol=1e-12)
    else:
        middle = 0.5 * (src.mean(0) + tgt.mean(0))
        np.testing.assert_allclose(model.shift, middle, atol=1e-12)
        np.testing.assert_allclose(model.target_shift, middle, atol=1e-12)
    model.save(tmp_path / "m.pt")
    loaded = NCF.load(tmp_path / "m.pt")
    np.testing.assert_array_equal(loaded.target_shift, model.target_shift)
    np.testing.assert_array_equal(loaded.inverse(tgt), model.inverse(tgt))
    np.testing.assert_array_equal(loaded.potential(tgt, 0.5), model.potential(tgt, 0.5))


@pytest.mark.parametrize("t_final", [1.0, 2.0])
def test_maps_are_the_trained_pushes_in_data_units(t_final):
    """transport/inverse are what training pushed and pulled (in the model's coordinates), for
    any horizon: before, the maps dropped the factor t_f of T(x) = x + t_f grad h(p)."""
    rng = np.random.default_rng(5)
    src, tgt = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) * 1.5 + 2.0
    model = NCF(2, hidden=(16,), seed=0, device="cpu", dtype=torch.float64,
                t_final=t_final).fit(src, tgt, **TINY)
    x, y = torch.as_tensor(src[:20]), torch.as_tensor(tgt[:20])
    with torch.no_grad():
        pushed = model.target_shift + model.scale * model._push(model._standardize(x))
        pulled = model.shift + model.scale * model._pull(model._standardize(y, t_final))
    np.testing.assert_allclose(model.transport(src[:20]), pushed.numpy(), atol=1e-12)
    np.testing.assert_allclose(model.inverse(tgt[:20]), pulled.numpy(), atol=1e-12)
