"""``ncf-fast transport`` and ``ncf-fast evaluate``: apply a trained map to samples, and measure
it (L2-UVP against a known map, energy distances, cycle error) with a table that says what the
numbers mean."""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np

from .errors import CLIError, info
from .inputs import (checkpoint_file, load_data, load_model, named_problem, resolve_device,
                     samples_file)
from .run_folder import check_printable, write_npy

__all__ = ["cmd_transport", "cmd_evaluate", "evaluation_report", "energy_noise"]

METRIC_SAMPLES = 2_000  # rows per side for metrics.json's energy distances (O(n^2)); evaluate: 2x


def cmd_transport(args) -> int:
    device = resolve_device(args.gpu)
    check_printable(args.out, "--out")
    ckpt_path = checkpoint_file(args.checkpoint)
    out = os.path.abspath(args.out)
    if not out.endswith(".npy"):
        raise CLIError(f"--out {args.out}: the output is written with numpy.save; give it a .npy name")
    if not os.path.isdir(os.path.dirname(out)):
        raise CLIError(f"--out {args.out}: folder {os.path.dirname(out)} does not exist")
    if not os.access(os.path.dirname(out), os.W_OK):
        raise CLIError(f"--out {args.out}: folder {os.path.dirname(out)} is not writable")
    if args.inverse and args.t is not None:
        raise CLIError("--t gives a point on the forward characteristics x(t); it cannot be combined "
                       "with --inverse")
    ncf = load_model(ckpt_path, device, getattr(args, "time_axis", None))
    x = samples_file(args.input, "--input")
    if x.shape[1] != ncf.dim:
        raise CLIError(f"{args.input} has dimension {x.shape[1]} but the checkpoint {ckpt_path} was "
                       f"trained in dimension {ncf.dim}")
    if args.t is not None and not 0 <= args.t <= ncf.t_final:
        raise CLIError(f"--t {args.t:g}: must lie in [0, t_final = {ncf.t_final:g}]")
    if args.inverse:
        y, what = ncf.inverse(x), "T^-1(x)"
    elif args.t is not None:
        y, what = ncf.interpolate(x, args.t), f"x(t={args.t:g})"
    else:
        y, what = ncf.transport(x), "T(x)"
    write_npy(out, y)
    info(args, f"wrote {what} for {x.shape[0]} rows of dimension {x.shape[1]} to {out}")
    print(out, flush=True)
    return 0


def cmd_evaluate(args) -> int:
    from .. import metrics as m
    device = resolve_device(args.gpu)
    ckpt_path = checkpoint_file(args.checkpoint)
    if args.problem is None and (args.input is None or args.output is None):
        raise CLIError("evaluate needs --problem (gaussian:d=D[:seed=S], convex:d=D[:seed=S], a .npz, "
                       "toy:SRC:TGT) or "
                       "--input and --output sample files")
    problem = named_problem(args.problem) if args.problem is not None else None
    ncf = load_model(ckpt_path, device, getattr(args, "time_axis", None))
    if problem is not None:
        if problem.dim != ncf.dim:
            raise CLIError(f"--problem {args.problem} has dimension {problem.dim} but the checkpoint "
                           f"{ckpt_path} was trained in dimension {ncf.dim}")
        x, y = problem.sample(args.samples, 1_000_003)  # fresh draws, not the demo's training data
        source_name = problem.spec
    else:
        data = load_data({"input": args.input, "output": args.output})
        x, y = data["input"], data["output"]
        if x.shape[1] != ncf.dim:
            raise CLIError(f"{args.input} has dimension {x.shape[1]} but the checkpoint {ckpt_path} "
                           f"was trained in dimension {ncf.dim}")
        source_name = f"{args.input} -> {args.output}"
    pushed, pulled = ncf.transport(x), ncf.inverse(y)
    rng = np.random.default_rng(0)
    rows_x, rows_y = _rows(rng, x, METRIC_SAMPLES * 2), _rows(rng, y, METRIC_SAMPLES * 2)
    oracle = problem.oracle if problem is not None else None
    if oracle is not None and ncf.cost.spec != "quadratic":
        raise CLIError(f"{ckpt_path}: the Gaussian closed form is the OT map of the quadratic cost; "
                       f"this model uses cost {ncf.cost.spec!r}")
    out = {"checkpoint": os.path.abspath(ckpt_path), "problem": source_name,
           "samples": int(x.shape[0]),
           **m.transport_metrics(ncf, x, y, pushed, pulled, rows_x, rows_y, oracle=oracle)}
    xs, ys = x[rows_x], y[rows_y]
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.quiet:
        width = max(len(k) for k in out)
        for k, v in out.items():
            unit = " %" if k.startswith("l2_uvp") or k == "cycle_error_relative" else ""
            print(f"{k:<{width}}  {v:.4g}{unit}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    else:
        print(evaluation_report(out, xs, ys, ncf.dim, problem.title if problem else source_name))
    return 0


# L2-UVP (%) of the paper's NCF (forward map; docs/method.md, section 9), per dimension
PAPER_L2_UVP = {2: 0.010, 4: 0.021, 8: 0.086, 16: 0.15, 32: 0.44, 64: 0.86}
# the cycle error relative to the source's spread (a rule of thumb, not a published threshold):
# an L2-UVP of 0.1 % is an RMS error of sqrt(0.001) ~ 3 % of the spread, and both maps' errors add
# up in the cycle (README's metrics.json table has what the default demos read)
CYCLE_GOOD, CYCLE_BAD = 0.05, 0.20


def _rows(rng, arr, n):
    """All row indices of arr, or n of them drawn without replacement."""
    return np.arange(arr.shape[0]) if arr.shape[0] <= n else rng.choice(arr.shape[0], n, replace=False)


def energy_noise(ys: np.ndarray, splits: int = 4) -> float:
    """How far from 0 the energy distance between two samples of ONE distribution typically
    lands at the size of ``ys``: the RMS over random halvings of ys, halved (under equal
    distributions the unbiased estimate shrinks like 1/n). Data units."""
    from .. import metrics as m
    rng = np.random.default_rng(1)
    values = []
    for _ in range(splits):
        idx = rng.permutation(ys.shape[0])
        half = ys.shape[0] // 2
        values.append(m.energy_distance(ys[idx[:half]], ys[idx[half:2 * half]]))
    return float(np.sqrt(np.mean(np.square(values))) / 2)


def evaluation_report(out: dict, xs: np.ndarray, ys: np.ndarray, dim: int, name: str) -> str:
    """``ncf-fast evaluate``'s table: each number with its unit, its scale and, where a threshold
    is known, a verdict in words, then what the numbers mean. out: the metrics; xs, ys: the
    source and target rows the energy distances and the cycle error were measured on."""
    spread = float(np.sqrt(xs.var(axis=0, ddof=1).sum()))  # RMS distance to the mean, sqrt(Var)
    noise = energy_noise(ys)
    initial = out["energy_distance_initial"]
    paper = PAPER_L2_UVP.get(dim)
    rows = [("quantity", "value", "scale", "verdict")]
    for key, what in (("l2_uvp_forward", "forward"), ("l2_uvp_backward", "backward")):
        if key in out:
            v = out[key]
            scale = f"paper's NCF at d = {dim}: {paper:g} %" if paper else "% of Var(target)"
            verdict = ("good (< 0.1 %)" if v < 0.1 else "fair (0.1-1 %)" if v < 1
                       else "poor (> 1 %): train longer")
            if paper and v > 2 * paper:
                verdict += f", {v / paper:.0f}x the paper"
            rows.append((f"L2-UVP {what}", f"{v:.3g} %", scale, verdict))
    for key, label in (("energy_distance_forward", "energy distance T#mu vs nu"),
                       ("energy_distance_backward", "energy distance T^-1#nu vs mu")):
        v = out[key]
        rel = f"{100 * v / initial:.3g} % of before" if initial > 0 else "-"
        verdict = ("at the noise level: matches" if abs(v) <= 3 * noise
                   else f"{v / noise:.0f}x the noise: differs")
        rows.append((label, f"{v:.3g}", f"{rel}; noise ~{noise:.1g}", verdict))
    rows.append(("energy distance source vs target", f"{initial:.3g}", "before transport", ""))
    cyc = out["cycle_error"] / spread if spread > 0 else float("nan")
    verdict = (f"maps agree (< {100 * CYCLE_GOOD:.0f} %)" if cyc < CYCLE_GOOD else
               "maps disagree" if cyc < CYCLE_BAD else
               f"maps do not agree (> {100 * CYCLE_BAD:.0f} %): backward map not usable yet")
    rows.append(("cycle error |T^-1(T(x)) - x|", f"{out['cycle_error']:.3g}",
                 f"{100 * cyc:.2g} % of the spread {spread:.3g}", verdict))
    if "cycle_error_relative" in out:
        rows.append(("cycle error, squared", f"{out['cycle_error_relative']:.3g} %",
                     "E|T^-1(T(x)) - x|^2 / Var(source): the L2-UVP scale", ""))
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = [f"{name}, {out['samples']} samples per side", f"checkpoint {out['checkpoint']}", ""]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    notes = [
        "L2-UVP: 100 E|T(x) - T*(x)|^2 / Var(target), the map's mean squared error against the "
        "exact map as a percentage of the target's variance (backward: roles swapped); the "
        "paper's table is in docs/method.md.",
        f"Energy distances: data units, on {xs.shape[0]} rows per side. The estimate is unbiased, "
        "so near a perfect match it scatters around 0 and can be negative; 'noise' is its typical "
        "size between two samples of the same distribution at this sample size.",
        "Cycle error: how far T^-1(T(x)) lands from x (data units), relative to the source's spread "
        "sqrt(Var(source)); it checks that the two maps agree, not that they are right (identity "
        f"maps score 0). < {100 * CYCLE_GOOD:.0f} % and > {100 * CYCLE_BAD:.0f} % are rules of "
        "thumb from ncf_fast's runs, not published thresholds."]
    if "l2_uvp_forward" not in out:
        notes.pop(0)
    lines.append("")
    for note in notes:
        lines.extend(textwrap.wrap(note, 100, subsequent_indent="  "))
    return "\n".join(lines)
