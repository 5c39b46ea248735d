"""Colour transfer between two photographs with NCF (the paper's Table 3 application).

    python examples/color_transfer.py                       # scikit-image's astronaut -> coffee
    python examples/color_transfer.py SRC.png TGT.jpg --out figs
    python examples/color_transfer.py --quick               # under a minute on a CPU

Each image is a cloud of colours in RGB, scaled to [0, 1]^3 (d = 3). RGB because the paper's two
metrics (EMD, histogram intersection) are measured in RGB and the quadratic cost in RGB is the
paper's setting; a recoloured value only needs clipping back to [0, 1] (a map fitted in Lab can
leave the sRGB gamut, and its metrics would need a second conversion).

NCF is fitted on a random sample of pixels of each image; then the WHOLE source image is
recoloured with T and the whole target image with T^-1 (one network gives both directions).
Metrics, for both directions (recoloured source vs target, recoloured target vs source):

* EMD: exact OT (POT's ``ot.emd2``, or SciPy's assignment solver without POT; equal sizes and
  uniform weights make the two the same problem) between ``--emd-samples`` random pixels of
  each, with Euclidean ground cost in RGB [0, 1] (so EMD = W1). Lower is better.
* Histogram intersection: sum_b min(p_b, q_b) of the normalised colour histograms over all
  pixels, 16 bins per channel (16^3 = 4096 RGB bins). 1 = identical histograms; higher is better.

Baselines in the same run: "none" (the image unchanged) and, when POT is installed, POT's exact
plan on ``--pot-samples`` pixels with its out-of-sample mapping (``ot.da.EMDTransport``:
each new pixel moves like its nearest fitted source pixel), forward and backward.
Needs the ``examples`` extra (scikit-image for the bundled photographs; POT optional).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

DEFAULT_SOURCE, DEFAULT_TARGET = "astronaut", "coffee"
# colour photographs whose files ship inside the scikit-image wheel (other skimage.data loaders
# fetch from the network); checked with sockets disabled in tests/test_examples.py
BUNDLED = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
           "retina")
HIST_BINS = 16  # per channel (4096 bins): coarse enough that a 0.2 MP photo fills its occupied bins with many pixels


# ------------------------------------------------------------------------------ images
def load_image(spec: str) -> np.ndarray:
    """An RGB image as float64 (H, W, 3) in [0, 1], from a file path or a name in skimage.data.

    Names: :data:`BUNDLED` (files inside the scikit-image wheel: nothing is downloaded).
    """
    if os.path.exists(spec):
        import matplotlib.pyplot as plt
        img = np.asarray(plt.imread(spec))
    elif spec in BUNDLED:
        try:
            import skimage.data
        except ImportError:
            raise ValueError(f"{spec!r} is not a file, and scikit-image (for its bundled images) is "
                             f"not installed: pip install scikit-image, or pass two image files")
        img = np.asarray(getattr(skimage.data, spec)())
    else:
        raise ValueError(f"{spec!r} is neither an image file nor one of scikit-image's bundled "
                         f"photographs ({', '.join(BUNDLED)})")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"{spec!r} is not an RGB image (shape {img.shape}); colour transfer needs "
                         f"three channels")
    img = img[..., :3]
    scale = 255.0 if img.dtype == np.uint8 else 65535.0 if img.dtype == np.uint16 else 1.0
    return np.clip(img.astype(np.float64) / scale, 0.0, 1.0)


def pixels(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H*W, 3)."""
    return img.reshape(-1, 3)


def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of x drawn without replacement (all of x if it has fewer)."""
    if n >= len(x):
        return x
    return x[rng.choice(len(x), n, replace=False)]


# ----------------------------------------------------------------------------- metrics
def histogram_intersection(a: np.ndarray, b: np.ndarray, bins: int = HIST_BINS) -> float:
    """sum_b min(p_b, q_b) of the normalised bins^3 histograms of colours a (N, 3), b (M, 3) in [0, 1].

    1 for identical histograms, 0 for disjoint ones.
    """
    def hist(x):
        idx = np.clip((np.asarray(x) * bins).astype(np.int64), 0, bins - 1)
        flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
        return np.bincount(flat, minlength=bins ** 3) / len(x)
    return float(np.minimum(hist(a), hist(b)).sum())


def emd(a: np.ndarray, b: np.ndarray) -> float:
    """Exact earth mover's distance (W1, Euclidean ground cost) between equal-size uniform samples.

    a, b: (n, d). Uses POT's network simplex (``ot.emd2``) when installed, else SciPy's assignment
    solver: with n points on each side and weights 1/n, an optimal plan is a permutation.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"emd needs two samples of the same shape, got {a.shape} and {b.shape}")
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    try:
        import ot
    except ImportError:
        from scipy.optimize import linear_sum_assignment
        rows, cols = linear_sum_assignment(cost)
        return float(cost[rows, cols].mean())
    w = np.full(len(a), 1.0 / len(a))
    return float(ot.emd2(w, w, cost, numItermax=10_000_000))


def scores(recoloured: np.ndarray, reference: np.ndarray, n_emd: int, rng) -> tuple[float, float]:
    """(EMD on n_emd random pixels of each, histogram intersection over all pixels)."""
    return (emd(subsample(recoloured, n_emd, rng), subsample(reference, n_emd, rng)),
            histogram_intersection(recoloured, reference))


# ----------------------------------------------------------------------------- methods
def fit_ncf(src: np.ndarray, tgt: np.ndarray, args, rng):
    """Fit NCF on args.fit_samples pixels of each image; -> (forward, backward, fit seconds)."""
    from ncf_fast import NCF
    xs, ys = subsample(src, args.fit_samples, rng), subsample(tgt, args.fit_samples, rng)
    t0 = time.perf_counter()
    model = NCF(3, seed=args.seed, device=args.device).fit(
        xs, ys, steps=args.steps, batch_size=args.batch_size, mmd_batch_size=args.mmd_batch_size,
        progress=False)
    return model.transport, model.inverse, time.perf_counter() - t0


def fit_pot(src: np.ndarray, tgt: np.ndarray, args, rng):
    """POT's exact plan on args.pot_samples pixels with out-of-sample mapping, or None w/o POT."""
    try:
        import ot
    except ImportError:
        return None
    xs, ys = subsample(src, args.pot_samples, rng), subsample(tgt, args.pot_samples, rng)
    t0 = time.perf_counter()
    plan = ot.da.EMDTransport()
    plan.fit(Xs=xs, Xt=ys)
    # POT recomputes the fitted samples' barycentric images once per batch: its default batch of
    # 128 rows made the out-of-sample mapping of two 0.25 MP images take minutes
    batch = 8192
    return (lambda x: plan.transform(Xs=x, batch_size=batch),
            lambda y: plan.inverse_transform(Xt=y, batch_size=batch), time.perf_counter() - t0)


# ------------------------------------------------------------------------------ figure
def colour_cloud(ax, colours: np.ndarray, basis: np.ndarray, centre: np.ndarray, title: str):
    """Scatter colours (n, 3) projected on two principal axes, each point painted its colour."""
    xy = (colours - centre) @ basis
    ax.scatter(xy[:, 0], xy[:, 1], c=np.clip(colours, 0, 1), s=2, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("principal axis 1 (RGB units)", fontsize=8, labelpad=1)
    ax.set_ylabel("principal axis 2 (RGB units)", fontsize=8, labelpad=1)
    ax.tick_params(labelsize=7, length=2, pad=1)


def write_figure(path, images: dict, clouds: dict, rng):
    """images: title -> (H, W, 3); clouds: title -> (N, 3) colours. One row each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(images), len(clouds))
    fig, axes = plt.subplots(2, ncol, figsize=(2.6 * ncol, 5.4))
    for ax, (title, img) in zip(axes[0], images.items()):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    pooled = np.concatenate([subsample(c, 3000, rng) for c in clouds.values()])
    centre = pooled.mean(0)
    basis = np.linalg.svd(pooled - centre, full_matrices=False)[2][:2].T  # top two principal axes
    lims = None
    for ax, (title, cols) in zip(axes[1], clouds.items()):
        colour_cloud(ax, subsample(cols, 3000, rng), basis, centre, title)
        lims = lims or (ax.get_xlim(), ax.get_ylim())
        ax.set_xlim(*lims[0]), ax.set_ylim(*lims[1])
    for ax in list(axes[0][len(images):]) + list(axes[1][len(clouds):]):
        ax.axis("off")
    fig.suptitle("colours projected on the pooled colours' two principal axes", y=0.02, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=64)  # keeps the PNG under ~250 KB for the README
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", nargs="?", default=DEFAULT_SOURCE,
                   help="image file, or a name in skimage.data")
    p.add_argument("target", nargs="?", default=DEFAULT_TARGET,
                   help="image file, or a name in skimage.data")
    p.add_argument("--out", default=".", help="folder for color_transfer.png")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and samples (under a minute on a CPU)")
    p.add_argument("--steps", type=int, help="NCF training steps (default 2000; 300 with --quick)")
    p.add_argument("--fit-samples", type=int, default=50_000, help="pixels of each image NCF sees")
    p.add_argument("--batch-size", type=int, default=256, help="collocation points per step")
    p.add_argument("--mmd-batch-size", type=int, default=1024,
                   help="target pixels per step in the energy-distance term")
    p.add_argument("--emd-samples", type=int,
                   help="pixels per side of the exact-OT EMD (default 2000; 500 with --quick)")
    p.add_argument("--pot-samples", type=int,
                   help="pixels per side of POT's plan (default 2000; 500 with --quick)")
    p.add_argument("--device", default="cpu", help="torch device for NCF")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (300 if quick else 2000)
    args.emd_samples = args.emd_samples or (500 if quick else 2000)
    args.pot_samples = args.pot_samples or (500 if quick else 2000)
    if quick:
        args.fit_samples = min(args.fit_samples, 10_000)
    for name in ("steps", "fit_samples", "batch_size", "mmd_batch_size", "emd_samples", "pot_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv=None) -> dict:
    """Run the example; returns {method: (fit s, apply s, EMD fwd, HI fwd, EMD bwd, HI bwd)}."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    try:
        src_img, tgt_img = load_image(args.source), load_image(args.target)
    except ValueError as exc:  # a bad image argument: one line, exit status 2, nothing written
        print(f"color_transfer.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    src, tgt = pixels(src_img), pixels(tgt_img)

    rows = {"none (unchanged)": (0.0, 0.0, src, tgt)}
    methods = {"NCF": fit_ncf(src, tgt, args, rng)}
    pot = fit_pot(src, tgt, args, rng)
    if pot is not None:
        methods[f"POT EMDTransport (n={args.pot_samples})"] = pot
    for name, (forward, backward, fit_s) in methods.items():
        t0 = time.perf_counter()
        fwd, bwd = np.clip(forward(src), 0, 1), np.clip(backward(tgt), 0, 1)
        rows[name] = (fit_s, time.perf_counter() - t0, fwd, bwd)

    table = {}
    print(f"colour transfer {args.source} -> {args.target} (RGB in [0,1]); EMD: exact OT on "
          f"{args.emd_samples} pixels per side, Euclidean cost; HI: histogram intersection, "
          f"{HIST_BINS}^3 bins, all pixels")
    print(f"{'method':<32}{'fit s':>8}{'apply s':>9}{'EMD fwd':>9}{'HI fwd':>8}{'EMD bwd':>9}{'HI bwd':>8}")
    for name, (fit_s, apply_s, fwd, bwd) in rows.items():
        e_f, h_f = scores(fwd, tgt, args.emd_samples, rng)
        e_b, h_b = scores(bwd, src, args.emd_samples, rng)
        table[name] = (fit_s, apply_s, e_f, h_f, e_b, h_b)
        print(f"{name:<32}{fit_s:>8.1f}{apply_s:>9.1f}{e_f:>9.4f}{h_f:>8.3f}{e_b:>9.4f}{h_b:>8.3f}")
    print("fwd: source recoloured vs target; bwd: target recoloured (T^-1) vs source")

    _, _, ncf_fwd, ncf_bwd = rows["NCF"]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "color_transfer.png")
    write_figure(path,
                 {"source": src_img, "target": tgt_img,
                  "source recoloured T(x)": ncf_fwd.reshape(src_img.shape),
                  "target recoloured T⁻¹(y)": ncf_bwd.reshape(tgt_img.shape)},
                 {"source colours": src, "target colours": tgt, "T(source)": ncf_fwd,
                  "T⁻¹(target)": ncf_bwd}, rng)
    print(f"wrote {path}")
    return table


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
