"""ncf_fast's energy distance beside geomloss's ``SamplesLoss("energy")``: time, peak memory,
value and gradient.

    python benchmarks/peers_energy.py --sizes 1000,3000,10000,30000,100000 --dims 2,16 \\
        --out energy.json

Conventions. ``ncf_fast.losses.energy_distance(a, b)`` is the unbiased (U-statistic) squared
energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (within-sample sums over i != j divided by
n(n - 1)). geomloss's "energy" loss with uniform weights is the kernel norm with k(x, y) =
-|x - y|: E|X - Y| - 1/2 E|X - X'| - 1/2 E|Y - Y'| with V-statistics (sums over all i, j divided by
n^2): HALF the usual energy distance, and biased. So the value column compares
``2 * geomloss`` with the V-statistic computed by ncf_fast itself,
``ED_V(a, b) = ED_U(a, b) - ED_U(a, a) / 2 - ED_U(b, b) / 2`` (ED_U(a, a) = -2 S_aa / (n^2 (n - 1)),
the U/V difference), and the gradient column compares their gradients in a and b (max abs
difference relative to the largest gradient entry). geomloss clamps squared distances at 1e-8
(its diagonal adds n * 1e-4 / n^2), far below float32 noise at these sizes.

Each (implementation, N, d) runs in its own process, single-threaded (OMP/MKL threads 1, torch
threads 1), float32, N = M points from N(0, I) and N(1, 2 I): time = median of ``--repeats``
calls of value + backward (after one warm-up call), peak memory = the process's peak resident
memory minus its resident memory before the inputs were made (so imports are not counted).
geomloss's tensorized backend stores N x M matrices: a size whose three matrices would need more
than ``--max_gb`` (default 8) is skipped, as is any size whose previous size's time x the pair
ratio (N^2) would pass ``--max_seconds`` (default 60). The KeOps ("online") backend needs pykeops
and a C++ compiler; it is measured where ``import pykeops`` works, else reported "not installed".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

IMPLS = ("ncf_fast", "geomloss_tensorized", "geomloss_keops")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def measure(impl: str, n: int, dim: int, repeats: int) -> dict:
    """One row: median seconds of value + backward, peak memory above the start, and (N <= the
    reference limit) value and gradient agreement with ncf_fast's V-statistic."""
    import resource

    import torch

    torch.set_num_threads(1)
    if impl == "ncf_fast":
        from ncf_fast.losses import energy_distance as fn
    else:
        from geomloss import SamplesLoss
        loss = SamplesLoss("energy", backend="tensorized" if impl == "geomloss_tensorized" else "online")

        def fn(a, b):
            return loss(a, b)
    base = _rss_mb()
    gen = torch.Generator().manual_seed(n * 100 + dim)
    a = torch.randn(n, dim, generator=gen).requires_grad_(True)
    b = (1.0 + 1.4142 * torch.randn(n, dim, generator=gen)).requires_grad_(True)
    times = []
    for k in range(repeats + 1):
        a.grad = b.grad = None
        start = time.perf_counter()
        value = fn(a, b)
        value.backward()
        if k:  # the first call is a warm-up (KeOps compiles, native loops load)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row = {"impl": impl, "n": n, "d": dim, "seconds": sorted(times)[len(times) // 2],
           "seconds_all": times, "peak_mb": peak - base, "value": float(value)}
    if impl != "ncf_fast":  # agreement with ncf_fast's V-statistic (2 x geomloss's convention)
        from ncf_fast.losses import energy_distance as ed
        ga, gb = a.grad.clone(), b.grad.clone()
        a.grad = b.grad = None
        v_stat = ed(a, b) - 0.5 * ed(a, a) - 0.5 * ed(b, b)
        v_stat.backward()
        row["value_ncf_v"] = float(v_stat)
        row["value_rel_diff"] = abs(2 * row["value"] - float(v_stat)) / abs(float(v_stat))
        scale = max(a.grad.abs().max().item(), b.grad.abs().max().item())
        row["grad_rel_diff"] = max((2 * ga - a.grad).abs().max().item(),
                                   (2 * gb - b.grad).abs().max().item()) / scale
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,3000,10000,30000,100000")
    p.add_argument("--dims", default="2,16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_gb", type=float, default=8.0)
    p.add_argument("--max_seconds", type=float, default=60.0)
    p.add_argument("--out", metavar="FILE.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))), flush=True)
        return
    import importlib.util
    sizes = [int(s) for s in args.sizes.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NCF_FAST_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    print("| impl | d | N = M | value + backward s (median) | peak MB | 2 x geomloss vs ncf_fast "
          "V-stat (rel) | gradient (rel) | note |\n|---|---|---|---|---|---|---|---|", flush=True)
    for dim in (int(s) for s in args.dims.split(",")):
        for impl in args.impls.split(","):
            last = None
            for n in sizes:
                row = {"impl": impl, "n": n, "d": dim}
                if impl == "geomloss_keops" and importlib.util.find_spec("pykeops") is None:
                    row["note"] = "not installed: pykeops"
                elif impl == "geomloss_tensorized" and 3 * 4 * n * n / 1e9 > args.max_gb:
                    row["note"] = f"skipped: three {n} x {n} float32 matrices pass {args.max_gb:g} GB"
                elif last is not None and last["seconds"] * (n / last["n"]) ** 2 > args.max_seconds:
                    row["note"] = f"skipped: estimated over {args.max_seconds:g} s"
                else:
                    spec = json.dumps({"impl": impl, "n": n, "dim": dim, "repeats": args.repeats})
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec],
                                          env=env, capture_output=True, text=True)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                    if proc.returncode or not lines:
                        row["note"] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
                    else:
                        row = json.loads(lines[-1])
                        last = row
                rows.append(row)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
                fmt = lambda k, spec: format(row[k], spec) if k in row else "—"  # noqa: E731
                print(f"| {impl} | {dim} | {n} | {fmt('seconds', '.3g')} | {fmt('peak_mb', '.0f')} "
                      f"| {fmt('value_rel_diff', '.1e')} | {fmt('grad_rel_diff', '.1e')} "
                      f"| {row.get('note', '')} |", flush=True)


if __name__ == "__main__":
    main()
