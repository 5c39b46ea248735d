"""Figures of a trained run, for reading a run and for a paper.

    forward.png       the forward map T: displacement field x -> T(x) (arrows on a subsample,
                      the exact map beside it when the problem has one); T#mu against nu as
                      density contours; the per-point error |T(x) - T*(x)| (exact map known)
                      or the marginal densities (unknown)
    inverse.png       the same for the backward map y -> T^-1(y), T^-1#nu against mu
    training.png      L_HJ, the training estimate of L_MMD, the held-out energy distance (its
                      own log axis) and the learning rate against the step
    displacement.png  distributions of the displacement lengths |T(x) - x|, |T^-1(y) - y|
                      (and the exact map's, when known)

For d = 2 the panels are in data coordinates; for d > 2 they show the projection on the two
principal axes of the pooled source and target samples (errors and lengths are still measured
in all d coordinates); for d = 1 the characteristics are drawn in the (x, t) plane. Lengths and
energy distances are in the data's units; L_HJ and L_MMD in the standardised coordinates the fit
trains in (README, "How it trains"). matplotlib is imported only here and only when a figure is
drawn, through its object-oriented API on the Agg canvas: no display, no pyplot global state.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["run_plots", "map_figure", "training_figure", "displacement_figure"]

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies and in greyscale
SOURCE, TARGET, MAPPED, TRUE, LINE = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#303030"
ARROWS = 150       # arrows per displacement field: enough to show the flow, few enough to read
MASS_LEVELS = (0.5, 0.8, 0.95)  # density contours enclose these shares of the mass
GRID = 90          # density grid per axis: smooth contours without hiding structure

_STYLE = {
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 7.5,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.linewidth": 0.8, "legend.frameon": False,
    "savefig.dpi": 120, "savefig.bbox": "tight", "savefig.pad_inches": 0.05,
    "font.family": "DejaVu Sans", "mathtext.fontset": "dejavusans",
    "axes.grid": False, "grid.linewidth": 0.4, "grid.alpha": 0.35,
}


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    """Write the PNG beside its final name, then rename: a crash never leaves half a picture."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


class _Projection:
    """Coordinates for the planar panels: identity for d = 2, principal axes for d > 2."""

    def __init__(self, pooled: np.ndarray):
        self.dim = pooled.shape[1]
        if self.dim == 2:
            self.mean, self.axes = np.zeros(2), np.eye(2)
            self.labels = ("$x_1$", "$x_2$")
            return
        self.mean = pooled.mean(0)
        cov = np.cov((pooled - self.mean).T)
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1][:2]
        self.axes = v[:, order]
        share = 100 * w[order] / max(w.sum(), 1e-300)
        self.labels = (f"principal axis 1 ({share[0]:.0f} % of variance)",
                       f"principal axis 2 ({share[1]:.0f} % of variance)")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.axes


def _limits(*clouds, quantile=0.998, pad=0.06):
    """Axis limits covering all clouds but a few outliers."""
    pts = np.concatenate(clouds)
    lo = np.quantile(pts, 1 - quantile, axis=0)
    hi = np.quantile(pts, quantile, axis=0)
    span = np.maximum(hi - lo, 1e-9)
    return lo - pad * span, hi + pad * span


def _pick(n, k, rng):
    return np.sort(rng.choice(n, size=min(n, k), replace=False))


def _blur(h: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D histogram (sigma in bins), edges padded with zeros."""
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h = np.apply_along_axis(np.convolve, 0, h, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, h, k, mode="same")


def _density(points, lo, hi):
    """A smoothed density on a GRID x GRID grid over [lo, hi] and the levels that enclose
    MASS_LEVELS of the mass (highest-density regions), lowest level first."""
    h, xe, ye = np.histogram2d(points[:, 0], points[:, 1], bins=GRID,
                               range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    # bandwidth ~ Scott's rule in bins, at least 1.2 bins: fewer points, smoother estimate
    sigma = max(1.2, GRID * len(points) ** (-1 / 6) * 0.25)
    z = _blur(h, sigma)
    z = z / max(z.sum(), 1e-300)
    flat = np.sort(z.ravel())[::-1]
    cum = np.cumsum(flat)
    levels = sorted({float(flat[min(np.searchsorted(cum, m), len(flat) - 1)]) for m in MASS_LEVELS})
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    return xc, yc, z.T, levels


def _l2_uvp(pred, true, other) -> float:
    """The L2-UVP (%) of pred against true, relative to the spread of ``other`` (the measure
    the map should reach): ncf_fast.metrics.l2_uvp on arrays already in numpy."""
    return float(100.0 * ((pred - true) ** 2).sum(1).mean() / other.var(axis=0, ddof=1).sum())


def map_figure(start, end, other, *, names, truth=None, title="", max_points=1500, seed=0,
               arrow="T(x) - x", exact="T^*(x)"):
    """The figure of one map: displacement field, pushed density vs the other measure, error.

    start (N, d): points; end (N, d): their images under the learned map; other (M, d): samples
    of the measure the images should match; truth (N, d) or None: the exact map's images of
    start. names = (start, end, other) legend names (mathtext allowed); arrow, exact: mathtext
    for what the arrows show and for the exact image (titles and the error's colour bar). max_points: points per scatter (the densities use them all).
    Returns the Figure."""
    rng = np.random.default_rng(seed)
    start, end, other = (np.asarray(a, dtype=np.float64) for a in (start, end, other))
    truth = None if truth is None else np.asarray(truth, dtype=np.float64)
    d = start.shape[1]
    src_color, dst_color = (SOURCE, TARGET) if "source" in names[0] else (TARGET, SOURCE)
    if d == 1:
        return _map_figure_1d(start, end, other, names, truth, title, max_points, rng,
                              src_color, dst_color)

    proj = _Projection(np.concatenate([start, other]))
    ps, pe, po = proj(start), proj(end), proj(other)
    lo, hi = _limits(ps, pe, po)
    where = " (projection)" if d > 2 else ""
    fig = _figure(12.6, 4.3)
    ax_field, ax_dens, ax_err = fig.subplots(1, 3)
    dot = {"s": 3, "linewidths": 0, "rasterized": True}

    # (a) the displacement field on a subsample, the exact map's arrows underneath
    i = _pick(len(ps), max_points, rng)
    ax_field.scatter(*ps[i].T, c=src_color, alpha=0.18, **dot)
    k = _pick(len(ps), ARROWS, rng)
    quiver = {"angles": "xy", "scale_units": "xy", "scale": 1.0, "width": 0.0032,
              "headwidth": 3.5, "headlength": 4.0, "headaxislength": 3.5}
    if truth is not None:
        pt = proj(truth)
        ax_field.quiver(*ps[k].T, *(pt[k] - ps[k]).T, color=TRUE, alpha=0.75, zorder=2,
                        **{**quiver, "width": 0.0055})
    ax_field.quiver(*ps[k].T, *(pe[k] - ps[k]).T, color=LINE, zorder=3, **quiver)
    under = ", exact map beneath" if truth is not None else ""
    ax_field.set_title(f"Displacement field ${arrow}${where}\n({len(k)} arrows{under})")

    # (b) the pushed measure against the one it should match: equal-mass density contours
    xc, yc, z_other, lv_other = _density(po, lo, hi)
    _, _, z_end, lv_end = _density(pe, lo, hi)
    import matplotlib.colors as mcolors
    shades = [mcolors.to_rgba(dst_color, a) for a in (0.18, 0.35, 0.55)]
    ax_dens.contourf(xc, yc, z_other, levels=lv_other + [z_other.max() * 1.001],
                     colors=shades[:len(lv_other)])
    ax_dens.contour(xc, yc, z_other, levels=lv_other, colors=dst_color, linewidths=0.6)
    ax_dens.contour(xc, yc, z_end, levels=lv_end, colors=MAPPED, linewidths=1.3)
    shares = ", ".join(f"{100 * m:.0f}" for m in MASS_LEVELS)
    ax_dens.set_title(f"{names[1]} vs {names[2]}{where}\ncontours holding {shares} % of the mass")

    # (c) the error against the exact map, or the marginal densities
    if truth is not None:
        err = np.linalg.norm(end - truth, axis=1)
        uvp = _l2_uvp(end, truth, other)
        j = np.argsort(err[i])  # the largest errors drawn last, on top
        sc = ax_err.scatter(*ps[i][j].T, c=err[i][j], cmap="viridis", s=5, linewidths=0,
                            rasterized=True, vmin=0, vmax=np.quantile(err, 0.99))
        bar = fig.colorbar(sc, ax=ax_err, shrink=0.85, pad=0.02)
        bar.set_label(f"$|{names[1].strip('$')} - {exact}|$ (data units)")
        ax_err.set_title(f"Error against the exact map{where}\nL2-UVP {uvp:.3g} %")
        panels = (ax_field, ax_dens, ax_err)
    else:
        ax_err.remove()
        gs = ax_dens.get_subplotspec().get_gridspec()
        sub = gs[0, 2].subgridspec(2, 1, hspace=0.08)
        axes = [fig.add_subplot(sub[r]) for r in range(2)]
        for r, ax in enumerate(axes):
            bins = np.linspace(lo[r], hi[r], 60)
            ax.hist(po[:, r], bins=bins, density=True, color=dst_color, alpha=0.45,
                    label=names[2])
            ax.hist(pe[:, r], bins=bins, density=True, histtype="step", color=MAPPED, lw=1.4,
                    label=names[1])
            ax.set(xlabel=proj.labels[r], ylabel="density")
        axes[0].set_title(f"Marginal densities{where}")
        axes[0].legend(loc="upper right")
        panels = (ax_field, ax_dens)
    for ax in panels:
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel=proj.labels[0],
               ylabel=proj.labels[1])
        ax.set_aspect("equal", adjustable="box")
    entries = [(names[0], src_color, "o"), (names[2] + " (filled contours)", dst_color, "s"),
               (names[1] + " (contours)", MAPPED, "-"), ("learned map", LINE, ">")]
    if truth is not None:
        entries.append(("exact map", TRUE, ">"))
    _legend_below(fig, entries)
    if title:
        fig.suptitle(title, fontsize=10.5)
    return fig


def _map_figure_1d(start, end, other, names, truth, title, max_points, rng, src_color, dst_color):
    """d = 1: characteristics in the (x, t) plane, densities, and the error if known."""
    from matplotlib.collections import LineCollection

    i = _pick(start.shape[0], max_points, rng)
    s, e = start[i, 0], end[i, 0]
    lo, hi = _limits(start, end, other)
    fig = _figure(12.6 if truth is not None else 8.6, 3.8)
    axes = fig.subplots(1, 3 if truth is not None else 2)
    ax_flow, ax_match = axes[0], axes[1]
    k = _pick(len(s), ARROWS, rng)
    lines = np.stack([np.stack([s[k], np.zeros(len(k))], 1), np.stack([e[k], np.ones(len(k))], 1)], 1)
    ax_flow.add_collection(LineCollection(lines, colors=LINE, linewidths=0.5, alpha=0.45))
    ax_flow.scatter(s, np.zeros(len(s)), c=src_color, s=4, alpha=0.5, linewidths=0)
    ax_flow.scatter(e, np.ones(len(e)), c=MAPPED, s=4, alpha=0.5, linewidths=0)
    ax_flow.set(xlim=(lo[0], hi[0]), ylim=(-0.05, 1.05), xlabel="$x$", ylabel="$t / t_f$",
                title=f"Straight characteristics ({len(k)} drawn)")
    bins = np.linspace(lo[0], hi[0], 60)
    ax_match.hist(other[:, 0], bins=bins, density=True, color=dst_color, alpha=0.45, label=names[2])
    ax_match.hist(end[:, 0], bins=bins, density=True, histtype="step", color=MAPPED, lw=1.4,
                  label=names[1])
    ax_match.set(xlabel="$x$", ylabel="density", title=f"{names[1]} vs {names[2]}")
    ax_match.legend(loc="upper right")
    if truth is not None:
        err = np.abs(end[:, 0] - truth[:, 0])
        axes[2].scatter(start[i, 0], err[i], c=LINE, s=4, linewidths=0)
        axes[2].set(xlabel="$x$", ylabel="error (data units)",
                    title=f"Error against the exact map: L2-UVP {_l2_uvp(end, truth, other):.3g} %")
    if title:
        fig.suptitle(title, fontsize=10.5)
    return fig


def _legend_below(fig, entries):
    """One legend under the panels, with opaque markers (the scatter points are translucent)."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="-" if kind in "->" else "", marker={"-": None}.get(kind, kind),
                      color=color, ms=5, lw=1.4, label=label) for label, color, kind in entries]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), handlelength=1.6,
               columnspacing=1.6)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (same length; near the ends it averages what exists)."""
    if len(y) == 0 or window <= 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(len(y))
    lo = np.maximum(idx - window // 2, 0)
    hi = np.minimum(idx + window - window // 2, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def _curve(ax, steps, values, color, window, log, raw_label="per step"):
    """The raw trace faint, its moving average bold. On a log axis the first steps, before the
    curve reaches its settled range (u starts flat, so L_HJ starts at ~0), are left out instead
    of diving off the axis; returns the y-limits chosen (log) or None."""
    smooth = _smooth(values, window)
    if not log:
        ax.plot(steps, values, color=color, lw=0.4, alpha=0.18, label=raw_label)
        ax.plot(steps, smooth, color=color, lw=1.6, label=f"moving average ({window} steps)")
        return None
    settled = smooth[len(smooth) // 10:]
    settled = settled[np.isfinite(settled) & (settled > 0)]
    if not settled.size:
        return None
    floor = settled.min() / 4
    first = int(np.argmax(smooth >= settled.min()))  # start inside the settled range
    top = max(np.quantile(values[first:], 0.995), np.nanmax(smooth[first:]))
    keep = slice(first, None)
    raw = np.where(values > floor, values, np.nan)[keep]
    ax.plot(steps[keep], raw, color=color, lw=0.5, alpha=0.25, label="per step")
    ax.plot(steps[keep], smooth[keep], color=color, lw=1.6, label=f"moving average ({window} steps)")
    ax.set_yscale("log")
    ax.set_ylim(floor, top * 1.5)
    ax.set_xlim(0, steps[-1] if len(steps) else 1)
    return floor, top


def training_figure(history: dict, title: str = ""):
    """Four panels against the step: L_HJ (log), the training estimate of L_MMD (linear: it is
    noisy and, being unbiased, often below 0), the held-out energy distance (log of its absolute
    value: negative estimates drawn as open markers) and the learning rate (log)."""
    steps = np.asarray(history.get("step", []), dtype=float)
    fig = _figure(10.5, 6.2)
    (ax_hj, ax_mmd), (ax_held, ax_lr) = fig.subplots(2, 2)
    window = max(1, len(steps) // 40)
    hj = np.asarray(history.get("hj", []), dtype=float)
    if len(hj) and _curve(ax_hj, steps, hj, SOURCE, window, log=True) is not None:
        ax_hj.legend(loc="upper right")
    elif len(hj):  # e.g. a fit cut after its first step, while u is still flat (L_HJ = 0)
        ax_hj.text(0.5, 0.5, "no positive L_HJ to draw yet", transform=ax_hj.transAxes,
                   ha="center", va="center", color=LINE)
    ax_hj.set(xlabel="step", ylabel=r"$L_{HJ} = E\,r^2$ (standardised units)",
              title="HJ characteristic residual (training batches)")

    mmd = np.asarray(history.get("mmd", []), dtype=float)
    if len(mmd):
        # a wider window: one step's estimate is far noisier than L_HJ's; the axis follows the
        # average (the faint per-step trace is clipped), or the noise would flatten it
        wide = max(1, len(steps) // 20)
        spread = float(np.quantile(np.abs(mmd[len(mmd) // 10:]), 0.9))
        _curve(ax_mmd, steps, mmd, TARGET, wide, log=False,
               raw_label=f"per step (spread ±{spread:.2g}, clipped)")
        smooth = _smooth(mmd, wide)
        pad = 0.15 * max(np.ptp(smooth), 1e-12)
        ax_mmd.set_ylim(min(smooth.min(), 0.0) - pad, max(smooth.max(), 0.0) + pad)
        ax_mmd.legend(loc="upper right")
    ax_mmd.axhline(0.0, color=LINE, lw=0.6)
    ax_mmd.set(xlabel="step", ylabel=r"$L_{MMD}$ (standardised units)",
               title="Marginal term, training estimate (unbiased: can be < 0)")

    held_steps = np.asarray(history.get("heldout_step", []), dtype=float)
    held = np.asarray(history.get("heldout", []), dtype=float)
    if len(held):
        size = np.abs(held)
        floor = max(size[size > 0].min() if np.any(size > 0) else 1e-12, 1e-300)
        size = np.maximum(size, floor)
        pos = held >= 0
        ax_held.plot(held_steps, size, color=MAPPED, lw=1.0)
        ax_held.plot(held_steps[pos], size[pos], "o", color=MAPPED, ms=4.5,
                     label="held-out energy distance")
        if np.any(~pos):
            ax_held.plot(held_steps[~pos], size[~pos], "o", mfc="white", mec=MAPPED, ms=4.5,
                         label="negative estimate: |value| (noise around 0)")
        ax_held.set_yscale("log")
        ax_held.legend(loc="best")
    ax_held.set(xlabel="step", ylabel="|energy distance| (data units)",
                title=r"Held-out check: $T_\sharp\mu$ vs $\nu$ on unseen samples")

    lr = np.asarray(history.get("lr", []), dtype=float)
    if len(lr):
        ax_lr.plot(steps, lr, color=LINE, lw=1.4)
        if np.all(lr > 0):
            ax_lr.set_yscale("log")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate (warm-up, cosine decay)")
    for ax in (ax_hj, ax_mmd, ax_held, ax_lr):
        ax.grid(True, which="major")
        if len(steps):
            ax.set_xlim(0, steps[-1] * 1.02)
    if title:
        fig.suptitle(f"Training — {title}", fontsize=10.5)
    return fig


def displacement_figure(source, pushed, target, pulled, title: str = "", truth_forward=None,
                        truth_backward=None):
    """Distributions of the displacement lengths |T(x) - x| and |T^-1(y) - y| (data units), with
    the exact maps' lengths as dashed lines when they are known (truth_* (N, d) or None)."""
    fwd = np.linalg.norm(pushed - source, axis=1)
    bwd = np.linalg.norm(pulled - target, axis=1)
    fig = _figure(10.5, 3.6)
    axes = fig.subplots(1, 2, sharey=False)
    for ax, length, truth, start, color, label in (
            (axes[0], fwd, truth_forward, source, SOURCE, r"forward $|T(x) - x|$"),
            (axes[1], bwd, truth_backward, target, TARGET, r"backward $|T^{-1}(y) - y|$")):
        exact = None if truth is None else np.linalg.norm(np.asarray(truth) - start, axis=1)
        pool = length if exact is None else np.concatenate([length, exact])
        hi = np.quantile(pool, 0.998) if len(pool) else 1.0
        bins = np.linspace(0, max(hi, 1e-9) * 1.05, 50)
        ax.hist(length, bins=bins, density=True, color=color, alpha=0.5,
                label=f"learned map, mean {length.mean():.3g}")
        if exact is not None:
            ax.hist(exact, bins=bins, density=True, histtype="step", color=TRUE, lw=1.4, ls="--",
                    label=f"exact map, mean {exact.mean():.3g}")
        ax.set(xlabel=f"displacement length {label.split(' ', 1)[1]} (data units)",
               ylabel="density", title=f"{label.split(' ')[0].capitalize()} map: how far points move")
        ax.legend(loc="upper right")
    if title:
        fig.suptitle(f"Displacement lengths — {title}", fontsize=10.5)
    return fig


def run_plots(folder: str, source, target, pushed, pulled, history: dict, *, max_points=1500,
              title: str = "", truth_forward=None, truth_backward=None) -> list[str]:
    """Write the four figures of a run into ``folder``; returns their paths.

    source (N, d), target (M, d) in data units; pushed = T(source), pulled = T^-1(target);
    truth_forward = T*(source), truth_backward = T*^-1(target) when the exact maps are known
    (else None). title: a human name of the problem, e.g. "Gaussian pair (d = 2, seed 1)"."""
    import matplotlib

    source, target, pushed, pulled = (np.asarray(a, dtype=np.float64)
                                      for a in (source, target, pushed, pulled))
    suffix = f" — {title}" if title else ""
    files = []
    with matplotlib.rc_context(_STYLE):
        fig = map_figure(source, pushed, target, names=(r"source $\mu$", r"$T(x)$", r"target $\nu$"),
                         truth=truth_forward, title=f"Forward map $T$: source → target{suffix}",
                         max_points=max_points, arrow="T(x) - x")
        files.append(_save(fig, os.path.join(folder, "forward.png")))
        fig = map_figure(target, pulled, source,
                         names=(r"target $\nu$", r"$T^{-1}(y)$", r"source $\mu$"),
                         truth=truth_backward,
                         title=f"Backward map $T^{{-1}}$: target → source{suffix}",
                         max_points=max_points, seed=1, arrow="T^{-1}(y) - y",
                         exact="(T^*)^{-1}(y)")
        files.append(_save(fig, os.path.join(folder, "inverse.png")))
        files.append(_save(training_figure(history, title), os.path.join(folder, "training.png")))
        files.append(_save(displacement_figure(source, pushed, target, pulled, title,
                                               truth_forward, truth_backward),
                           os.path.join(folder, "displacement.png")))
    return files
