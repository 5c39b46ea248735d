"""Figures of a trained run: the maps' straight characteristics, training curves, displacements.

    forward.png       source, target and T(x) with the characteristics x -> T(x); T#mu vs nu
    inverse.png       the same for the backward map y -> T^-1(y); T^-1#nu vs mu
    training.png      L_HJ, L_MMD (+ held-out energy distance) and the learning rate per step
    displacement.png  histograms of |T(x) - x| and |T^-1(y) - y|

For d = 2 the plots are in data coordinates; for d > 2 they show a projection on the two
principal axes of the pooled source and target samples; for d = 1 the characteristics are drawn
in the (x, t) plane. matplotlib is imported only here and only when a figure is drawn, through
its object-oriented API on the Agg canvas: no display, no pyplot global state.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["run_plots", "map_figure", "training_figure", "displacement_figure"]

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies and in greyscale
SOURCE, TARGET, MAPPED, LINE = "#0072B2", "#E69F00", "#009E73", "#404040"
LINES_DRAWN = 300  # characteristics drawn per panel: enough to show the flow, few enough to read

_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.linewidth": 0.8, "legend.frameon": False,
    "savefig.dpi": 200, "savefig.bbox": "tight", "savefig.pad_inches": 0.05,
    "font.family": "DejaVu Sans", "mathtext.fontset": "dejavusans",
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
    """Coordinates for the scatter plots: identity for d = 2, principal axes for d > 2."""

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
        self.labels = (f"PC1 ({share[0]:.0f}% of variance)", f"PC2 ({share[1]:.0f}% of variance)")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.axes


def _limits(*clouds, quantile=0.998, pad=0.06):
    """Square-ish axis limits covering all clouds but a few outliers."""
    pts = np.concatenate(clouds)
    lo = np.quantile(pts, 1 - quantile, axis=0)
    hi = np.quantile(pts, quantile, axis=0)
    span = np.maximum(hi - lo, 1e-9)
    return lo - pad * span, hi + pad * span


def _pick(n, k, rng):
    return np.sort(rng.choice(n, size=min(n, k), replace=False))


def map_figure(start, end, other, *, names, flow_label="characteristic", title="",
               max_points=1500, seed=0):
    """Two panels: the characteristics start -> end over ``other``; end vs other.

    start (N, d), end (N, d): points and their images; other (M, d): the samples the images
    should match. names = (start, end, other) legend names; flow_label names the segments.
    Returns the Figure."""
    from matplotlib.collections import LineCollection

    rng = np.random.default_rng(seed)
    i = _pick(start.shape[0], max_points, rng)
    j = _pick(other.shape[0], max_points, rng)
    s, e, o = start[i], end[i], other[j]
    d = start.shape[1]
    fig = _figure(9.0, 4.3)
    ax_flow, ax_match = fig.subplots(1, 2)
    src_color, dst_color = (SOURCE, TARGET) if names[0].startswith("source") else (TARGET, SOURCE)
    dot = {"s": 4, "linewidths": 0, "rasterized": True}

    if d == 1:
        lines = np.stack([np.stack([s[:, 0], np.zeros(len(s))], 1),
                          np.stack([e[:, 0], np.ones(len(e))], 1)], 1)
        k = _pick(len(lines), LINES_DRAWN, rng)
        ax_flow.add_collection(LineCollection(lines[k], colors=LINE, linewidths=0.4, alpha=0.35))
        ax_flow.scatter(s[:, 0], np.zeros(len(s)), c=src_color, alpha=0.5, **dot)
        ax_flow.scatter(e[:, 0], np.ones(len(e)), c=MAPPED, alpha=0.5, **dot)
        lo, hi = _limits(s, e, o)
        ax_flow.set(xlim=(lo[0], hi[0]), ylim=(-0.05, 1.05), xlabel="$x$", ylabel="$t / t_f$",
                    title="Straight characteristics $x(t)$")
        bins = np.linspace(lo[0], hi[0], 60)
        ax_match.hist(o[:, 0], bins=bins, density=True, color=dst_color, alpha=0.45)
        ax_match.hist(e[:, 0], bins=bins, density=True, histtype="step", color=MAPPED, lw=1.4)
        ax_match.set(xlabel="$x$", ylabel="density", title=f"{names[1]} vs {names[2]}")
        _legend_below(fig, [(names[0], src_color, "o"), (names[2], dst_color, "o"),
                            (names[1], MAPPED, "o"), (flow_label, LINE, "-")])
        if title:
            fig.suptitle(title, fontsize=10)
        return fig

    proj = _Projection(np.concatenate([start, other]))
    ps, pe, po = proj(s), proj(e), proj(o)
    lo, hi = _limits(ps, pe, po)
    ax_flow.scatter(*po.T, c=dst_color, alpha=0.22, **dot)
    ax_flow.scatter(*ps.T, c=src_color, alpha=0.35, **dot)
    k = _pick(len(ps), LINES_DRAWN, rng)
    ax_flow.add_collection(LineCollection(np.stack([ps[k], pe[k]], 1), colors=LINE,
                                          linewidths=0.45, alpha=0.45))
    ax_flow.scatter(*pe[k].T, c=MAPPED, s=6, linewidths=0, zorder=3)
    ax_flow.set_title("Straight characteristics" + (" (projection)" if d > 2 else ""))
    ax_match.scatter(*po.T, c=dst_color, alpha=0.35, **dot)
    ax_match.scatter(*pe.T, c=MAPPED, alpha=0.35, **dot)
    ax_match.set_title(f"{names[1]} vs {names[2]}" + (" (projection)" if d > 2 else ""))
    for ax in (ax_flow, ax_match):
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel=proj.labels[0], ylabel=proj.labels[1])
        ax.set_aspect("equal", adjustable="box")
    _legend_below(fig, [(names[0], src_color, "o"), (names[2], dst_color, "o"),
                        (names[1], MAPPED, "o"), (flow_label, LINE, "-")])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _legend_below(fig, entries):
    """One legend under the panels, with opaque markers (the scatter points are translucent)."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="-" if kind == "-" else "", marker=None if kind == "-" else "o",
                      color=color, ms=5, lw=1.2, label=label) for label, color, kind in entries]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), handlelength=1.5,
               columnspacing=1.6)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average what exists)."""
    if len(y) == 0 or window <= 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _log_limits(ax, *curves):
    """y-limits on a log axis from the curves' settled part: the first steps (u starts constant,
    so L_HJ starts near 0) would otherwise stretch the axis over ten decades."""
    values = np.concatenate([c[len(c) // 10:] for c in curves if len(c)])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        ax.set_ylim(values.min() / 3, values.max() * 3)


def training_figure(history: dict, title: str = ""):
    """Three panels against the step: L_HJ (log scale); L_MMD and the held-out energy distance
    (linear: the unbiased L_MMD estimate is noisy and often negative); the learning rate.

    Thin lines are per step, bold lines a trailing moving average over ~1/60 of the run."""
    steps = np.asarray(history.get("step", []), dtype=float)
    fig = _figure(10.5, 3.3)
    ax_hj, ax_mmd, ax_lr = fig.subplots(1, 3)
    window = max(1, len(steps) // 60)
    hj = np.asarray(history.get("hj", []), dtype=float)
    if len(hj):
        smooth = _smooth(hj, window)
        ax_hj.plot(steps, np.where(hj > 0, hj, np.nan), color=SOURCE, lw=0.5, alpha=0.3,
                   label="per step")
        ax_hj.plot(steps, np.where(smooth > 0, smooth, np.nan), color=SOURCE, lw=1.6,
                   label=f"moving average ({window} steps)")
        ax_hj.set_yscale("log")
        _log_limits(ax_hj, smooth)
    ax_hj.set(xlabel="step", title=r"HJ residual $L_{HJ}$")
    mmd = np.asarray(history.get("mmd", []), dtype=float)
    held_steps = np.asarray(history.get("heldout_step", []), dtype=float)
    held = np.asarray(history.get("heldout", []), dtype=float)
    if len(mmd):
        smooth = _smooth(mmd, window)
        ax_mmd.plot(steps, mmd, color=TARGET, lw=0.5, alpha=0.3, label="per step")
        ax_mmd.plot(steps, smooth, color=TARGET, lw=1.6, label=f"moving average ({window} steps)")
        settled = np.concatenate([smooth[len(smooth) // 10:], held])
        top = max(np.quantile(np.abs(mmd[len(mmd) // 10:]), 0.95), settled.max(), 1e-12)
        ax_mmd.set_ylim(min(settled.min(), 0.0) - 0.1 * top, 1.15 * top)
    if len(held):
        ax_mmd.plot(held_steps, held, "o-", color=MAPPED, ms=3.5, lw=1.0,
                    label="held-out energy distance")
    ax_mmd.axhline(0.0, color=LINE, lw=0.6)
    ax_mmd.set(xlabel="step", title=r"marginal term $L_{MMD}$")
    for ax in (ax_hj, ax_mmd):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7)
    lr = np.asarray(history.get("lr", []), dtype=float)
    ax_lr.plot(steps, lr, color=LINE, lw=1.4)
    ax_lr.set(xlabel="step", title="learning rate")
    for ax in (ax_mmd, ax_lr):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (ax_hj, ax_mmd, ax_lr):
        ax.grid(True, which="major", lw=0.4, alpha=0.4)
    if title:
        fig.suptitle(f"Training — {title}", fontsize=10)
    return fig


def displacement_figure(source, pushed, target, pulled, title: str = ""):
    """Histograms of the displacement lengths |T(x) - x| and |T^-1(y) - y|."""
    fwd = np.linalg.norm(pushed - source, axis=1)
    bwd = np.linalg.norm(pulled - target, axis=1)
    fig = _figure(5.2, 3.4)
    ax = fig.subplots()
    hi = np.quantile(np.concatenate([fwd, bwd]), 0.998) if len(fwd) + len(bwd) else 1.0
    bins = np.linspace(0, max(hi, 1e-9) * 1.05, 50)
    ax.hist(fwd, bins=bins, density=True, color=SOURCE, alpha=0.45,
            label=rf"forward $|T(x) - x|$, mean {fwd.mean():.3g}")
    ax.hist(bwd, bins=bins, density=True, histtype="step", lw=1.5, color=TARGET,
            label=rf"backward $|T^{{-1}}(y) - y|$, mean {bwd.mean():.3g}")
    ax.set(xlabel="displacement length", ylabel="density",
           title="Displacement lengths" + (f" — {title}" if title else ""))
    ax.legend(loc="best")
    return fig


def run_plots(folder: str, source, target, pushed, pulled, history: dict, *, max_points=1500,
              title: str = "") -> list[str]:
    """Write the four figures of a run into ``folder``; returns their paths.

    source (N, d), target (M, d) in data units; pushed = T(source), pulled = T^-1(target)."""
    import matplotlib

    arrays = [np.asarray(a, dtype=np.float64) for a in (source, target, pushed, pulled)]
    source, target, pushed, pulled = arrays
    files = []
    with matplotlib.rc_context(_STYLE):
        fig = map_figure(source, pushed, target, names=(r"source $\mu$", r"$T(x)$", r"target $\nu$"),
                         flow_label=r"characteristic $x \to T(x)$",
                         title=f"Forward map $T$ — {title}" if title else "Forward map $T$",
                         max_points=max_points)
        files.append(_save(fig, os.path.join(folder, "forward.png")))
        fig = map_figure(target, pulled, source,
                         names=(r"target $\nu$", r"$T^{-1}(y)$", r"source $\mu$"),
                         flow_label=r"characteristic $y \to T^{-1}(y)$",
                         title=(f"Backward map $T^{{-1}}$ — {title}" if title
                                else "Backward map $T^{-1}$"), max_points=max_points, seed=1)
        files.append(_save(fig, os.path.join(folder, "inverse.png")))
        files.append(_save(training_figure(history, title), os.path.join(folder, "training.png")))
        files.append(_save(displacement_figure(source, pushed, target, pulled, title),
                           os.path.join(folder, "displacement.png")))
    return files
