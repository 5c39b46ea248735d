"""benchmarks/accuracy.py's logic on tiny fits: the wall-clock budget, the traced curve, the
table beside the paper's numbers, and the plot (accuracy itself is measured, not tested here)."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
acc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acc)

TINY = {"batch_size": 32, "mmd_batch_size": 64, "mmd_active": 16, "backward_active": 16,
        "backward_batch_size": 64, "eval_every": 5, "holdout": 64}


def test_a_traced_fit_records_both_maps_at_every_check():
    r = acc.evaluate(2, 0, 20, "cpu", n_train=600, n_test=400, options=TINY,
                     model_options={"hidden": [16, 16]}, trace=True)
    assert [step for _, step, _, _ in r["curve"]] == [5, 10, 15, 20]
    times = [t for t, _, _, _ in r["curve"]]
    assert times == sorted(times) and 0 <= times[0] <= r["seconds"] + 1e-9
    assert all(f > 0 and b > 0 for _, _, f, b in r["curve"])
    assert r["curve"][-1][2] == pytest.approx(r["forward"], rel=2.0)  # same map, other samples


def test_a_budget_fit_runs_on_the_clock_until_the_budget():
    """No step limit: the time limit ends the fit, the row counts the steps taken."""
    r = acc.evaluate(2, 0, None, "cpu", n_train=600, n_test=400, options=TINY,
                     model_options={"hidden": [16, 16]}, budget=1.5)
    assert r["stopped_early"] and 0 < r["steps"] < acc.BUDGET_STEPS
    assert r["seconds"] >= 1.5 and r["forward"] > 0


def test_the_paper_table_sits_beside_the_means():
    rows = [{"dim": 2, "forward": 0.02, "backward": 0.04, "moments": (0.01, 0.02)},
            {"dim": 2, "forward": 0.04, "backward": 0.06, "moments": (0.03, 0.04)},
            {"dim": 5, "forward": 1.0, "backward": 2.0, "moments": None}]
    lines = acc.paper_rows(rows)
    assert lines[2] == "| 2 | 2 | 0.030 | 0.050 | 0.020 / 0.030 | 0.01 | 0.01 | 0.01 |"
    assert lines[3] == "| 5 | 1 | 1.000 | 2.000 | — | — | — | — |"  # no paper column for d = 5
    assert set(acc.SEEDS) == set(acc.PAPER) == {2, 4, 8, 16, 32, 64}
    assert all(len(s) >= 3 for s in acc.SEEDS.values())


def test_main_writes_rows_and_the_convergence_plot(tmp_path, capsys):
    out, png = tmp_path / "rows.jsonl", tmp_path / "curve.png"
    opts = [a for k, v in TINY.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    acc.main(["--dims", "2", "--seeds", "1", "--steps", "10", "--samples", "600", "--test_samples", "800", "--model",
              "hidden=[8]", "--out", str(out), "--plot", str(png), *opts])
    text = capsys.readouterr().out
    assert "| 2 | 1 |" in text and "paper NCF" in text and png.stat().st_size > 5000
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["steps"] == 10 and row["model"] == {"hidden": [8]} and len(row["curve"]) == 2
    with pytest.raises(SystemExit):
        acc.main(["--budget", "10", "--steps", "5"])
