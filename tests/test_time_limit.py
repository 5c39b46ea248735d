"""A wall-clock limit on fitting: TrainConfig.time_limit, NCF.fit(time_limit=...), setup.conf's
train.time_limit and the CLI's --time_limit (one definition: TrainConfig's field).

No timing is asserted: a limit far below one step's time must stop the fit after its first step.
"""
from __future__ import annotations

import json
import math
import os
import types
from dataclasses import replace

import numpy as np
import pytest

from ncf_fast import NCF, cli
from ncf_fast import config as config_mod
from ncf_fast import trainer as trainer_mod
from ncf_fast.trainer import TrainConfig, lr_at

TINY = dict(batch_size=32, mmd_batch_size=32, mmd_active=8, warmup=2, eval_every=5, holdout=16)


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2)), rng.standard_normal((n, 2)) * 0.5 + 1.0


def test_a_tiny_limit_stops_after_the_first_step_with_a_heldout_check():
    src, tgt = _data()
    model = NCF(2, hidden=(16, 16), seed=0, device="cpu").fit(src, tgt, steps=50, progress=False,
                                                               time_limit=1e-9, **TINY)
    h = model.history
    assert model.trainer.step_count == 1 and h["step"] == [1]
    assert h["stopped_early"]["reason"] == "time_limit" and h["stopped_early"]["step"] == 1
    assert h["stopped_early"]["seconds"] > 0
    assert h["heldout_step"] == [1] and len(h["heldout_backward"]) == 1  # the cut fit's check
    assert model.train_config.time_limit == 1e-9
    assert np.isfinite(model.transport(src[:5])).all()


def test_the_cosine_decay_follows_the_time_when_it_is_further_along():
    cfg = TrainConfig(steps=1000, warmup=0, lr=1e-2, lr_final=1e-4, time_limit=100.0)
    assert lr_at(cfg, 500, elapsed=10.0) == pytest.approx(lr_at(cfg, 500))  # steps lead: as before
    assert lr_at(cfg, 100, elapsed=50.0) == pytest.approx(lr_at(cfg, 500))  # time leads
    assert lr_at(cfg, 100, elapsed=250.0) == pytest.approx(1e-4)  # past the budget: lr_final
    assert lr_at(replace(cfg, time_limit=None), 100, elapsed=50.0) == lr_at(cfg, 100)


def test_a_fit_cut_by_its_limit_has_decayed_to_lr_final(monkeypatch):
    """On a clock that moves 1 s per reading, a 20 s limit cuts a 500-step fit early, and its
    last steps run at (nearly) lr_final: the schedule followed the time, not the 500 steps."""
    clock = [0.0]

    def tick():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=tick))
    src, tgt = _data()
    model = NCF(2, hidden=(16, 16), seed=0, device="cpu").fit(
        src, tgt, steps=500, progress=False, time_limit=20.0, lr=1e-2, lr_final=1e-4, **TINY)
    h = model.history
    assert h["stopped_early"]["step"] < 50
    assert h["lr"][-1] < 2e-4 < 5e-3 < max(h["lr"])
    assert model.trainer.elapsed is None  # a step outside run() uses the step schedule


def test_no_limit_or_a_long_one_runs_every_step_and_says_nothing():
    src, tgt = _data()
    for limit in (None, 3600.0):
        model = NCF(2, hidden=(16, 16), seed=0, device="cpu").fit(src, tgt, steps=7, progress=False,
                                                                   time_limit=limit, **TINY)
        assert model.history["step"] == list(range(1, 8))
        assert "stopped_early" not in model.history


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.inf, math.nan])
def test_time_limit_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="time_limit must be a positive finite number"):
        TrainConfig(time_limit=bad)
    src, tgt = _data(50)
    with pytest.raises(ValueError, match="time_limit"):
        NCF(2, seed=0).fit(src, tgt, time_limit=bad, progress=False)


@pytest.mark.parametrize("bad", ["60", True, [1.0]])
def test_time_limit_must_be_a_number(bad):
    with pytest.raises(TypeError, match="time_limit must be a number"):
        TrainConfig(time_limit=bad)


def test_setup_conf_key(tmp_path):
    (tmp_path / "ok.conf").write_text("train { time_limit = 90 }\n")
    flat = config_mod.load_config(tmp_path / "ok.conf")
    assert config_mod.train_config(flat).time_limit == 90.0
    assert config_mod.train_config(config_mod.defaults()).time_limit is None
    for text in ("0", "-5", '"soon"'):
        (tmp_path / "bad.conf").write_text(f"train {{ time_limit = {text} }}\n")
        with pytest.raises(config_mod.ConfigError, match="time_limit"):
            config_mod.load_config(tmp_path / "bad.conf")


def _train_args(tmp_path, *extra):
    src, tgt = _data(300)
    np.save(tmp_path / "x.npy", src.astype(np.float32))
    np.save(tmp_path / "y.npy", tgt.astype(np.float32))
    (tmp_path / "tiny.conf").write_text(
        "train { steps = 40, batch_size = 32, mmd_batch_size = 32, mmd_active = 8, warmup = 2, "
        "eval_every = 10, holdout = 16 }\nmodel { hidden = [16, 16] }\n"
        "run { checkpoint_every = 20, plot_points = 50 }\n")
    return ["train", "--home_dir", tmp_path / "home", "--conf", tmp_path / "tiny.conf", "--input",
            tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--gpu", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("bad", ["0", "-3", "nan", "inf", "soon"])
def test_cli_refuses_a_bad_time_limit(tmp_path, capfd, bad):
    code = cli.main([str(a) for a in _train_args(tmp_path, "--time_limit", bad)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "time_limit" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "home").exists()


def test_cli_time_limit_stops_the_run_and_metrics_show_the_step(tmp_path, capfd):
    assert cli.main([str(a) for a in _train_args(tmp_path, "--time_limit", "1e-9")]) == 0
    run_dir = capfd.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["steps"] == 1
    assert config_mod.load_config(os.path.join(run_dir, "setup.conf"))["train.time_limit"] == 1e-9
