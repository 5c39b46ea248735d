"""Ahead-of-time sm_90a (H100/H200) compile check of every MLP kernel, without a GPU.

The interpreter hides what the GPU compiler enforces (dot dimensions >= 16, power-of-two blocks,
shared memory, register spills), so CI compiles each kernel for Hopper with
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) and runs the ptxas inside the
triton wheel (-v --gpu-name=sm_90a) on the ptx. Asserted per configuration: it compiles, 0 spill
bytes (stores and loads), metadata.shared <= 227 KB, and the dots became tensor-core
instructions (wgmma or mma in the ptx). The compiles run in a subprocess started without
TRITON_INTERPRET (under the interpreter @triton.jit returns an interpreted function).

Configurations (CONFIGS below; 13 compiles in 2 worker processes, about 1-2 minutes on 2 cores
from a cold cache): every kernel (potential forward, potential backward with and without pbar,
residual forward and backward) at depth 3, H_PAD 128, d bucket 32, softplus, quadratic,
tf32x3, with the tile widths the launchers pick (BLOCK_H 32 and BLOCK_D min(D_PAD, 32)
forward, 16 and 16 backward: block_constexprs(..., backward=True)); then the extremes: H_PAD 256 with D_PAD 128 (silu +
power, and the tf32 fast mode, forward and backward), the narrowest class (H_PAD 16 / tiles of
16, D_PAD 16, depth 1, tanh, power), tanh (the activation with the most temporaries) in both
backward kernels, H_PAD 96 (weight-gradient tiles of 64 rows partly masked) and depth 2.

Run as a script to print the register / spill / shared-memory table for benchmarks/RESULTS.md:
    python tests/test_sm90_compile.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
from sm90 import ptxas_report

# 13 compiles for sm_90a take 1-2 minutes on 2 cores (-m "not slow" leaves them out)
pytestmark = pytest.mark.slow

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one Hopper CTA may use

# (kernel, H_PAD, BLOCK_H, D_PAD, N_HIDDEN, activation, cost, precision)
_BASE = dict(h_pad=128, block_h=32, d_pad=32, n_hidden=3, act="softplus", cost="quadratic",
             precision="tf32x3")
_KERNELS = ("potential_fwd", "potential_bwd", "potential_bwd_nopbar", "residual_fwd",
            "residual_bwd")


BACKWARD_TILE = 16  # kernels.mlp_sweeps.BACKWARD_TILE (checked in _compile_one)


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
    ]
    # the backward launchers use BLOCK_H = BLOCK_D = 16 whatever the width class and d bucket
    return [dict(c, block_h=BACKWARD_TILE, block_d=BACKWARD_TILE) if "bwd" in c["kernel"] else
            dict(c, block_d=min(c["d_pad"], 32)) for c in configs]


CONFIGS = _configs()


def _compile_one(cfg: dict) -> dict:
    """Compile one configuration for sm_90a; return its resource usage (runs in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ncf_fast.kernels import mlp_potential, mlp_residual, mlp_sweeps
    from ncf_fast.kernels.mlp_sweeps import ACTIVATION_CODES

    assert mlp_sweeps.BACKWARD_TILE == BACKWARD_TILE, "update BACKWARD_TILE here"
    kind = cfg["kernel"]
    fn = {"potential_fwd": mlp_potential._potential_grad_fwd_kernel,
          "potential_bwd": mlp_potential._potential_grad_bwd_kernel,
          "potential_bwd_nopbar": mlp_potential._potential_grad_bwd_kernel,
          "residual_fwd": mlp_residual._residual_fwd_kernel,
          "residual_bwd": mlp_residual._residual_bwd_kernel}[kind]
    constexprs = dict(BLOCK_M=cfg.get("block_m", 64), BLOCK_H=cfg["block_h"],
                      BLOCK_D=cfg["block_d"],
                      H_PAD=cfg["h_pad"], D_PAD=cfg["d_pad"],
                      SLOT_W=max(cfg["h_pad"], cfg["d_pad"]), N_HIDDEN=cfg["n_hidden"],
                      ACT=ACTIVATION_CODES[cfg["act"]], PRECISION=cfg["precision"])
    if kind.startswith("residual"):
        constexprs["COST"] = 0 if cfg["cost"] == "quadratic" else 1
    if kind.startswith("potential_bwd"):
        constexprs["HAS_PBAR"] = kind == "potential_bwd"
    # what the JIT specializes on a real launch: torch's allocations are 16-byte aligned
    # (tt.divisibility 16 on every pointer) and a unit feature stride becomes a constant 1
    for name in ("stride_xd", "stride_pd", "stride_pbd"):
        if name in fn.arg_names:
            constexprs[name] = 1
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "q_star":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.get("num_warps", 4),
                                           "num_stages": cfg.get("num_stages", 1)})
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
             "(st/ld) | shared KB | tensor cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cost = r["cost"] if r["kernel"].startswith("residual") else "-"
        tc = "wgmma" if r.get("wgmma") else ("mma" if r.get("mma") else "NONE")
        lines.append(f"| {r['kernel']} | {r['h_pad']}/{r['block_h']} | {r['d_pad']}/{r['block_d']} | "
                     f"{r['n_hidden']} | {r['act']} | {cost} | {r['precision']} | "
                     f"{r.get('registers')} | {r.get('spill_stores')}/{r.get('spill_loads')} | "
                     f"{r.get('shared', 0) / 1024:.1f} | {tc} |" if r["ok"] else
                     f"| {r['kernel']} | {r['h_pad']}/{r['block_h']} | {r['d_pad']}/{r['block_d']} | "
                     f"{r['n_hidden']} | {r['act']} | {cost} | {r['precision']} | FAILED | | | |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def sm90_results():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: _ID[i])
def test_sm90a_compiles(sm90_results, index):
    r = sm90_results[index]
    assert r["ok"], r["error"]
    assert r["shared"] <= SHARED_LIMIT, f"{r['shared']} bytes of shared memory > 227 KB"
    assert r["wgmma"] or r["mma"], "no tensor-core instruction (wgmma / mma) in the ptx"
    # the workspace is written and re-read in one kernel: a non-coherent load would be a race
    assert not r["nc_loads"], "ld.global.nc in the ptx"


_ID = [f"{c['kernel']}-h{c['h_pad']}-d{c['d_pad']}-L{c['n_hidden']}-{c['act']}-{c['cost']}-"
       f"{c['precision']}" for c in CONFIGS]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=lambda i: _ID[i])
def test_sm90a_no_spills(sm90_results, index):
    r = sm90_results[index]
    assert r["ok"], r["error"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"{r['spill_stores']} / {r['spill_loads']} bytes of spill stores / loads"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the compile check needs real @triton.jit functions")
    results = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        print(_table(results))
