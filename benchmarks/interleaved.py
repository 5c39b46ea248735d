"""hj_residual forward + backward on CPU, the backends timed in alternation (robust to drift).

pytest-benchmark times one backend after another, so a shared machine whose speed drifts over a
minute moves the ratio; here each round runs reference, torch and torch-ops (the torch backend
with its compiled elementwise loops off) back to back, and medians are taken over the rounds.
--floor adds a row with the compiled loops replaced by stubs that do no work: the GEMMs and the
rest, i.e. the fastest the torch backend could get by tuning those loops.

    python benchmarks/interleaved.py [--rounds 40] [--act softplus] [--floor]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ncf_fast import PotentialMLP, costs, native
from ncf_fast.losses import hj_residual


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--act", default="softplus")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    d, w, n = args.dim, args.width, args.batch
    x, t, cost = torch.randn(n, d), torch.rand(n, 1), costs.Quadratic()
    ref = PotentialMLP(d, (w,) * 3, args.act, backend="reference")
    fused = PotentialMLP(d, (w,) * 3, args.act, backend="torch")
    fused.load_state_dict(ref.state_dict())
    real = {k: getattr(native, k) for k in ("mlp_usable", "act_forward", "delta_curv", "tangent",
                                            "abar")}
    junk = torch.rand(n, w) * 0.1
    stubs = dict(real, act_forward=lambda act, a, b: (junk, a, None),
                 delta_curv=lambda act, g, d1, aux, c: (junk, junk if c else None),
                 tangent=lambda *args: junk, abar=lambda bend, zbar, d1, bias_grad: zbar)
    no_loops = dict(real, mlp_usable=lambda x, act=None: False)

    def step(model, funcs):
        for k, f in funcs.items():
            setattr(native, k, f)
        model.zero_grad(set_to_none=True)
        r = hj_residual(model, x, t, cost)
        (r * r).mean().backward()

    cases = {"reference": (ref, real), "torch": (fused, real), "torch-ops": (fused, no_loops)}
    if args.floor:
        cases["torch, loops stubbed"] = (fused, stubs)
    try:
        for model, funcs in cases.values():
            for _ in range(3):
                step(model, funcs)
        times = {k: [] for k in cases}
        for _ in range(args.rounds):
            for k, (model, funcs) in cases.items():
                start = time.perf_counter()
                step(model, funcs)
                times[k].append(time.perf_counter() - start)
    finally:
        for k, f in real.items():
            setattr(native, k, f)
    ref_median = statistics.median(times["reference"])
    print(f"d = {d}, 3 x {w} {args.act}, N = {n}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    print("| backend | median (ms) | min (ms) | reference / backend |\n|---|---|---|---|")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"| {k} | {1e3 * med:.1f} | {1e3 * min(ts):.1f} | {ref_median / med:.2f}x |")


if __name__ == "__main__":
    main()
