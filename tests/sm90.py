"""Shared by the sm_90a compile checks: ptxas's verdict on a kernel Triton compiled for Hopper.

Imported by tests/test_sm90_compile*.py, which run as scripts in a subprocess without
TRITON_INTERPRET (their folder is then first on sys.path) and under pytest.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


def ptxas_report(compiled) -> dict:
    """Assemble ``compiled``'s ptx with the ptxas inside the triton wheel (``-v
    --gpu-name=sm_90a``): ok/error, registers, spill bytes, stack frame, shared memory, and
    whether the ptx holds tensor-core (wgmma, mma.sync) and non-coherent global loads."""
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
    return dict(ok=proc.returncode == 0, error=None if proc.returncode == 0 else log[-2000:],
                registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None,
                stack=int(stack.group(1)) if stack else None,
                shared=int(compiled.metadata.shared),
                wgmma="wgmma" in ptx, mma=bool(re.search(r"\bmma\.sync", ptx)),
                nc_loads="ld.global.nc" in ptx)
