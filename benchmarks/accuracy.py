"""Accuracy on problems with a known OT map: forward and backward L2-UVP (%) and fit time.

    python benchmarks/accuracy.py                      # d = 2, problem seeds 0..4, defaults
    python benchmarks/accuracy.py --dims 2 4 8 16 32 64  # each d's seed list (SEEDS), defaults
    python benchmarks/accuracy.py --dims 32 --budget 1200 --plot convergence.png
    python benchmarks/accuracy.py --problem convex --dims 2 8 16 --seeds 0 1 2
    python benchmarks/accuracy.py --problem convex --option backward_weight=0
    python benchmarks/accuracy.py --dims 8 --model activation='"silu"' --out runs.jsonl
    python benchmarks/accuracy.py --dims 2 4 8 16 --seeds 0 --steps 5000
    python benchmarks/accuracy.py --dims 8 --steps 5000 --device cuda
    python benchmarks/accuracy.py --samples 0          # fresh draws every step (no finite sample)

Each row: GaussianOT(d, seed=S) (docs/method.md's pairs: zero means, log-eigenvalues uniform in
[-ln 2, ln 2]) or, with ``--problem convex``, ConvexOT(d, seed=S) (a Gaussian-mixture source, a
non-linear Brenier map and a mean shift of 3 source spreads; "affine" is the L2-UVP of the best
affine map, how non-linear the instance is), 50,000 training samples per side (``--samples``; 0 passes the problem's
samplers, so every step draws fresh points), ``NCF(d, seed=0).fit(src, tgt, steps=...)``
with every other setting at its default (``--option KEY=VALUE`` overrides a TrainConfig field),
then L2-UVP on 20,000 fresh samples per side, the energy distances ED(T#mu, nu),
ED(T^-1#nu, mu) on 5000 of them against 5000 others, and the cycle error
E|T^-1(T(x)) - x|^2 / Var(mu) (%). "moments map" is the linear OT map between the training
arrays' sample means and covariances (``GaussianOT.from_samples``, POT's LinearTransport): on
the Gaussian pairs, whose OT map is linear, the floor a fixed 50,000-sample set sets. Time is the wall time of
``fit`` (held-out checks included), on whatever this machine is doing.

``--budget SECONDS`` trains for a wall-clock budget instead of a step count: ``time_limit`` set
to the budget and no step limit (BUDGET_STEPS), so the cosine decay runs on the clock and ends
with the budget (the row's steps are those taken). ``--plot FILE.png``
records forward/backward L2-UVP on 5000 fresh samples at every held-out check (their cost is
left out of the time axis) and draws L2-UVP against training time, one line pair per run. After
the rows, the mean per d beside the paper's forward L2-UVP (PAPER: its NCF and larger-network
rows, and the best method per column).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ncf_fast import NCF
from ncf_fast.metrics import cycle_error_relative, energy_distance, l2_uvp
from ncf_fast.problems import ConvexOT, GaussianOT

PROBLEMS = {"gaussian": GaussianOT, "convex": ConvexOT}
# The problem seeds each d runs when --seeds is not given (every pair reported, none dropped).
SEEDS = {2: [0, 1, 2, 3, 4], 4: [0, 1, 2], 8: [0, 1, 2], 16: [0, 1, 2], 32: [0, 1, 2],
         64: [0, 1, 2]}
# Park et al. (ICLR 2026), the Gaussian table, forward L2-UVP %: NCF, NCF with larger networks
# ("NCF-Adaptive"), and the best number in each column (any method).
PAPER = {2: (0.010, 0.010, 0.010), 4: (0.021, 0.022, 0.021), 8: (0.086, 0.090, 0.012),
         16: (0.15, 0.16, 0.15), 32: (0.44, 0.31, 0.31), 64: (0.86, 0.41, 0.41)}
# --budget's step count: more than any budget reaches, so the time limit ends the fit
BUDGET_STEPS = 10**8


def evaluate(dim: int, seed: int, steps: int | None, device: str | None, n_train: int = 50_000,
             n_test: int = 20_000, problem: str = "gaussian", options: dict | None = None,
             model_options: dict | None = None, budget: float | None = None,
             trace: bool = False) -> dict:
    """One fit of NCF(dim, seed=0) on problem ``problem``'s instance ``seed`` and its errors
    (``budget``: train for that many seconds, see the module docstring; ``trace``: record the
    L2-UVP curve at every held-out check under "curve" as (seconds, step, forward, backward))."""
    prob = PROBLEMS[problem](dim, seed=seed)
    if n_train:
        src, tgt = prob.sample_source(n_train), prob.sample_target(n_train)
    else:
        src, tgt = prob.sample_source, prob.sample_target
    options = dict(options or {})
    if steps:
        options["steps"] = steps
    if budget:
        options.update(steps=BUDGET_STEPS, time_limit=float(budget))
    model = NCF(dim, seed=0, device=device, **(model_options or {}))
    curve, callback = [], None
    if trace:
        xc, yc = prob.sample_source(5000), prob.sample_target(5000)
        fc, bc = prob.forward_map(xc), prob.inverse_map(yc)
        spent = [0.0]  # seconds spent in these checks, left out of the curve's time axis

        def callback(step, logs):
            if "heldout" in logs:
                t0 = time.perf_counter()
                curve.append((t0 - start - spent[0], step, l2_uvp(model.transport(xc), fc, yc),
                              l2_uvp(model.inverse(yc), bc, xc)))
                spent[0] += time.perf_counter() - t0
            return False
    start = time.perf_counter()
    model.fit(src, tgt, progress=False, callback=callback, **options)
    seconds = time.perf_counter() - start - (spent[0] if trace else 0.0)
    x, y = prob.sample_source(n_test), prob.sample_target(n_test)
    pushed, pulled = model.transport(x), model.inverse(y)
    k = min(n_test // 2, 5000)
    moments = None
    if n_train:  # the finite training set's own floor: the linear OT map from its sample moments
        lin = GaussianOT.from_samples(src, tgt)
        moments = (l2_uvp(lin.forward_map(x), prob.forward_map(x), y),
                   l2_uvp(lin.inverse_map(y), prob.inverse_map(y), x))
    return {"problem": problem, "dim": dim, "seed": seed, "steps": model.trainer.step_count,
            "batch": model.train_config.batch_size, "seconds": seconds,
            "forward": l2_uvp(pushed, prob.forward_map(x), y),
            "backward": l2_uvp(pulled, prob.inverse_map(y), x),
            "ed_forward": energy_distance(pushed[:k], y[k:2 * k]),
            "ed_backward": energy_distance(pulled[:k], x[k:2 * k]),
            "cycle": cycle_error_relative(model, x[:k]), "curve": curve,
            "stopped_early": "stopped_early" in model.history, "moments": moments,
            "affine": prob.affine_uvp() if hasattr(prob, "affine_uvp") else (0.0, 0.0)}


def _pair(values) -> str:
    """'forward / backward' to three decimals, or — where there is none."""
    return "—" if not values else "{:.3f} / {:.3f}".format(*values)


def paper_rows(rows: list) -> list[str]:
    """Markdown rows: our mean forward/backward L2-UVP per d beside the paper's numbers."""
    out = ["| d | runs | ours forward (mean) | ours backward (mean) | moments map fwd / bwd (mean) "
           "| paper NCF | paper larger network | paper best (any method) |",
           "|---|---|---|---|---|---|---|---|"]
    for dim in sorted({r["dim"] for r in rows}):
        mine = [r for r in rows if r["dim"] == dim]
        paper = PAPER.get(dim)
        cells = [f"{v:g}" for v in paper] if paper else ["—"] * 3
        floors = [r["moments"] for r in mine if r.get("moments")]
        floor = _pair([sum(f[i] for f in floors) / len(floors) for i in (0, 1)] if floors else None)
        out.append(f"| {dim} | {len(mine)} | {sum(r['forward'] for r in mine) / len(mine):.3f} "
                   f"| {sum(r['backward'] for r in mine) / len(mine):.3f} | {floor} | "
                   + " | ".join(cells) + " |")
    return out


def plot_curves(rows: list, path: str) -> None:
    """L2-UVP against training time, forward solid and backward dashed, one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(rows):
        if not r["curve"]:
            continue
        t, _, fwd, bwd = zip(*r["curve"])
        color = f"C{i % 10}"
        ax.plot(t, fwd, "-", color=color, label=f"d = {r['dim']}, seed {r['seed']}: forward")
        ax.plot(t, bwd, "--", color=color, label=f"d = {r['dim']}, seed {r['seed']}: backward")
    ax.set_xlabel("training time (s, held-out checks excluded)")
    ax.set_ylabel("L2-UVP (%)")
    ax.set_yscale("log")
    ax.set_title(f"NCF on {rows[0]['problem']} pairs, 5000 fresh samples per check")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option wants KEY=VALUE, got {text!r}")
    return key, json.loads(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="gaussian")
    parser.add_argument("--dims", type=int, nargs="+", default=[2])
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="problem seeds for every d (default: SEEDS[d], or 0 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="train each fit for this wall-clock time instead of a step count")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="L2-UVP against training time at every held-out check")
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=50_000,
                        help="training samples per side; 0: fresh draws every step")
    parser.add_argument("--test_samples", type=int, default=20_000,
                        help="fresh samples per side for the errors")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig field for every fit (JSON value), e.g. backward_weight=0")
    parser.add_argument("--model", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an NCF(...) argument for every fit (JSON value), e.g. "
                             'activation=\"silu\" or hidden=[256,256,256]')
    parser.add_argument("--out", default=None, metavar="FILE.jsonl",
                        help="append each row as one JSON line (with the options) to this file")
    args = parser.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        parser.error("--budget must be a positive number of seconds")
    if args.budget and args.steps:
        parser.error("give --budget or --steps, not both")
    options, model_options = dict(args.option), dict(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, problem {args.problem}"
          + (f", options {options}" if options else "")
          + (f", model {model_options}" if model_options else ""))
    print("| d | problem seed | affine UVP % fwd/bwd | moments map UVP % fwd/bwd | steps "
          "| fit time (s) | forward UVP % | backward UVP % | ED fwd / bwd (1e-3) | cycle % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dim in args.dims:
        for seed in args.seeds or SEEDS.get(dim, [0, 1, 2]):
            r = evaluate(dim, seed, args.steps, args.device, n_train=args.samples,
                         n_test=args.test_samples,
                         problem=args.problem, options=options, model_options=model_options,
                         budget=args.budget, trace=bool(args.plot))
            rows.append(r)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**r, "options": options, "model": model_options}) + "\n")
            print(f"| {r['dim']} | {r['seed']} | {r['affine'][0]:.2f} / {r['affine'][1]:.2f} "
                  f"| {_pair(r['moments'])} | {r['steps']} | {r['seconds']:.0f} | {r['forward']:.3f} | {r['backward']:.3f} "
                  f"| {1e3 * r['ed_forward']:.3f} / {1e3 * r['ed_backward']:.3f} "
                  f"| {r['cycle']:.3f} |" + (" (cut at the budget)" if r["stopped_early"] else ""),
                  flush=True)
    print()
    print("\n".join(paper_rows(rows)))
    if args.plot:
        plot_curves(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
