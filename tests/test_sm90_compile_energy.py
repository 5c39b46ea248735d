"""Ahead-of-time sm_90a (H100/H200) compile check of the energy-distance kernel, without a GPU.

Same approach as tests/test_sm90_compile.py (the MLP kernels): compile with
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) in a subprocess started without
TRITON_INTERPRET, run the ptxas inside the triton wheel (-v --gpu-name=sm_90a) on the ptx, and
assert per configuration: it compiles, 0 spill bytes, metadata.shared <= 227 KB, the Gram
mode's tl.dot became tensor-core instructions (wgmma or mma) -- the DIRECT mode (d <= 4) has no
dot and must have none -- and no atomic has acquire-release semantics; and that every d of a
bucket, plain and segmented, shares one JIT specialisation (Triton's own binder).
Configurations: every (d bucket, GRAD) pair the launcher can pick
(kernels.energy_distance.all_configs(): DIRECT, GRAM with BLOCK_D 16, 32, 64; value-only
and with gradient), with the launcher's own block sizes, warps and stages. The segmented and
plain launches are the same kernel (the block table is a runtime argument).

Run as a script to print the table for benchmarks/RESULTS.md:
    python tests/test_sm90_compile_energy.py
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
from sm90 import ptxas_report, run_compile_script

# every configuration compiled for sm_90a: tens of seconds (-m "not slow" leaves them out)
pytestmark = pytest.mark.slow

SHARED_LIMIT = 227 * 1024  # bytes of shared memory one Hopper CTA may use
N_CONFIGS = 8  # len(all_configs()): 4 d buckets x GRAD; checked against the module in the test


def _compile_one(index: int) -> dict:
    """Compile configuration ``index`` of all_configs() for sm_90a; return its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ncf_fast.kernels import energy_distance as ed

    d, grad, cfg = ed.all_configs()[index]
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    # the launcher passes contiguous inputs, so Triton specialises the unit column strides
    constexprs = dict(cfg, GRAD=grad, stride_ad=1, stride_bd=1, stride_gd=1)
    fn = ed._pair_sums_kernel
    tables = {"blk_seg_ptr", "blk_row_ptr", "row_hi_ptr", "col_lo_ptr", "col_hi_ptr"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in tables:
            signature[name] = "*i32"
        elif name == "s_ptr" or (name == "g_ptr" and not grad):  # S is float64; g_ptr = S
            signature[name] = "*fp64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name == "near":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    row = dict(d=d, grad=grad, mode="GRAM" if cfg["GRAM"] else "DIRECT", block_n=cfg["BLOCK_N"],
               block_m=cfg["BLOCK_M"], block_d=cfg["BLOCK_D"], num_warps=num_warps,
               num_stages=num_stages)
    try:
        # the launcher allocates every array but a and b itself, so Triton sees them 16-byte
        # aligned at launch (tt.divisibility 16); a and b may be user views: no alignment claimed
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name.endswith("_ptr") and name not in ("a_ptr", "b_ptr")}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                            attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # report; the test asserts
        return dict(row, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return dict(row, **ptxas_report(compiled))


def compile_all(workers: int = 2) -> list[dict]:
    """Compile every configuration in ``workers`` processes (run without TRITON_INTERPRET)."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_one, range(N_CONFIGS)))


def _table(results) -> str:
    lines = ["| mode | d bucket | BLOCK_N x BLOCK_M x BLOCK_D | warps/stages | GRAD | regs | "
             "spills (st/ld) | shared KB | tensor cores |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = (f"| {r['mode']} | {r['d']} | {r['block_n']} x {r['block_m']} x {r['block_d']} | "
                f"{r['num_warps']}/{r['num_stages']} | {r['grad']} | ")
        if not r["ok"]:
            lines.append(head + "FAILED | | | |")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "none")
        lines.append(head + f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared'] / 1024:.1f} | {tc} |")
    return "\n".join(lines)


def specialisation_counts() -> dict:
    """Per (d bucket, GRAD): the distinct JIT specialisations (Triton's own binder for sm_90a)
    over every d of the bucket, N and M from 1 to 1000, plain and segmented launches."""
    import torch

    from ncf_fast.kernels import energy_distance as ed
    from sm90 import RecordLaunches, jit_specialization

    keys: dict = {}
    for d in range(1, ed.MAX_D + 1):
        cfg = ed.config_for(d)
        for n, m in ((1, 5), (130, 1000)):
            a, b = torch.zeros(n, d), torch.zeros(m, d)
            lo, hi = torch.tensor([0, n // 2]), torch.tensor([n // 2, n])
            lo_b, hi_b = torch.tensor([0, m // 2]), torch.tensor([m // 2, m])
            with RecordLaunches(ed, "_pair_sums_kernel") as calls:
                for grad in (False, True):
                    ed.pair_sums(a, b, grad=grad)
                    ed.segment_pair_sums(a, b, lo, hi, lo_b, hi_b, grad=grad)
            for fn, args, kwargs in calls:
                spec = jit_specialization(fn, args, dict(kwargs, debug=False))[2]
                bucket = f"{cfg['BLOCK_D']}-{cfg['GRAM']}-{kwargs['GRAD']}"
                keys.setdefault(bucket, set()).add(repr(spec))
    return {bucket: len(v) for bucket, v in keys.items()}


@pytest.fixture(scope="module")
def sm90_results():
    return run_compile_script(__file__)


def test_config_list_is_complete():
    from ncf_fast.kernels import energy_distance as ed
    assert len(ed.all_configs()) == N_CONFIGS
    # every d the launcher accepts maps onto one of the checked configurations
    checked = {tuple(sorted(c.items())) for _, _, c in ed.all_configs()}
    for d in range(1, ed.MAX_D + 1):
        assert tuple(sorted(ed.config_for(d).items())) in checked, d


@pytest.mark.parametrize("index", range(N_CONFIGS))
def test_sm90a_compiles_without_spills(sm90_results, index):
    r = sm90_results["configs"][index]
    assert r["ok"], r["error"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"{r['spill_stores']} / {r['spill_loads']} bytes of spill stores / loads: {r}"
    assert r["shared"] <= SHARED_LIMIT, f"{r['shared']} bytes of shared memory > 227 KB"
    if r["mode"] == "GRAM":
        assert r["wgmma"] or r["mma"], "no tensor-core instruction (wgmma / mma) in the ptx"
    else:
        assert not (r["wgmma"] or r["mma"]), "DIRECT mode should have no dot"
    # the gradient's atomic adds (GRAM mode, own rows only) need no acquire/release fence
    assert not r["acq_rel"], f"acq_rel atomics in the ptx: {r['atomics']}"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the compile check needs real @triton.jit "
                 "functions")
    results = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(dict(configs=results, specialisations=specialisation_counts())))
    else:
        print(_table(results))


def test_one_compile_per_configuration(sm90_results):
    """Every d of a bucket, every N and M, plain and segmented launches share one JIT
    specialisation per (bucket, GRAD): the 8 configurations above are all that ever compile."""
    counts = sm90_results["specialisations"]
    assert len(counts) == N_CONFIGS and set(counts.values()) == {1}, counts
