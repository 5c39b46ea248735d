"""gpu_check's summary table: every measured row, then every step's exit status.

    python benchmarks/summarize.py OUT_DIR

Reads OUT_DIR/rows.jsonl (benchmarks/gpu_bench.py, written row by row as measured) and
OUT_DIR/steps.tsv (benchmarks/gpu_check.sh: step, status, exit code, seconds). Timing rows show
the median and range of their calls, the speed-up over the first row measured for the same
operation and shape ("x base": the eager-autograd / torch.cdist baseline where it ran, in the
same run), achieved TFLOP/s
and the fraction of the bound, and peak memory. Exits 1 if any step did not pass or the step
table is missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(out_dir: str) -> int:
    out = Path(out_dir)
    rows = []
    if (out / "rows.jsonl").exists():
        rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()
                if line.strip()]
    steps = []
    if (out / "steps.tsv").exists():
        steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()
                 if line.strip()]
    device = rows[0]["device"] if rows else "?"
    print(f"== gpu_check summary ({device})")
    timed = [r for r in rows if "ms" in r]
    base = {}
    for r in timed:
        base.setdefault((r["name"], r["shape"]), r["ms"])
    if timed:
        print(f"{'operation':<28} {'shape':<20} {'MLP + energy backends':<38} {'ms (median)':>11} "
              f"{'range':>19} {'x base':>7} {'TFLOP/s':>8} {'of bound':>8} {'peak MB':>8}")
    for r in timed:
        span = f"{r['ms_min']:.4g}-{r['ms_max']:.4g}"
        print(f"{r['name']:<28} {r['shape']:<20} {r['backends']:<38} {r['ms']:11.4g} "
              f"{span:>19} {base[(r['name'], r['shape'])] / r['ms']:7.2f} "
              f"{_fmt(r.get('tflops'), '8.3g')} {_fmt(r.get('of_bound'), '8.1%')} "
              f"{_fmt(r.get('peak_mb'), '8.0f')}")
    accuracy = [r for r in rows if "rel_err" in r]
    if accuracy:
        print(f"{'accuracy: max|x - float64| / max|float64|':<49} {'shape':<20} {'backend':<16} "
              f"{'rel. error':>10}")
    for r in accuracy:
        print(f"{r['name']:<49} {r['shape']:<20} {r['backends']:<16} {r['rel_err']:10.2e}")
    print(f"{'step':<12} {'status':<8} {'exit':>4} {'seconds':>8}")
    failed = not steps
    for name, status, rc, seconds in steps:
        print(f"{name:<12} {status:<8} {rc:>4} {float(seconds):8.1f}")
        failed |= status not in ("ok", "skipped")
    print(f"gpu_check: {'FAILED' if failed else 'PASSED'} ({len(steps)} steps, {len(rows)} rows)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ncf_gpu_check"))
