"""Shared by the sm_90a compile checks: ptxas's verdict on a kernel Triton compiled for Hopper.

Imported by tests/test_sm90_compile*.py, which run as scripts in a subprocess without
TRITON_INTERPRET (their folder is then first on sys.path) and under pytest.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def run_compile_script(script: str) -> dict:
    """Run a compile-check ``script`` with ``--json`` in a subprocess without TRITON_INTERPRET
    (Triton must compile for sm_90a, not interpret); its last stdout line, parsed. The body of
    each check's module-scoped ``sm90_results`` fixture (skipped without triton)."""
    import pytest
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--json"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ptxas_report(compiled) -> dict:
    """Assemble ``compiled``'s ptx with the ptxas inside the triton wheel (``-v
    --gpu-name=sm_90a``): ok/error, registers, spill bytes, stack frame, shared memory, and
    whether the ptx holds tensor-core (wgmma, mma.sync) and non-coherent global loads, and its
    atomic instructions (``atomics``; ``acq_rel``: any with acquire-release semantics)."""
    import triton
    ptx = compiled.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        proc = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(path), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    atomics = sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]+", ptx)))
    return dict(ok=proc.returncode == 0, error=None if proc.returncode == 0 else log[-2000:],
                registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None,
                stack=int(stack.group(1)) if stack else None,
                shared=int(compiled.metadata.shared),
                wgmma="wgmma" in ptx, mma=bool(re.search(r"\bmma\.sync", ptx)),
                nc_loads="ld.global.nc" in ptx, atomics=atomics,
                acq_rel=any("acq_rel" in a for a in atomics))


SM90 = ("cuda", 90, 32)  # GPUTarget of an H100/H200


def jit_specialization(fn, args, kwargs, target=SM90):
    """What ``fn[grid](*args, **kwargs)`` specialises on, from Triton's own binder for
    ``target`` (no GPU needed; CPU tensors stand in for CUDA ones, which align alike): the list
    of (type, value class) per argument, i.e. the JIT's cache key."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*target))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    return backend, bound, spec, options


def compile_launch(fn, args, kwargs, target=SM90):
    """Compile ``fn`` for ``target`` exactly as the launch ``fn[grid](*args, **kwargs)`` would
    (the JIT's signature, specialisation attributes, constexprs and options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, bound, spec, options = jit_specialization(fn, args, kwargs, target)
    kwargs = dict(kwargs, debug=False)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*target),
                          options=options.__dict__)


class RecordLaunches:
    """Within ``with RecordLaunches(module, "kernel_name") as calls:``, launches of that kernel
    are recorded as (jit function, args, kwargs) instead of run (the launchers' real arguments,
    for compile_launch)."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, []

    def __enter__(self):
        self.real = getattr(self.module, self.name)
        calls, real = self.calls, self.real

        class _Recorder:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((real, args, kwargs))

        setattr(self.module, self.name, _Recorder())
        return self.calls

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)
