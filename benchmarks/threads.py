"""The CPU thread policy under contention: NCF(dim=2).fit on 20,000 points for 150 steps, with
the library's policy ("new") and with a fixed count of all available CPUs, torch's own default
before ncf_fast had a policy ("fixed"), alternating in fresh processes, first on an idle machine
and then beside BUSY single-thread busy loops (README, "CPU threads").

    python benchmarks/threads.py [--rounds 3] [--busy 2] [--steps 150]

Each child imports torch before ncf_fast, as most scripts do, so libgomp's wait policy is
torch's default in both arms and only the thread count differs. Wall times depend on what else
the machine runs: compare the arms within one run, never across runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def child(steps: int):
    import numpy as np
    import torch  # first, as in most scripts: the wait policy is torch's default

    import ncf_fast
    from ncf_fast.problems import GaussianOT

    prob = GaussianOT(2, seed=1)
    x = prob.sample_source(20_000).astype(np.float32)
    y = prob.sample_target(20_000).astype(np.float32)
    start = time.perf_counter()
    ncf_fast.NCF(dim=2, seed=0).fit(x, y, steps=steps, progress=False)
    print(f"{time.perf_counter() - start:.3f} {torch.get_num_threads()}")


def run_arm(arm: str, steps: int) -> float:
    from ncf_fast.threads import THREADS_ENV, available_cpus
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", THREADS_ENV, "OMP_WAIT_POLICY"):
        env.pop(key, None)
    if arm == "fixed":
        env[THREADS_ENV] = str(available_cpus())
    proc = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return float(proc.stdout.split()[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy loops beside the fit")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.steps)
    times = {}
    for phase in ("idle", f"beside {args.busy} busy loops"):
        loops = []
        if phase != "idle":
            loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                     for _ in range(args.busy)]
            time.sleep(1.0)
        try:
            for r in range(args.rounds):
                for arm in ("fixed", "new") if r % 2 == 0 else ("new", "fixed"):
                    seconds = run_arm(arm, args.steps)
                    times.setdefault((phase, arm), []).append(seconds)
                    print(f"{phase:<22} {arm:<6} {seconds:8.2f} s   (load {os.getloadavg()[0]:.1f})",
                          flush=True)
        finally:
            for p in loops:
                p.kill()
                p.wait()
    print("\nmedian seconds (range)")
    for (phase, arm), values in times.items():
        print(f"{phase:<22} {arm:<6} {statistics.median(values):8.2f}  "
              f"({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
