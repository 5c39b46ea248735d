"""gpu_check step 1: compile every kernel configuration the check uses, in parallel processes.

    python benchmarks/gpu_warmup.py [--workers K]      # CUDA: warm Triton's on-disk cache
    python benchmarks/gpu_warmup.py --smoke            # CPU smoke mode (see gpu_check.sh)

On CUDA each job (tests/gpu_cases.py: warmup_jobs) runs a small real call of the public ops
(forward and backward of potential_and_grad and characteristic_residual, or the energy
distance with and without gradients) at 70 rows. No batch-dependent integer is specialised
(tests/test_sm90_compile.py checks it), so those launches compile exactly the kernels the
large batches of the later steps use, into Triton's cache on disk, which the later processes
load from. Real launches rather than compile-only calls: whatever the JIT keys on (pointer
alignment, strides, options) is then the same by construction. One job at a time per process
from a pool of K (default: one per core; a compile is single-threaded), widest networks first,
so the ~4 compiles of a job run in parallel with the other jobs'.

--smoke (TRITON_INTERPRET=1): the same worker code runs a few jobs interpreted, and a
subprocess without the interpreter compiles two configurations ahead of time for sm_90a
(tests/test_sm90_compile.py's recorded launch, and the energy kernel's DIRECT mode), printing
registers and spills: the compile path works on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

ROWS = 70  # a full and a partial 64-row block


def _weight(job) -> int:
    """Rough compile cost of a job: the MLP's hidden units (the energy kernel compiles fast)."""
    return sum(job[2]) if job[0] == "mlp" else 0


def run_job(job) -> tuple:
    """Compile (and run once) every kernel of one configuration; returns (job, seconds)."""
    import torch

    from ncf_fast import costs
    from ncf_fast.energy import energy_distance
    from ncf_fast.kernels import characteristic_residual, potential_and_grad, set_dot_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    if job[0] == "energy":
        d = job[1]
        a = torch.randn(ROWS, d, generator=gen).to(device).requires_grad_()
        b = torch.randn(ROWS + 9, d, generator=gen).to(device).requires_grad_()
        energy_distance(a, b, backend="triton").backward()  # GRAD variant
        with torch.no_grad():  # value-only variant
            energy_distance(a, b, backend="triton")
    else:
        _, d, widths, act, cost, precision, deterministic = job
        set_dot_precision(precision)
        fan = (d + 1,) + tuple(widths) + (1,)
        params = [torch.randn(*shape, generator=gen).mul(0.3).to(device).requires_grad_()
                  for i, o in zip(fan[:-1], fan[1:]) for shape in ((o, i), (o,))]
        x = torch.randn(ROWS, d, generator=gen).to(device)
        t = torch.rand(ROWS, 1, generator=gen).to(device)
        cost = costs.Quadratic() if cost == "quadratic" else costs.Power(1.5)
        u, p = potential_and_grad(params, act, x, t, deterministic=deterministic)
        r = characteristic_residual(params, act, costs.kernel_constants(cost), x, t,
                                    deterministic=deterministic)
        (u.sum() + p.square().sum() + r.square().sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return job, time.perf_counter() - start


_AOT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_sm90_compile as mlp
import test_sm90_compile_energy as energy
from sm90 import compile_launch, ptxas_report
cfg = dict(mlp._BASE, kernel="potential_fwd", h_pad=16, block_h=16, d_pad=16, block_d=16,
           n_hidden=1)
fn, args, kwargs = mlp.record_launch(cfg)
r = ptxas_report(compile_launch(fn, args, kwargs))
print("sm_90a potential_fwd H_PAD 16 D_PAD 16 L1: ok", r["ok"], "registers", r["registers"],
      "spills", r["spill_stores"], r["spill_loads"], "wgmma", r["wgmma"])
r = energy._compile_one(0)
print("sm_90a energy DIRECT value-only: ok", r["ok"], "registers", r.get("registers"),
      "spills", r.get("spill_stores"), r.get("spill_loads"))
sys.exit(0 if r["ok"] else 1)
"""


def aot_subset() -> int:
    """Compile two configurations for sm_90a in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _AOT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    from gpu_cases import warmup_jobs

    # widest and deepest first: the longest compiles start at once, the short ones fill in
    jobs = sorted(warmup_jobs(smoke=args.smoke), key=lambda j: -_weight(j))
    workers = 1 if args.smoke else min(args.workers, len(jobs))
    print(f"warm-up: {len(jobs)} configurations in {workers} processes", flush=True)
    start, failed = time.perf_counter(), 0
    import multiprocessing
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                job, seconds = future.result()
                print(f"  {seconds:6.1f} s  {job}", flush=True)
            except Exception as exc:  # report every failure, fail the step at the end
                failed += 1
                print(f"  FAILED {futures[future]}: {type(exc).__name__}: {exc}", flush=True)
    print(f"warm-up: {len(jobs) - failed}/{len(jobs)} configurations in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    if args.smoke:
        failed += aot_subset() != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
