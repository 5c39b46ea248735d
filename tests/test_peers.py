"""benchmarks/peers.py's harness without the peers installed: the budget, the metrics, failure
rows, the table, the JSON file rewritten after every row, the flags; and one run of the real
worker processes at a tiny budget on the methods that are installed (the rest must give rows
saying "not installed")."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import peers  # noqa: E402

SMALL = ["--samples", "400", "--test_samples", "300", "--map_samples", "500"]


class _Log(list):
    path = ""


def fake_methods(log=None):
    """Methods that need no peer: the exact maps (L2-UVP 0), the exact forward map plus a known
    offset and no backward map, and one that raises."""
    def exact(src, tgt, budget, seed):
        prob = fake_methods.problem
        return peers.Fitted(prob.forward_map, prob.inverse_map, 1)

    def offset(src, tgt, budget, seed):
        prob = fake_methods.problem
        if log is not None:  # the file already holds every earlier row when this one starts
            log.append(json.loads(open(log.path).read()) if os.path.exists(log.path) else [])
        return peers.Fitted(lambda x: prob.forward_map(x) + 0.1, None, 3, "shifted")

    def broken(src, tgt, budget, seed):
        raise RuntimeError("diverged\nsecond line")
    return {"exact": exact, "offset": offset, "broken": broken}


@pytest.fixture(autouse=True)
def _track_problem(monkeypatch):
    """Let the fake methods see the problem the harness built (the exact maps)."""
    real = peers.make_problem

    def spy(name, dim, seed=0):
        fake_methods.problem = real(name, dim, seed)
        return fake_methods.problem
    monkeypatch.setattr(peers, "make_problem", spy)


def test_rows_metrics_failures_and_json_rewritten_after_every_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    log = _Log()
    log.path = str(out)
    rows = peers.main(["--problems", "gaussian,convex", "--dims", "2,3", "--budget", "5",
                       "--out", str(out), *SMALL, "--test_samples", "5000"],
                      methods=fake_methods(log), isolate=False)
    assert len(rows) == 2 * 2 * 3
    saved = json.loads(out.read_text())
    assert saved == rows
    assert [len(x) for x in log] == [1, 4, 7, 10]  # offset is the 2nd of 3 methods per (problem, d)
    for r in rows:
        assert set(peers.COLUMNS) <= set(r)
    exact = [r for r in rows if r["method"] == "exact"]
    assert all(r["uvp_fwd"] < 1e-20 and r["uvp_bwd"] < 1e-20 for r in exact)
    assert all(r["fit_s"] >= 0 and r["map_s"] >= 0 and r["peak_mb"] > 0 for r in exact)
    for r in (r for r in rows if r["method"] == "offset"):
        prob = peers.make_problem(r["problem"], r["d"])
        y = prob.sample_target(20_000)
        expected = 100 * 0.01 * r["d"] / y.var(0, ddof=1).sum()  # |0.1 (1, ..., 1)|^2 / Var(nu)
        assert r["uvp_fwd"] == pytest.approx(expected, rel=0.1)  # Var(nu) from 5000 samples
        assert r["uvp_bwd"] is None and r["steps"] == 3 and r["note"] == "shifted"
    for r in (r for r in rows if r["method"] == "broken"):
        assert r["error"] == "RuntimeError: diverged"
        assert all(r[k] is None for k in ("uvp_fwd", "uvp_bwd", "fit_s", "map_s"))
    table = capsys.readouterr().out
    assert "| exact | gaussian | 2 |" in table and "RuntimeError: diverged" in table
    assert "| — |" in table  # the missing backward map


def test_budget_stops_a_stream_after_the_step_that_crosses_it():
    budget = peers.Budget(1e-9)
    stream = budget.batches(np.arange(20.0).reshape(10, 2), 4, np.random.default_rng(0))
    first = next(stream)
    assert first.shape == (4, 2)
    with pytest.raises(peers.OutOfTime):  # the clock restarted after the first step, then ran out
        next(stream)
    assert budget.steps == 1 and budget.first_step_s >= 0
    long = peers.Budget(3600)
    stream = long.batches(np.zeros((5, 3)), 2, np.random.default_rng(0))
    assert all(next(stream).shape == (2, 3) for _ in range(50)) and long.steps == 50
    for bad in (0, -1.0, math.inf, math.nan, "5", True):
        with pytest.raises(ValueError, match="budget"):
            peers.Budget(bad)


def test_chunked_mapping_and_missing_packages():
    x = np.arange(25.0).reshape(25, 1)
    calls = []

    def f(a):
        calls.append(a.shape[0])
        return 2 * a
    np.testing.assert_array_equal(peers.chunked(f, x, chunk=10), 2 * x)
    assert calls == [10, 10, 5]
    assert peers.missing_package("ncf_fast") is None
    row = peers.empty_row("ott_enot", "convex", 8, "not installed: ott")
    assert row["error"] == "not installed: ott" and row["uvp_fwd"] is None and row["d"] == 8
    json.dumps(row, allow_nan=False)


def test_flags_are_checked(capsys):
    parser = peers.build_parser()
    args = parser.parse_args(["--methods", "all", "--dims", "2,8", "--problems", "convex"])
    assert args.methods == list(peers.METHODS) and args.dims == [2, 8] and args.problems == ["convex"]
    for bad in (["--methods", "ott_enot,nope"], ["--dims", "2,x"], ["--dims", "0"],
                ["--budget", "0"], ["--budget", "inf"], ["--problems", "mnist"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2
    assert "--methods" in capsys.readouterr().err
    assert not [m for m in peers.METHODS if m != "ncf_fast" and "ncf" in m]


def test_table_and_plot(tmp_path):
    rows = [dict(peers.empty_row(m, p, d), uvp_fwd=u, uvp_bwd=u * 2 if m != "b" else None,
                 budget_s=5.0)
            for m, u in (("ncf_fast", 0.1), ("b", 1.0)) for p in peers.PROBLEMS for d in (2, 8)]
    rows.append(peers.empty_row("c", "convex", 2, "not installed: c"))
    table = peers.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[-1].endswith("not installed: c |")
    peers.plot_rows(rows, str(tmp_path / "uvp.png"))
    assert (tmp_path / "uvp.png").stat().st_size > 10_000


def test_saved_rows_give_the_table_and_plot_without_fitting(tmp_path, capsys):
    rows = [dict(peers.empty_row(m, "gaussian", d), uvp_fwd=0.1 * d, budget_s=60.0)
            for m in ("ncf_fast", "b") for d in (2, 4)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    peers.write_rows(rows[:2], str(a))
    peers.write_rows(rows[2:], str(b))
    got = peers.main(["--rows", str(a), str(b), "--plot", str(tmp_path / "uvp.png")],
                     methods={}, isolate=False)
    assert got == rows and (tmp_path / "uvp.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| b | gaussian | 4 |" in out
    # the pivot: a column per d, the lowest forward error in bold, no backward map shown as —
    assert "| method | d = 2 | d = 4 |" in out
    assert "| ncf_fast | **0.200** / — | **0.400** / — |" in out
    assert "| b | **0.200** / — | **0.400** / — |" in out  # a tie: both bold
    (tmp_path / "bad.json").write_text('{"method": "x"}')
    with pytest.raises(SystemExit, match="not a JSON array of rows"):
        peers.main(["--rows", str(tmp_path / "bad.json")], methods={}, isolate=False)


@pytest.mark.slow  # two worker processes, each importing torch and ncf_fast: ~20 s when loaded
def test_workers_at_a_tiny_budget_on_the_installed_methods(tmp_path):
    """The real worker processes: ncf_fast always, pot_linear where POT is installed, and a row
    saying "not installed" for a peer that is missing (never a crash)."""
    methods = ["ncf_fast", "pot_linear"]
    out = tmp_path / "rows.json"
    rows = peers.main(["--problems", "gaussian", "--dims", "2", "--budget", "0.5", "--methods",
                       ",".join(methods), "--out", str(out), *SMALL])
    assert json.loads(out.read_text()) == rows and [r["method"] for r in rows] == methods
    ncf = rows[0]
    assert "error" not in ncf, ncf
    assert math.isfinite(ncf["uvp_fwd"]) and math.isfinite(ncf["uvp_bwd"]) and ncf["steps"] >= 1
    assert ncf["peak_mb"] > 50
    pot = rows[1]
    if importlib.util.find_spec("ot") is None:
        assert pot["error"].startswith("not installed") and pot["uvp_fwd"] is None
    else:  # the Gaussian closed form from 400 samples' moments: close to the linear OT map
        assert pot["uvp_fwd"] < 3.0 and pot["uvp_bwd"] < 3.0 and "error" not in pot
