"""Accuracy on Gaussian pairs with a known OT map: forward and backward L2-UVP (%) and fit time.

    python benchmarks/accuracy.py                      # d = 2, problem seeds 0..4, defaults
    python benchmarks/accuracy.py --dims 2 4 8 16 --seeds 0 --steps 5000
    python benchmarks/accuracy.py --dims 8 --steps 5000 --device cuda
    python benchmarks/accuracy.py --samples 0          # fresh draws every step (no finite sample)

Each row: GaussianOT(d, seed=S) (docs/method.md's pairs: zero means, log-eigenvalues uniform in
[-ln 2, ln 2]), 50,000 training samples per side (``--samples``; 0 passes the problem's
samplers, so every step draws fresh points), ``NCF(d, seed=0).fit(src, tgt, steps=...)``
with every other setting at its default, then L2-UVP on 20,000 fresh samples per side. Time is
the wall time of ``fit`` (held-out checks included), on whatever this machine is doing.
"""
from __future__ import annotations

import argparse
import time

import torch

from ncf_fast import NCF
from ncf_fast.metrics import l2_uvp
from ncf_fast.problems import GaussianOT


def evaluate(dim: int, seed: int, steps: int | None, device: str | None, n_train: int = 50_000,
             n_test: int = 20_000) -> dict:
    prob = GaussianOT(dim, seed=seed)
    if n_train:
        src, tgt = prob.sample_source(n_train), prob.sample_target(n_train)
    else:
        src, tgt = prob.sample_source, prob.sample_target
    model = NCF(dim, seed=0, device=device)
    start = time.perf_counter()
    model.fit(src, tgt, progress=False, **({"steps": steps} if steps else {}))
    seconds = time.perf_counter() - start
    x, y = prob.sample_source(n_test), prob.sample_target(n_test)
    return {"dim": dim, "seed": seed, "steps": model.train_config.steps,
            "batch": model.train_config.batch_size, "seconds": seconds,
            "forward": l2_uvp(model.transport(x), prob.forward_map(x), y),
            "backward": l2_uvp(model.inverse(y), prob.inverse_map(y), x)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=50_000,
                        help="training samples per side; 0: fresh draws every step")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| d | problem seed | steps | batch | fit time (s) | forward UVP % | backward UVP % |")
    print("|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for seed in args.seeds:
            r = evaluate(dim, seed, args.steps, args.device, n_train=args.samples)
            print(f"| {r['dim']} | {r['seed']} | {r['steps']} | {r['batch']} | {r['seconds']:.0f} "
                  f"| {r['forward']:.3f} | {r['backward']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
