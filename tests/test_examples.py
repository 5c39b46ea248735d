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
    table = ct.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "color_transfer.png").stat().st_size > 10_000
    out = capsys.readouterr().out
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
