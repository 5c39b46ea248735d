"""benchmarks/gpu_check.sh --cpu-smoke: every step of the one-call GPU check at toy sizes, under
the Triton interpreter, so that the script cannot rot between device loans."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~60 s on 2 shared cores
def test_gpu_check_cpu_smoke_mode_passes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its own steps
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    lines = proc.stdout.strip().splitlines()
    title = max(i for i, line in enumerate(lines) if "gpu_check summary" in line)
    summary = "\n".join(lines[title:])
    assert lines[-1].startswith("gpu_check: PASSED"), summary
    for step in ("env", "warm-up", "tests", "accuracy", "timings"):
        assert f"\n{step} " in summary and "TIMEOUT" not in summary and "FAILED" not in summary
    # one row per (MLP backend, energy backend) pair of the train step, rows on disk as measured
    for backends in ("eager autograd + torch.cdist energy", "torch + torch", "triton + triton"):
        assert backends in summary
    assert (tmp_path / "rows.jsonl").read_text().count("\n") >= 20
