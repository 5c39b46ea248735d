"""examples/: the metrics they report (without the optional packages) and a --quick run of each
(with them: ``pip install ".[examples]"``; skipped otherwise)."""
import importlib.util
import itertools
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """Import examples/NAME.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (the examples must run offline)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


ct = load_example("color_transfer")


def quick_run(example, tmp_path, capsys):
    """example.main(--quick) into tmp_path: (its table, its stdout), its PNG checked written."""
    table = example.main(["--quick", "--out", str(tmp_path)])
    name = example.__name__.removeprefix("example_")
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    return table, capsys.readouterr().out


# ------------------------------------------------------------------- colour-transfer metrics
def test_histogram_intersection_known_values(rng):
    a = rng.uniform(0, 1, (500, 3))
    assert ct.histogram_intersection(a, a[rng.permutation(500)]) == pytest.approx(1.0)
    assert ct.histogram_intersection(np.full((10, 3), 0.01), np.full((7, 3), 0.99)) == 0.0
    # half of b in a's only bin, half in another: overlap 1/2; the bin edges are at k/bins
    b = np.concatenate([np.full((4, 3), 0.01), np.full((4, 3), 0.5)])
    assert ct.histogram_intersection(np.full((3, 3), 0.02), b) == pytest.approx(0.5)
    # 2 bins per channel: 0.49 and 0.51 fall on either side of the edge, 1.0 in the top bin
    assert ct.histogram_intersection(np.array([[0.49] * 3]), np.array([[0.51] * 3]), bins=2) == 0.0
    assert ct.histogram_intersection(np.array([[1.0] * 3]), np.array([[0.51] * 3]), bins=2) == 1.0


def brute_force_emd(a, b):
    """min over permutations of the mean Euclidean distance (exact OT for uniform equal sizes)."""
    cost = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    return min(cost[np.arange(len(a)), list(p)].mean() for p in itertools.permutations(range(len(a))))


@pytest.mark.parametrize("pot", [False, True], ids=["scipy", "pot"])
def test_emd_is_exact_ot(rng, monkeypatch, pot):
    if pot:
        pytest.importorskip("ot")
    else:
        pytest.importorskip("scipy")
        monkeypatch.setitem(sys.modules, "ot", None)  # import ot -> ImportError: the SciPy path
    for d in (1, 3):
        a, b = rng.normal(size=(6, d)), rng.normal(size=(6, d)) + 0.5
        assert ct.emd(a, b) == pytest.approx(brute_force_emd(a, b), rel=1e-9)
    assert ct.emd(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        ct.emd(a, b[:4])


def test_load_image_from_files(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rgba = np.random.default_rng(0).uniform(0, 1, (5, 7, 4))
    plt.imsave(tmp_path / "rgba.png", rgba)
    img = ct.load_image(str(tmp_path / "rgba.png"))
    assert img.shape == (5, 7, 3) and img.dtype == np.float64
    assert np.abs(img - rgba[..., :3]).max() < 1 / 255 + 1e-9  # PNG stores 8 bits a channel
    with pytest.raises(ValueError, match="neither an image file nor"):
        ct.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="neither an image file nor"):
        ct.load_image("download_all")  # a skimage.data function that would fetch from the network


def test_color_transfer_bad_argument_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ct.main(["no_such_image", "coffee", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_image" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 300 NCF steps, POT on 500 pixels, two 0.25 MP images mapped both ways
def test_color_transfer_quick_run(tmp_path, no_network, capsys):
    pytest.importorskip("skimage")
    table, out = quick_run(ct, tmp_path, capsys)
    assert "NCF" in out and "histogram intersection" in out
    _, _, emd_f0, hi_f0, emd_b0, hi_b0 = table["none (unchanged)"]
    _, _, emd_f, hi_f, emd_b, hi_b = table["NCF"]
    # both directions move the colours towards the other image (unchanged: EMD ~0.24-0.27,
    # HI 0.14 for astronaut/coffee)
    assert emd_f < 0.6 * emd_f0 and emd_b < 0.7 * emd_b0
    assert hi_f > hi_f0 + 0.1 and hi_b > hi_b0 + 0.05


def test_bundled_images_are_offline(no_network):
    pytest.importorskip("skimage")
    for name in ct.BUNDLED:
        img = ct.load_image(name)
        assert img.ndim == 3 and img.shape[2] == 3 and 0 <= img.min() and img.max() <= 1


# ------------------------------------------------------- class-conditional: the printed domain
cc = load_example("class_conditional")


def test_fonts_ship_with_matplotlib_and_have_ten_distinct_digits():
    fonts = cc.font_paths()
    assert len(fonts) == len(cc.FONT_FILES)  # every listed face is inside matplotlib's mpl-data
    for font in fonts:
        bitmaps = [cc.rasterize(cc.glyph(font, k)) for k in range(10)]
        for k, b in enumerate(bitmaps):
            rows = np.flatnonzero(b.any(1))
            # GLYPH_HEIGHT rows tall (+-1 for the pixel centres), centred on the grid
            assert abs(len(rows) - cc.GLYPH_HEIGHT) <= 1, (font, k, len(rows))
            assert abs((rows[0] + rows[-1]) / 2 + 0.5 - cc.GRID / 2) <= 1
        # no missing-glyph boxes: the ten digits differ pairwise in at least 20 pixels
        for i, j in itertools.combinations(range(10), 2):
            assert (bitmaps[i] != bitmaps[j]).sum() >= 20, (font, i, j)


def inked_runs(line: np.ndarray) -> int:
    """Separate inked stretches along a 1-D bool line."""
    return int(line[0]) + int((np.diff(line.astype(int)) == 1).sum())


def test_rasterize_keeps_the_holes_open():
    """Even-odd filling: the middle row of a 0 crosses two strokes (three with a slashed or dotted
    zero), a column through an 8 its three bars; a plain fill would ink the counters (one run)."""
    for font in cc.font_paths():
        zero, eight = cc.rasterize(cc.glyph(font, 0)), cc.rasterize(cc.glyph(font, 8))
        rows = np.flatnonzero(zero.any(1))
        assert inked_runs(zero[(rows[0] + rows[-1]) // 2]) >= 2, font
        cols = np.flatnonzero(eight.any(0))
        assert inked_runs(eight[:, (cols[0] + cols[-1]) // 2]) >= 3, font


def test_block_counts_and_thicken():
    rng = np.random.default_rng(3)
    bitmap = rng.random((32, 32)) < 0.3
    counts = cc.block_counts(bitmap)
    assert counts.shape == (8, 8) and counts.sum() == bitmap.sum()
    assert counts[2, 5] == bitmap[8:12, 20:24].sum()
    assert cc.block_counts(np.ones((32, 32), bool)).min() == 16
    dot = np.zeros((32, 32), bool)
    dot[10, 10] = True
    assert cc.thicken(dot, 0).sum() == 1
    assert cc.thicken(dot, 1).sum() == 5 and cc.thicken(dot, 2).sum() == 13  # a diamond of radius 2
    grown = cc.thicken(bitmap, 1)
    assert (grown >= bitmap).all() and not (grown[1:-1, 1:-1] < bitmap[:-2, 1:-1]).any()


def test_printed_digits_shape_range_and_labels(rng):
    x, y = cc.printed_digits(30, rng)
    assert x.shape == (300, 64) and y.shape == (300,) and np.bincount(y).tolist() == [30] * 10
    assert x.min() >= 0 and x.max() <= 16 and np.array_equal(x, np.round(x))
    # the jitter makes different images of the same class; the classes stay apart: each image's
    # nearest class mean (leave-one-out) is its own class for most of them
    assert len({tuple(row) for row in x}) == 300
    hits = 0
    for i in range(300):
        keep = np.arange(300) != i
        means = np.stack([x[keep & (y == k)].mean(0) for k in range(10)])
        hits += np.argmin(((means - x[i]) ** 2).sum(1)) == y[i]
    assert hits >= 225  # 256 with this seed; 10 % for images unrelated to their labels
    with pytest.raises(ValueError, match="fonts"):
        cc.printed_digits(2, rng, fonts=[])


def test_split_is_stratified_and_disjoint(rng):
    labels = np.repeat(np.arange(4), [9, 12, 3, 30])
    fit, test = cc.split(labels, 1 / 3, rng)
    assert sorted(np.concatenate([fit, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[test]).tolist() == [3, 4, 1, 10]


# ---------------------------------------------------------- class-conditional: latent and metric
def test_pca_matches_the_covariance_eigenvectors(rng):
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 5.0
    pca = cc.PCA(x, 3)
    w, v = np.linalg.eigh(np.cov(x, rowvar=False))
    top = v[:, ::-1][:, :3]
    assert np.allclose(np.abs(pca.components @ top), np.eye(3), atol=1e-8)
    assert pca.explained == pytest.approx(w[::-1][:3].sum() / w.sum())
    full = cc.PCA(x, 6)
    assert np.allclose(full.decode(full.encode(x)), x) and full.explained == pytest.approx(1.0)
    with pytest.raises(ValueError, match="latent dimension"):
        cc.PCA(x, 7)


def test_frechet_distance_known_values(rng):
    a = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 3))
    assert cc.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # b = 2a + m: S_b = 4 S_a, so tr(S_a + 4 S_a - 2 * 2 S_a) = tr(S_a), plus |mean shift|^2
    m = np.array([1.0, -2.0, 0.5])
    expected = ((a.mean(0) - (2 * a + m).mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert cc.frechet_distance(a, 2 * a + m) == pytest.approx(expected, rel=1e-9)
    # against scipy's matrix square root, for covariances that do not commute
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 3)) + 1.0
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = (((a.mean(0) - b.mean(0)) ** 2).sum()
           + np.trace(sa + sb - 2 * np.real(scipy_linalg.sqrtm(sa @ sb))))
    assert cc.frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    with pytest.raises(ValueError, match="same d"):
        cc.frechet_distance(a, b[:, :2])


def test_class_conditional_bad_argument_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cc.main(["--latent-dim", "0", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--latent-dim" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_class_conditional_without_sklearn_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    with pytest.raises(SystemExit) as exc:
        cc.main(["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install scikit-learn" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two NCF fits of 200 steps in a 12-D latent, two exact plans: ~1 min
def test_class_conditional_quick_run(tmp_path, no_network, capsys):
    pytest.importorskip("sklearn")
    table, out = quick_run(cc, tmp_path, capsys)
    assert "| direction | method | class preservation |" in out and "not FID" in out
    for direction in ("forward", "backward"):
        row = {name: table[key] for key in table if key[0].startswith(direction)
               for name in [key[1]]}
        reference, unchanged = row["target's own test part (reference)"], row["source unchanged"]
        conditional, unconditional = row["NCF class-conditional"], row["NCF unconditional"]
        assert reference[0] > 0.85  # the target-domain classifier works on its own domain
        assert unchanged[0] < 0.6  # the domains differ: untranslated digits are often misread
        # both fits move the digits' distribution most of the way to the target's
        assert conditional[1] < 0.2 * unchanged[1] and unconditional[1] < 0.2 * unchanged[1]
        # the labels keep the classes (README "Examples", --quick: 67 / 73 % with labels, 42 / 48 %
        # without; exact OT without labels also keeps under half of them)
        assert conditional[0] > unconditional[0] + 0.15, (direction, conditional, unconditional)
        if "POT exact OT, labels" in row:
            assert row["POT exact OT, labels"][0] > row["POT exact OT, no labels"][0] + 0.2
