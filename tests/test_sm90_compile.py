"""Ahead-of-time sm_90a (H100/H200) compile check of every MLP kernel, without a GPU.

The interpreter hides what the GPU compiler enforces (dot dimensions >= 16, power-of-two blocks,
shared memory, register spills), so CI compiles each kernel for Hopper and runs the ptxas inside
the triton wheel (-v --gpu-name=sm_90a) on the ptx. Each configuration is compiled exactly as
its launcher's JIT launch would be: the real launcher runs on CPU stand-in tensors with the
kernel replaced by a recorder (tests/sm90.py: RecordLaunches), and the recorded launch goes
through Triton's own binder for GPUTarget("cuda", 90, 32) (the JIT's specialisation, signature,
constexprs and options). Asserted per configuration: it compiles, 0 spill bytes,
metadata.shared <= 227 KB, the dots became tensor-core instructions (wgmma or mma), and every
atomic is relaxed (no acq_rel). Asserted per kernel: its JIT specialisation is the same for every batch size
(one compile serves all). The compiles run in a subprocess started without TRITON_INTERPRET
(under the interpreter @triton.jit returns an interpreted function).

Configurations (CONFIGS below; 15 compiles in 2 worker processes, a few minutes on 2 cores
from a cold cache): every kernel (potential forward, potential backward with and without pbar,
residual forward and backward) at depth 3, H_PAD 128, d bucket 32, softplus, quadratic,
tf32x3; then the extremes: H_PAD 256 with D_PAD 128 (silu + power, and the tf32 fast mode,
forward and backward), the narrowest class (H_PAD 16 / tiles of 16, D_PAD 16, depth 1, tanh,
power), tanh (the activation with the most temporaries) in both backward kernels, H_PAD 96
(weight-gradient tiles of 64 rows partly masked), depth 2, and the deterministic mode of both
backward kernels.

Run as a script to print the register / spill / shared-memory / atomics table for
benchmarks/RESULTS.md:
    python tests/test_sm90_compile.py
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
from sm90 import ptxas_report, run_compile_script

# 13 compiles for sm_90a take 1-2 minutes on 2 cores (-m "not slow" leaves them out)
pytestmark = pytest.mark.slow

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one Hopper CTA may use

# (kernel, H_PAD, BLOCK_H, D_PAD, N_HIDDEN, activation, cost, precision)
_BASE = dict(h_pad=128, block_h=32, d_pad=32, n_hidden=3, act="softplus", cost="quadratic",
             precision="tf32x3")
_KERNELS = ("potential_fwd", "potential_bwd", "potential_bwd_nopbar", "residual_fwd",
            "residual_bwd")


BACKWARD_TILE = 16  # kernels.mlp_launch.BACKWARD_TILE (checked in _compile_one)


def _configs():
    base = [dict(_BASE, kernel=k) for k in _KERNELS]
    configs = base + [
        dict(_BASE, kernel="residual_fwd", h_pad=256, d_pad=128, act="silu", cost="power"),
        dict(_BASE, kernel="potential_fwd", h_pad=256, d_pad=128, precision="tf32"),
        dict(_BASE, kernel="residual_fwd", h_pad=32, d_pad=16, act="tanh"),
        dict(_BASE, kernel="residual_bwd", h_pad=16, block_h=16, d_pad=16, n_hidden=1,
             act="tanh", cost="power"),
        dict(_BASE, kernel="potential_bwd", h_pad=256, d_pad=64, n_hidden=2, act="silu"),
        dict(_BASE, kernel="residual_bwd", act="tanh", cost="power"),
        dict(_BASE, kernel="potential_bwd", h_pad=96, d_pad=128, act="tanh"),
        dict(_BASE, kernel="residual_bwd", h_pad=256, d_pad=128, act="silu", precision="tf32"),
        # the deterministic mode: per-program gradient copies (kernels.mlp_sweeps.program_grads)
        dict(_BASE, kernel="residual_bwd", deterministic=True),
        dict(_BASE, kernel="potential_bwd", h_pad=256, d_pad=64, act="tanh", deterministic=True),
    ]
    # the backward launchers use BLOCK_H = BLOCK_D = 16 whatever the width class and d bucket
    return [dict(c, block_h=BACKWARD_TILE, block_d=BACKWARD_TILE) if "bwd" in c["kernel"] else
            dict(c, block_d=min(c["d_pad"], 32)) for c in configs]


CONFIGS = _configs()


def record_launch(cfg: dict, n_rows: int = 5, chunk: int = 0):
    """The launch (jit function, args, kwargs) the real launcher makes for ``cfg``, recorded
    instead of run, on CPU stand-in tensors: n_rows rows, chunk ``chunk`` of its launches.
    Widths h_pad (so H_PAD = h_pad) and d = d_pad - 1 (so D_PAD = d_pad)."""
    import torch

    from ncf_fast.costs import Power, Quadratic, kernel_constants
    from ncf_fast.kernels import mlp_launch, mlp_potential, mlp_residual
    from sm90 import RecordLaunches

    mlp_launch._on_interpreter = lambda: True  # let mlp_layout take CPU stand-ins
    mlp_launch.set_dot_precision(cfg["precision"])
    d, widths = cfg["d_pad"] - 1, (cfg["h_pad"],) * cfg["n_hidden"]
    fan = (d + 1,) + widths + (1,)
    params = [p for i, o in zip(fan[:-1], fan[1:]) for p in (torch.zeros(o, i), torch.zeros(o))]
    x, t = torch.zeros(n_rows, d), torch.zeros(n_rows, 1)
    layout = mlp_launch.mlp_layout(params, cfg["act"], x, t)
    packed = mlp_launch.pack_params(params, layout)
    cost = kernel_constants(Quadratic() if cfg["cost"] == "quadratic" else Power(1.5))
    det = cfg.get("deterministic", False)
    kind = cfg["kernel"]
    module = mlp_potential if kind.startswith("potential") else mlp_residual
    name = {"potential_fwd": "_potential_grad_fwd_kernel",
            "potential_bwd": "_potential_grad_bwd_kernel",
            "potential_bwd_nopbar": "_potential_grad_bwd_kernel",
            "residual_fwd": "_residual_fwd_kernel", "residual_bwd": "_residual_bwd_kernel"}[kind]
    with RecordLaunches(module, name) as calls:
        if kind == "potential_fwd":
            mlp_potential.potential_grad_forward(packed, layout, x, t)
        elif kind.startswith("potential_bwd"):
            pbar = torch.zeros(n_rows, d) if kind == "potential_bwd" else None
            mlp_potential.potential_grad_backward(packed, layout, x, t, torch.zeros(n_rows),
                                                  pbar, det)
        elif kind == "residual_fwd":
            mlp_residual.residual_forward(packed, layout, cost, x, t)
        else:
            mlp_residual.residual_backward(packed, layout, cost, x, t, torch.zeros(n_rows), det)
    return calls[chunk]


def _compile_one(cfg: dict) -> dict:
    """Compile one configuration for sm_90a as its launcher's JIT launch would; return its
    resource usage (runs in a worker)."""
    from ncf_fast.kernels import mlp_launch
    from sm90 import compile_launch

    assert mlp_launch.BACKWARD_TILE == BACKWARD_TILE, "update BACKWARD_TILE here"
    fn, args, kwargs = record_launch(cfg)
    assert (kwargs["BLOCK_H"], kwargs["BLOCK_D"]) == (cfg["block_h"], cfg["block_d"]), kwargs
    try:
        compiled = compile_launch(fn, args, kwargs)
    except Exception as exc:  # report, the test asserts
        return dict(cfg, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return dict(cfg, **ptxas_report(compiled))


def compile_all(workers: int = 2) -> list[dict]:
    """Compile every configuration in ``workers`` processes (they must not inherit the
    interpreter: the caller runs this in a subprocess without TRITON_INTERPRET)."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_one, CONFIGS))


def _table(results) -> str:
    lines = ["| kernel | H_PAD/BLOCK_H | D_PAD/BLOCK_D | L | act | cost | precision | regs | spills "
             "(st/ld) | shared KB | tensor cores | atomics |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cost = r["cost"] if r["kernel"].startswith("residual") else "-"
        tc = "wgmma" if r.get("wgmma") else ("mma" if r.get("mma") else "NONE")
        kernel = r["kernel"] + (" (deterministic)" if r.get("deterministic") else "")
        atomics = ", ".join(a.replace("atom.global.gpu.", "") for a in r.get("atomics", [])) or "-"
        lines.append(f"| {kernel} | {r['h_pad']}/{r['block_h']} | {r['d_pad']}/{r['block_d']} | "
                     f"{r['n_hidden']} | {r['act']} | {cost} | {r['precision']} | "
                     f"{r.get('registers')} | {r.get('spill_stores')}/{r.get('spill_loads')} | "
                     f"{r.get('shared', 0) / 1024:.1f} | {tc} | {atomics} |" if r["ok"] else
                     f"| {kernel} | {r['h_pad']}/{r['block_h']} | {r['d_pad']}/{r['block_d']} | "
                     f"{r['n_hidden']} | {r['act']} | {cost} | {r['precision']} | FAILED | | | | |")
    return "\n".join(lines)


def batch_keys() -> dict:
    """Per kernel, the distinct JIT specialisations over batch sizes (N = 1 .. 65,537, every
    chunk of their launches, t contiguous or an expanded scalar): one means one compile serves
    every batch (the batch-dependent integers are do_not_specialize)."""
    from sm90 import jit_specialization
    out = {}
    for kind in _KERNELS:
        keys = set()
        for n in (1, 64, 100, 16_896, 16_960, 65_537):
            fn, args, kwargs = record_launch(dict(_BASE, kernel=kind), n_rows=n, chunk=-1)
            stride_tn = fn.arg_names.index("stride_tn")
            for t_stride in (1, 0):  # a (N, 1) column, an expanded scalar time
                args = args[:stride_tn] + (t_stride,) + args[stride_tn + 1:]
                _, _, spec, _ = jit_specialization(fn, args, dict(kwargs, debug=False))
                keys.add(repr(spec))
        out[kind] = len(keys)
    return out


@pytest.fixture(scope="module")
def sm90_results():
    return run_compile_script(__file__)


_ID = [f"{c['kernel']}-h{c['h_pad']}-d{c['d_pad']}-L{c['n_hidden']}-{c['act']}-{c['cost']}-"
       f"{c['precision']}" + ("-det" if c.get("deterministic") else "") for c in CONFIGS]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: _ID[i])
def test_sm90a_compiles(sm90_results, index):
    r = sm90_results["configs"][index]
    assert r["ok"], r["error"]
    assert r["shared"] <= SHARED_LIMIT, f"{r['shared']} bytes of shared memory > 227 KB"
    assert r["wgmma"] or r["mma"], "no tensor-core instruction (wgmma / mma) in the ptx"
    # the workspace is written and re-read in one kernel: a non-coherent load would be a race
    assert not r["nc_loads"], "ld.global.nc in the ptx"


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: _ID[i])
def test_sm90a_no_spills(sm90_results, index):
    r = sm90_results["configs"][index]
    assert r["ok"], r["error"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"{r['spill_stores']} / {r['spill_loads']} bytes of spill stores / loads"


def test_sm90a_registers_fit_the_launch_plan(sm90_results):
    """The launch plan runs PROGRAMS_PER_SM = 3 programs of 4 warps per SM, which fit at <= 168
    registers; one configuration (tanh + power residual backward) is allowed 2 per SM, no
    more (the launch then still runs, one program in three waiting for a free slot)."""
    from ncf_fast.kernels.mlp_launch import THREE_PER_SM_REGISTERS
    over = [(_ID[i], r["registers"]) for i, r in enumerate(sm90_results["configs"])
            if r["ok"] and r["registers"] > THREE_PER_SM_REGISTERS]
    assert len(over) <= 1 and all(regs <= 176 for _, regs in over), over


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: _ID[i])
def test_sm90a_atomics_are_relaxed(sm90_results, index):
    """Gradient reductions use relaxed atomics (red/atom ...relaxed...): an acq_rel atomic
    fences every add. Backward kernels have atomics, forward kernels none."""
    r = sm90_results["configs"][index]
    assert r["ok"], r["error"]
    assert not r["acq_rel"], f"acq_rel atomics in the ptx: {r['atomics']}"
    if "bwd" in r["kernel"]:
        assert r["atomics"] and all("relaxed" in a for a in r["atomics"]), r["atomics"]
    else:
        assert not r["atomics"], r["atomics"]


@pytest.mark.parametrize("kernel", _KERNELS)
def test_one_compile_serves_every_batch_size(sm90_results, kernel):
    """The JIT's specialisation (Triton's own binder for sm_90a) is the same for every batch
    size, chunk and time-column stride: no recompiles when the batch changes."""
    assert sm90_results["batch_keys"][kernel] == 1


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the compile check needs real @triton.jit functions")
    results = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(dict(configs=results, batch_keys=batch_keys())))
    else:
        print(_table(results))
