"""Print a compact table from pytest-benchmark JSON files: time, ratio to reference, peak memory,
TFLOP/s per (benchmark, shape, backend). Used by gpu_check.sh.

    python benchmarks/summarize.py results.json [more.json ...]
"""
from __future__ import annotations

import json
import sys


def main(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            rows.append((b["name"].split("[")[0], info.get("shape", b.get("param", "")),
                         info.get("backend", "?"), b["stats"]["mean"], info))
    ref = {(name, shape): mean for name, shape, backend, mean, _ in rows if backend == "reference"}
    print(f"{'benchmark':<36} {'shape':<20} {'backend':<10} {'ms':>9} {'x ref':>7} "
          f"{'MB':>8} {'B/row':>8} {'TFLOP/s':>8}")
    for name, shape, backend, mean, info in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
        base = ref.get((name, shape))
        ratio = f"{base / mean:7.2f}" if base else "      -"
        mem = info.get("peak_mem_mb")
        per = info.get("peak_mem_bytes_per_sample")
        tf = info.get("tflops")
        print(f"{name:<36} {shape:<20} {backend:<10} {mean * 1e3:9.3f} {ratio} "
              f"{mem if mem is None else f'{mem:8.1f}'!s:>8} {per if per is None else f'{per:8.0f}'!s:>8} "
              f"{tf if tf is None else f'{tf:8.2f}'!s:>8}")


if __name__ == "__main__":
    main(sys.argv[1:])
