"""Accuracy on problems with a known OT map: forward and backward L2-UVP (%) and fit time.

    python benchmarks/accuracy.py                      # d = 2, problem seeds 0..4, defaults
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
then L2-UVP on 20,000 fresh samples per side, the energy distances ED(T#mu, nu), ED(T^-1#nu, mu)
on 5000 of them against 5000 others, and the cycle error E|T^-1(T(x)) - x|^2 / Var(mu) (%). Time is the wall time of
``fit`` (held-out checks included), on whatever this machine is doing.
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


def evaluate(dim: int, seed: int, steps: int | None, device: str | None, n_train: int = 50_000,
             n_test: int = 20_000, problem: str = "gaussian", options: dict | None = None,
             model_options: dict | None = None) -> dict:
    prob = PROBLEMS[problem](dim, seed=seed)
    if n_train:
        src, tgt = prob.sample_source(n_train), prob.sample_target(n_train)
    else:
        src, tgt = prob.sample_source, prob.sample_target
    model = NCF(dim, seed=0, device=device, **(model_options or {}))
    start = time.perf_counter()
    model.fit(src, tgt, progress=False, **({"steps": steps} if steps else {}), **(options or {}))
    seconds = time.perf_counter() - start
    x, y = prob.sample_source(n_test), prob.sample_target(n_test)
    pushed, pulled = model.transport(x), model.inverse(y)
    k = min(n_test, 5000)
    return {"problem": problem, "dim": dim, "seed": seed, "steps": model.train_config.steps,
            "batch": model.train_config.batch_size, "seconds": seconds,
            "forward": l2_uvp(pushed, prob.forward_map(x), y),
            "backward": l2_uvp(pulled, prob.inverse_map(y), x),
            "ed_forward": energy_distance(pushed[:k], y[k:2 * k]),
            "ed_backward": energy_distance(pulled[:k], x[k:2 * k]),
            "cycle": cycle_error_relative(model, x[:k]),
            "affine": prob.affine_uvp() if hasattr(prob, "affine_uvp") else (0.0, 0.0)}


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option wants KEY=VALUE, got {text!r}")
    return key, json.loads(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="gaussian")
    parser.add_argument("--dims", type=int, nargs="+", default=[2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=50_000,
                        help="training samples per side; 0: fresh draws every step")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig field for every fit (JSON value), e.g. backward_weight=0")
    parser.add_argument("--model", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an NCF(...) argument for every fit (JSON value), e.g. "
                             'activation=\"silu\" or hidden=[256,256,256]')
    parser.add_argument("--out", default=None, metavar="FILE.jsonl",
                        help="append each row as one JSON line (with the options) to this file")
    args = parser.parse_args(argv)
    options, model_options = dict(args.option), dict(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, problem {args.problem}"
          + (f", options {options}" if options else "")
          + (f", model {model_options}" if model_options else ""))
    print("| d | problem seed | affine UVP % fwd/bwd | steps | fit time (s) | forward UVP % "
          "| backward UVP % | ED fwd / bwd (1e-3) | cycle % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for seed in args.seeds:
            r = evaluate(dim, seed, args.steps, args.device, n_train=args.samples,
                         problem=args.problem, options=options, model_options=model_options)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**r, "options": options, "model": model_options}) + "\n")
            print(f"| {r['dim']} | {r['seed']} | {r['affine'][0]:.2f} / {r['affine'][1]:.2f} "
                  f"| {r['steps']} | {r['seconds']:.0f} | {r['forward']:.3f} | {r['backward']:.3f} "
                  f"| {1e3 * r['ed_forward']:.3f} / {1e3 * r['ed_backward']:.3f} "
                  f"| {r['cycle']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
