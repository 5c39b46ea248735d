"""Class-conditional translation between two digit domains with NCF (the paper's Table 4 application).

    python examples/class_conditional.py                # handwritten <-> printed, PCA latent, d = 12
    python examples/class_conditional.py --out figs --seed 1
    python examples/class_conditional.py --quick        # 200 steps per fit: about a minute on a CPU
    python examples/class_conditional.py --scan-latent  # the latent dimension's measurement, then exit

Domains (both 8x8 images with values 0-16):

* handwritten: scikit-learn's bundled ``load_digits`` (1797 digits; 32x32 bitmaps of NIST
  handwriting, each 4x4 block's count of inked pixels).
* printed: made here, the same way: each digit's outline from one of the fonts that ship inside
  matplotlib (DejaVu Sans / Sans Mono / Serif, STIX, Computer Modern; regular, bold and italic
  faces), scaled to the bitmaps' 28-pixel height, moved by a random affine jitter (rotation,
  shear, scale, shift), filled (even-odd rule, so the holes of 0, 4, 6, 8, 9 stay open) on a 32x32
  grid, thickened by a random pen width of 0-2 pixels, then counted in 4x4 blocks.

Each domain is split in two, class by class: NCF, the latent model and the classifiers see the
first part ("fit"), every metric is measured on the second ("test"). The latent space is a PCA
fitted on both domains' fit parts together (``--latent-dim``, default 12: see ``--scan-latent``).
Two NCF fits in that latent: class-conditional (``source_labels``/``target_labels``: class k
goes to class k) and unconditional (no labels), same seed, steps (1000) and network (three SiLU
layers of 128, peak learning rate 1e-2: see the options' comments).

Metrics, as in the paper's Table 4, both directions (forward: handwritten -> printed with T;
backward: printed -> handwritten with T^-1):

* class preservation: the accuracy of a classifier trained on the TARGET domain alone (logistic
  regression on the standardised latent coordinates of the target's fit part), applied to the
  transported test samples with their source labels. 100 % = every digit kept its class.
* Frechet distance in the latent (NOT FID: no Inception network; the Frechet distance between
  Gaussians fitted to the transported test samples and to the target's test samples, in PCA
  coordinates of the 0-16 pixel scale). Lower is better.

Reference rows: the target's own test part (the classifier's in-domain accuracy; Frechet between
the target's fit and test parts, the finite-sample floor) and the source left unchanged.
Baseline in the same run, when POT is installed: the exact OT plan between the fit parts, with and
without labels (``ot.da.EMDTransport``; a new point moves like its nearest fitted point).
Needs the ``examples`` extra (scikit-learn: the digits and the classifier; POT optional).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

N_CLASSES = 10
GRID, BLOCK = 32, 4  # NIST's 32x32 bitmaps, counted in 4x4 blocks: 8x8 images, values 0-16
SIDE = GRID // BLOCK
GLYPH_HEIGHT = 28  # pixels of 32: load_digits' digits touch all 8 rows of their image
DATA_SEED = 0  # the printed domain and the splits stay fixed; --seed only changes the fits
# font files inside matplotlib's mpl-data (so nothing depends on the system's fonts); the
# symbol, size-variant and math-italic fonts are left out (no or old-style digits)
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")
# affine jitter of a printed digit, ranges of uniform draws
LABEL_PENALTY = 1e6  # POT baseline with labels: cross-class cost = this x the largest cost
ROTATION_DEG, SHEAR_DEG, SCALE, SHIFT_PX, PEN_PX = 10.0, 10.0, (0.85, 1.05), 1.5, 2


# ------------------------------------------------------------------------- the printed domain
def font_paths() -> list[str]:
    """The FONT_FILES that matplotlib's installed copy ships, as paths (via its font_manager)."""
    import matplotlib
    from matplotlib import font_manager
    ttf = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    shipped = {os.path.basename(p): p for p in font_manager.findSystemFonts(fontpaths=[ttf])}
    return [shipped[name] for name in FONT_FILES if name in shipped]


@functools.lru_cache(maxsize=None)
def glyph(font: str, digit: int):
    """The outline (matplotlib Path) of ``digit`` in ``font``: centred on 0, GLYPH_HEIGHT pixels
    tall, y pointing down (image rows)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D
    path = TextPath((0, 0), str(digit), size=100, prop=FontProperties(fname=font))
    lo, hi = path.vertices.min(0), path.vertices.max(0)
    s = GLYPH_HEIGHT / (hi - lo)[1]
    return path.transformed(Affine2D().translate(*(-(lo + hi) / 2)).scale(s, -s))


def rasterize(outline, transform=None) -> np.ndarray:
    """(32, 32) bool: the 32x32 pixels whose centres lie inside ``outline`` moved by ``transform``
    (an Affine2D; None: centred on the grid), filled by the even-odd rule over its closed
    contours, so that a hole's contour flips its pixels back (the holes of 0, 4, 6, 8, 9)."""
    from matplotlib.path import Path
    from matplotlib.transforms import Affine2D
    transform = Affine2D().translate(GRID / 2, GRID / 2) if transform is None else transform
    centres = np.arange(GRID) + 0.5
    pixels = np.stack(np.meshgrid(centres, centres), -1).reshape(-1, 2)  # (x, y) = (col, row)
    inked = np.zeros(GRID * GRID, dtype=bool)
    for contour in outline.transformed(transform).to_polygons(closed_only=True):
        inked ^= Path(contour).contains_points(pixels)
    return inked.reshape(GRID, GRID)


def block_counts(bitmap: np.ndarray) -> np.ndarray:
    """(32, 32) bool -> (8, 8) int: inked pixels per 4x4 block (0-16), as load_digits was made."""
    return bitmap.reshape(SIDE, BLOCK, SIDE, BLOCK).sum(axis=(1, 3))


def render(outline, rng: np.random.Generator) -> np.ndarray:
    """One printed digit: outline -> (8, 8) int block counts (0-16) after a random affine jitter
    (rotation, shear, scale, shift) and a random pen width (dilation by 0-PEN_PX pixels)."""
    from matplotlib.transforms import Affine2D
    jitter = (Affine2D().rotate_deg(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
              .skew_deg(rng.uniform(-SHEAR_DEG, SHEAR_DEG), 0).scale(rng.uniform(*SCALE))
              .translate(*(GRID / 2 + rng.uniform(-SHIFT_PX, SHIFT_PX, 2))))
    inked = rasterize(outline, jitter)
    return block_counts(thicken(inked, int(rng.integers(0, PEN_PX + 1))))


def thicken(bitmap: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate a bool bitmap by ``pixels`` steps of its 4-neighbourhood (a rounder pen; numpy only)."""
    out = bitmap.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def printed_digits(per_class: int, rng: np.random.Generator, fonts=None):
    """The printed domain: (N, 64) float64 images in 0-16 and (N,) labels, N = 10 * per_class,
    each image a random font (of ``fonts``, default :func:`font_paths`) and jitter."""
    fonts = font_paths() if fonts is None else list(fonts)
    if not fonts:
        raise ValueError("none of the fonts matplotlib ships was found; is matplotlib installed?")
    labels = np.repeat(np.arange(N_CLASSES), per_class)
    images = [render(glyph(fonts[rng.integers(len(fonts))], int(k)), rng) for k in labels]
    return np.stack(images).reshape(len(labels), -1).astype(np.float64), labels


def handwritten_digits():
    """scikit-learn's bundled digits: (1797, 64) float64 in 0-16 and (1797,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the handwritten digits are scikit-learn's bundled load_digits: "
                         "pip install scikit-learn (or the examples extra)")
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64), y


def split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Stratified split: (fit indices, test indices), test_fraction of every class in test."""
    fit, test = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test]), fit.append(idx[n_test:])
    return np.concatenate(fit), np.concatenate(test)


# ------------------------------------------------------------------------------- the latent
class PCA:
    """Principal components of the rows of x (N, D): encode (n, D) -> (n, k), decode back."""

    def __init__(self, x: np.ndarray, k: int):
        if not 1 <= k <= min(x.shape):
            raise ValueError(f"latent dimension must be in 1..{min(x.shape)}, got {k}")
        self.mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[:k]  # (k, D), orthonormal rows
        self.explained = float((s[:k] ** 2).sum() / (s ** 2).sum())

    def encode(self, x):
        return (np.asarray(x) - self.mean) @ self.components.T

    def decode(self, z):
        return np.asarray(z) @ self.components + self.mean


# ------------------------------------------------------------------------------- metrics
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet (2-Wasserstein squared) distance between Gaussians fitted to samples a (N, d), b (M, d):
    |m_a - m_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). Not FID: no Inception features."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance needs two (n, d) samples of the same d, got "
                         f"{a.shape} and {b.shape}")
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


def latent_classifier(z: np.ndarray, labels: np.ndarray):
    """Logistic regression on standardised latent coordinates (scikit-learn), fitted to (z, labels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(z, labels)


# ----------------------------------------------------------------------------------- data
def make_domains(args):
    """-> dict side -> {"x": (N, 64), "y": (N,), "fit": idx, "test": idx}, sides "hand", "print"."""
    rng = np.random.default_rng(DATA_SEED)
    domains = {}
    for side, (x, y) in (("hand", handwritten_digits()),
                         ("print", printed_digits(args.printed_per_class, rng))):
        fit, test = split(y, args.test_fraction, rng)
        domains[side] = {"x": x, "y": y, "fit": fit, "test": test}
    return domains


def fit_ncf(zs, zt, labels, args):
    """NCF in the latent, with (labels = (source labels, target labels)) or without (None) the
    class condition; -> (forward map, backward map, fit seconds)."""
    from ncf_fast import NCF
    kw = {"source_labels": labels[0], "target_labels": labels[1]} if labels is not None else {}
    t0 = time.perf_counter()
    model = NCF(zs.shape[1], hidden=(args.width,) * 3, activation=args.activation, seed=args.seed, device=args.device).fit(
        zs, zt, steps=args.steps, lr=args.lr, progress=False, **kw)
    return model.transport, model.inverse, time.perf_counter() - t0


def fit_pot(zs, zt, labels):
    """POT's exact plan between the fit parts (``ot.da.EMDTransport``; with labels, a pair of
    different classes costs LABEL_PENALTY x the largest cost, so no mass crosses classes beyond
    what unequal class sizes force), out-of-sample by the nearest fitted point's displacement;
    -> (forward map, backward map, fit seconds), or None without POT."""
    try:
        import ot
    except ImportError:
        return None
    t0 = time.perf_counter()
    plan = ot.da.EMDTransport(limit_max=LABEL_PENALTY if labels is not None else 10,
                              max_iter=10_000_000)  # its default 1e5 stops short of the optimum
    ys, yt = labels if labels is not None else (None, None)
    plan.fit(Xs=zs, ys=ys, Xt=zt, yt=yt)
    return (lambda x: plan.transform(Xs=x), lambda y: plan.inverse_transform(Xt=y),
            time.perf_counter() - t0)


# ------------------------------------------------------------------------------ figure
def write_figure(path, rows: list[tuple[str, np.ndarray, np.ndarray | None]], labels: np.ndarray):
    """rows: (title, images (n, 64) in 0-16, predicted classes (n,) or None); labels (n,): the
    true classes. A predicted class is printed under its image, red where it is not the label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.62 * n + 1.9, 0.78 * len(rows) + 0.5),
                             squeeze=False)
    for r, (title, images, predicted) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.clip(images[c], 0, 16).reshape(SIDE, SIDE), cmap="gray_r", vmin=0, vmax=16)
            ax.set_xticks([]), ax.set_yticks([])
            if predicted is not None:
                wrong = predicted[c] != labels[c]
                ax.set_xlabel(str(predicted[c]), fontsize=7, labelpad=1,
                              color="red" if wrong else "black", fontweight="bold" if wrong else None)
        axes[r, 0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("class-conditional vs unconditional NCF in a PCA latent; under each translation: "
                 "the target-domain classifier's label (red: class lost)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=0.3, w_pad=0.1)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=".", help="folder for class_conditional.png")
    p.add_argument("--quick", action="store_true", help="fewer steps (about a minute on a CPU)")
    p.add_argument("--steps", type=int, help="NCF training steps per fit (default 1000; 200 with --quick)")
    # SiLU and a 5x larger learning rate than the library's default for d > 2 (softplus, 2e-3):
    # the class-conditional map bends between classes, and with the defaults it was far from
    # converged after 600 steps (README "Examples" gives the measurement)
    p.add_argument("--lr", type=float, default=1e-2, help="NCF's peak learning rate")
    # 128 (the library's width up to d = 8) instead of its 256 above: 2-3x less time per step
    p.add_argument("--width", type=int, default=128, help="NCF's hidden width (3 layers)")
    p.add_argument("--activation", default="silu", choices=("silu", "softplus", "tanh"),
                   help="NCF's activation")
    p.add_argument("--latent-dim", type=int, default=12, help="PCA dimension (NCF's d)")
    p.add_argument("--printed-per-class", type=int, default=180,
                   help="printed digits made per class (load_digits has ~180)")
    p.add_argument("--test-fraction", type=float, default=1 / 3,
                   help="part of each class held out for the metrics")
    p.add_argument("--device", default="cpu", help="torch device for NCF")
    p.add_argument("--seed", type=int, default=0, help="NCF's seed (the data are fixed)")
    p.add_argument("--scan-latent", action="store_true",
                   help="print, per PCA dimension, the explained variance and in-domain accuracy, "
                        "then exit")
    args = p.parse_args(argv)
    args.steps = args.steps or (200 if args.quick else 1000)
    for name in ("steps", "latent_dim", "printed_per_class", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not args.lr > 0:
        p.error("--lr must be a positive number")
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must lie strictly between 0 and 1")
    return args


def scan_latent(domains, dims=(4, 8, 12, 16, 24, 32, 64)) -> dict:
    """Per PCA dimension k: (explained variance, in-domain test accuracy handwritten, printed).
    The accuracy a translation can reach is capped by the target classifier's own in-domain one."""
    out = {}
    print("| PCA dim | explained variance | in-domain accuracy, handwritten | printed |")
    print("|---|---|---|---|")
    for k in dims:
        pca = PCA(np.concatenate([d["x"][d["fit"]] for d in domains.values()]), k)
        acc = []
        for d in domains.values():
            clf = latent_classifier(pca.encode(d["x"][d["fit"]]), d["y"][d["fit"]])
            acc.append(clf.score(pca.encode(d["x"][d["test"]]), d["y"][d["test"]]))
        out[k] = (pca.explained, *acc)
        print(f"| {k} | {pca.explained:.3f} | {100 * acc[0]:.1f} % | {100 * acc[1]:.1f} % |")
    return out


def main(argv=None) -> dict:
    """Run the example; returns {(direction, row): (accuracy, Frechet, fit s or None)}."""
    args = parse_args(argv)
    try:
        domains = make_domains(args)
    except ValueError as exc:  # a missing package: one line, exit status 2, nothing written
        print(f"class_conditional.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    if args.scan_latent:
        scan_latent(domains)
        return {}
    pca = PCA(np.concatenate([d["x"][d["fit"]] for d in domains.values()]), args.latent_dim)
    z = {side: {part: pca.encode(d["x"][d[part]]) for part in ("fit", "test")}
         for side, d in domains.items()}
    lab = {side: {part: d["y"][d[part]] for part in ("fit", "test")} for side, d in domains.items()}
    clf = {side: latent_classifier(z[side]["fit"], lab[side]["fit"]) for side in domains}

    fits = {}
    for name, conditional in (("NCF class-conditional", True), ("NCF unconditional", False)):
        labels = (lab["hand"]["fit"], lab["print"]["fit"]) if conditional else None
        fits[name] = fit_ncf(z["hand"]["fit"], z["print"]["fit"], labels, args)
        print(f"{name}: {args.steps} steps in {fits[name][2]:.1f} s", flush=True)
    for name, conditional in (("POT exact OT, labels", True), ("POT exact OT, no labels", False)):
        labels = (lab["hand"]["fit"], lab["print"]["fit"]) if conditional else None
        pot = fit_pot(z["hand"]["fit"], z["print"]["fit"], labels)
        if pot is not None:
            fits[name] = pot

    table, moved = {}, {}
    directions = (("forward: handwritten -> printed (T)", "hand", "print", 0),
                  ("backward: printed -> handwritten (T^-1)", "print", "hand", 1))
    for direction, src, tgt, which in directions:
        zs, ys = z[src]["test"], lab[src]["test"]
        rows = {"target's own test part (reference)": (z[tgt]["test"], lab[tgt]["test"], None,
                                                       z[tgt]["fit"]),
                "source unchanged": (zs, ys, None, None)}
        for name, maps in fits.items():
            rows[name] = (np.asarray(maps[which](zs)), ys, maps[2], None)
        for row, (points, truth, seconds, versus) in rows.items():
            predicted = clf[tgt].predict(points)
            versus = z[tgt]["test"] if versus is None else versus
            table[(direction, row)] = (float(np.mean(predicted == truth)),
                                       frechet_distance(points, versus), seconds)
            moved[(src, row)] = (points, predicted)

    print(f"\nlatent: PCA of both domains' fit parts, d = {args.latent_dim} "
          f"({100 * pca.explained:.1f} % of the pixel variance); {len(z['hand']['test'])} "
          f"handwritten and {len(z['print']['test'])} printed test digits; NCF seed {args.seed}, "
          f"{args.steps} steps per fit")
    print("class preservation: accuracy of a classifier trained on the target domain alone, on the "
          "transported test digits;\nFrechet: distance between Gaussians fitted in the latent to "
          "the transported and the target's test digits (not FID)\n")
    print("| direction | method | class preservation | Frechet in latent (not FID) | fit s |")
    print("|---|---|---|---|---|")
    for (direction, row), (acc, fd, seconds) in table.items():
        fit_s = f"{seconds:.1f}" if seconds is not None else "–"
        print(f"| {direction} | {row} | {100 * acc:.1f} % | {fd:.2f} | {fit_s} |")
    print("(reference row: the classifier on its own domain's test part; Frechet between the "
          "target's fit and test parts)")

    # figure: two test digits per class from each side, decoded from the latent
    picks = {side: np.concatenate([np.flatnonzero(lab[side]["test"] == k)[:2]
                                   for k in range(N_CLASSES)]) for side in domains}
    figure_rows = []
    for src, tgt_word, map_word in (("hand", "printed", "T"), ("print", "handwritten", "T⁻¹")):
        pick = picks[src]
        figure_rows.append((f"{'handwritten' if src == 'hand' else 'printed'} (input)",
                            domains[src]["x"][domains[src]["test"][pick]], None))
        for name in ("NCF class-conditional", "NCF unconditional"):
            points, predicted = moved[(src, name)]
            short = "with labels" if "class-cond" in name else "no labels"
            figure_rows.append((f"→ {tgt_word}, {map_word} {short}", pca.decode(points[pick]),
                                predicted[pick]))
    assert np.array_equal(lab["hand"]["test"][picks["hand"]], lab["print"]["test"][picks["print"]])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "class_conditional.png")
    write_figure(path, figure_rows, lab["hand"]["test"][picks["hand"]])
    print(f"wrote {path}")
    return table


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
