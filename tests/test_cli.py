"""The command-line tool end to end: train -> transport -> evaluate, the demo, resume after Ctrl-C
and after kill -9, and every malformed input refused with exit status 2, one line on stderr and
nothing written.

Runs go through subprocesses (``python -m ncf_fast``) with tiny data and a few dozen steps; the
bad-input cases call ``ncf_fast.cli.main`` in-process (same code path, no interpreter start-up),
and a few of them are repeated through a real subprocess to check the exit status there.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from ncf_fast import NCF, cli
from ncf_fast import config as config_mod
from ncf_fast.estimator import FORMAT, read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
TINY_CONF = f"""
train {{ steps = {STEPS}, batch_size = 64, mmd_batch_size = 64, mmd_active = 16, warmup = 10,
        eval_every = 20, holdout = 32 }}
run {{ checkpoint_every = 10, plot_points = 200 }}
"""


def _env():
    env = dict(os.environ)
    env.pop("NCF_FAST_DEBUG", None)
    # one thread: the machine is shared, and the resumed and uninterrupted runs must reduce alike
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    return env


def run_cli(*args, cwd, timeout=240):
    return subprocess.run([sys.executable, "-m", "ncf_fast", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def popen_cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "ncf_fast", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data folder: 2-D source/target .npy files, labels, the tiny setup.conf."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    src = rng.standard_normal((300, 2)).astype(np.float32)
    tgt = (rng.standard_normal((280, 2)) * [1.5, 0.5] + [1.0, -0.5]).astype(np.float32)
    np.save(root / "input_data.npy", src)
    np.save(root / "output_data.npy", tgt)
    np.save(root / "in_labels.npy", (np.arange(300) % 2).astype(np.int64))
    np.save(root / "out_labels.npy", (np.arange(280) % 2).astype(np.int64))
    (root / "setup.conf").write_text(TINY_CONF)
    return root


def train_args(data, home, *extra):
    """The original research code's flags (no sub-command)."""
    return ["--home_dir", home, "--conf", data / "setup.conf", "--data_dir", data,
            "--input", "input_data.npy", "--output", "output_data.npy", "--gpu", "cpu", *extra]


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """One uninterrupted run with the original flags and no sub-command."""
    home = tmp_path_factory.mktemp("ref") / "home"  # does not exist yet: train creates it
    proc = run_cli(*train_args(data, home, "--quiet"), cwd=data)
    assert proc.returncode == 0, proc.stderr
    return proc, home


def weights(path):
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5, msg=f"weight {k} differs")


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    return rows


# ------------------------------------------------------------------------------ happy paths
def test_train_with_original_flags_writes_one_run_folder(reference_run, data):
    proc, home = reference_run
    run_dir = last_line(proc.stdout)
    assert os.path.isabs(run_dir)
    assert os.path.dirname(run_dir) == str(home / "exps" / "ncf")
    assert os.listdir(home / "exps" / "ncf") == [os.path.basename(run_dir)]  # exactly one run
    files = set(os.listdir(run_dir))
    assert {"checkpoints", "setup.conf", "run.json", "log.csv", "transported.npy", "inverse.npy",
            "metrics.json", "plots"} <= files
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts == ["latest.pt"] + [f"step_{s:06d}.pt" for s in range(10, STEPS + 1, 10)]
    plots = sorted(os.listdir(os.path.join(run_dir, "plots")))
    assert plots == ["displacement.png", "forward.png", "inverse.png", "training.png"]
    for name in plots:
        with open(os.path.join(run_dir, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = log_rows(run_dir)
    assert list(rows[0]) == ["step", "L_HJ", "L_MMD", "lr", "seconds"]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    # the unbiased estimate at ~300 points per side scatters by ~1/300 around its value, which
    # 60 steps bring well below the untrained source-vs-target distance
    assert metrics["steps"] == STEPS and metrics["energy_distance_forward"] >= -1e-2
    assert metrics["energy_distance_forward"] < 0.5 * metrics["energy_distance_initial"]
    # run.json, written at the start, ends with the training time (it used to keep 0.0)
    run = json.loads(open(os.path.join(run_dir, "run.json")).read())
    assert run["seconds"] > 0 and round(run["seconds"], 3) == metrics["seconds"]
    # the resolved config reads back; every CLI checkpoint loads with NCF.load
    assert config_mod.load_config(os.path.join(run_dir, "setup.conf"))["train.steps"] == STEPS
    model = NCF.load(os.path.join(run_dir, "checkpoints", "latest.pt"))
    src = np.load(data / "input_data.npy")
    pushed = np.load(os.path.join(run_dir, "transported.npy"))
    np.testing.assert_allclose(pushed, model.transport(src), rtol=1e-5, atol=1e-5)
    tgt = np.load(data / "output_data.npy")
    np.testing.assert_allclose(np.load(os.path.join(run_dir, "inverse.npy")), model.inverse(tgt),
                               rtol=1e-5, atol=1e-5)
    assert "Traceback" not in proc.stderr


def test_transport_forward_inverse_and_path(reference_run, data, tmp_path):
    run_dir = last_line(reference_run[0].stdout)
    model = NCF.load(os.path.join(run_dir, "checkpoints", "latest.pt"))
    x = np.load(data / "input_data.npy")[:50]
    np.save(tmp_path / "x.npy", x)
    for flags, expect in (([], model.transport(x)), (["--inverse"], model.inverse(x)),
                          (["--t", "0.5"], model.interpolate(x, 0.5))):
        out = tmp_path / "y.npy"
        proc = run_cli("transport", "--checkpoint", run_dir, "--input", tmp_path / "x.npy",
                       "--out", out, "--gpu", "cpu", *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert last_line(proc.stdout) == str(out)
        np.testing.assert_allclose(np.load(out), expect, rtol=1e-5, atol=1e-6)


def test_demo_then_evaluate_gaussian(data, tmp_path):
    home = tmp_path / "h"
    proc = run_cli("demo", "--problem", "gaussian:2:3", "--steps", 20, "--samples", 400,
                   "--conf", data / "setup.conf", "--home_dir", home, "--gpu", "cpu", "--quiet",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = last_line(proc.stdout)
    assert os.path.dirname(run_dir) == str(home / "exps" / "demo")
    assert len(os.listdir(os.path.join(run_dir, "plots"))) == 4
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["steps"] == 20 and "l2_uvp_forward" in metrics
    # every key is documented in README's metrics.json table
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert not [k for k in metrics if f"`{k}`" not in readme], "undocumented metrics.json keys"
    proc = run_cli("evaluate", "--checkpoint", run_dir, "--problem", "gaussian:2:3", "--samples",
                   500, "--json", "--gpu", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("l2_uvp_forward", "l2_uvp_backward", "energy_distance_forward",
                "energy_distance_backward", "cycle_error", "cycle_error_relative"):
        assert np.isfinite(out[key]), key
    # the readable problem name is the same problem; the default output explains each number
    proc = run_cli("evaluate", "--checkpoint", run_dir, "--problem", "gaussian:d=2:seed=3",
                   "--samples", 500, "--gpu", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Gaussian pair (d = 2, seed 3), 500 samples per side" in proc.stdout
    uvp = f"{out['l2_uvp_forward']:.3g} %"
    assert "L2-UVP forward" in proc.stdout and uvp in proc.stdout
    assert "% of the spread" in proc.stdout and "can be negative" in proc.stdout
    # 20 steps are far from the paper's accuracy, and the verdict says so in words
    assert "poor (> 1 %): train longer" in proc.stdout and "x the noise: differs" in proc.stdout
    for key in ("heldout_energy_distance", "heldout_energy_distance_backward", "cycle_error_relative"):
        assert np.isfinite(metrics[key]), key
    # the non-linear known-map family is a problem too: L2-UVP against its exact maps
    proc = run_cli("evaluate", "--checkpoint", run_dir, "--problem", "convex:d=2:seed=1",
                   "--samples", 500, "--json", "--gpu", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    convex = json.loads(proc.stdout)
    assert np.isfinite(convex["l2_uvp_forward"]) and np.isfinite(convex["l2_uvp_backward"])
    assert convex["l2_uvp_forward"] != out["l2_uvp_forward"]
    # a problem of another dimension is refused
    proc = run_cli("evaluate", "--checkpoint", run_dir, "--problem", "gaussian:3", "--gpu", "cpu",
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert "dimension 3" in proc.stderr and "dimension 2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------- resume
def _wait_for(path, proc, timeout=180):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"training ended before {path} appeared: {proc.stderr.read()}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.01)


def _run_dir_of(home, proc, timeout=120):
    base = home / "exps" / "ncf"
    end = time.monotonic() + timeout
    while not base.exists() or not os.listdir(base):
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()}"
        assert time.monotonic() < end, "no run folder appeared"
        time.sleep(0.01)
    return str(base / os.listdir(base)[0])


def _check_resumed_equals_reference(run_dir, reference_run):
    ref_dir = last_line(reference_run[0].stdout)
    assert_same_weights(os.path.join(run_dir, "checkpoints", "latest.pt"),
                        os.path.join(ref_dir, "checkpoints", "latest.pt"))
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert ckpt["trainer"]["step"] == STEPS
    rows, ref = log_rows(run_dir), log_rows(ref_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))  # no gap, no repeat
    np.testing.assert_allclose([float(r["L_HJ"]) for r in rows], [float(r["L_HJ"]) for r in ref],
                               rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose([float(r["lr"]) for r in rows], [float(r["lr"]) for r in ref])


@pytest.mark.slow  # two CLI trainings and a resume
def test_ctrl_c_saves_and_resume_equals_uninterrupted(reference_run, data, tmp_path):
    home = tmp_path / "home"
    proc = popen_cli(*train_args(data, home, "--quiet"), cwd=tmp_path)
    run_dir = _run_dir_of(home, proc)
    _wait_for(os.path.join(run_dir, "checkpoints", "step_000010.pt"), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    step = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))["trainer"]["step"]
    assert 10 <= step < STEPS
    assert not os.path.exists(os.path.join(run_dir, "transported.npy"))
    resumed = run_cli("train", "--resume", run_dir, "--gpu", "cpu", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert last_line(resumed.stdout) == run_dir
    _check_resumed_equals_reference(run_dir, reference_run)


@pytest.mark.slow  # two CLI trainings and a resume
def test_kill_9_leaves_a_loadable_checkpoint_and_resume_equals_uninterrupted(reference_run, data,
                                                                            tmp_path):
    home = tmp_path / "home"
    proc = popen_cli(*train_args(data, home, "--quiet"), cwd=tmp_path)
    run_dir = _run_dir_of(home, proc)
    _wait_for(os.path.join(run_dir, "checkpoints", "step_000020.pt"), proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = os.path.join(run_dir, "checkpoints", "latest.pt")
    NCF.load(latest)  # the latest complete checkpoint is intact
    step = read_checkpoint(latest)["trainer"]["step"]
    assert step >= 10 and step % 10 == 0  # step_000020.pt is written just before latest.pt
    # the same command line plus --resume is accepted (identical config and data)
    resumed = run_cli(*train_args(data, home, "--quiet", "--resume", run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _check_resumed_equals_reference(run_dir, reference_run)
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(".tmp")]


def test_library_resume_matches_uninterrupted_fit():
    """NCF.make_trainer + to_checkpoint(include_trainer=True): the library path the CLI uses."""
    rng = np.random.default_rng(1)
    src, tgt = rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 1.0
    opts = dict(steps=12, batch_size=32, mmd_batch_size=32, mmd_active=8, warmup=3, eval_every=6,
                holdout=16)
    full = NCF(2, hidden=(16, 16), seed=3).fit(src, tgt, progress=False, **opts)
    part = NCF(2, hidden=(16, 16), seed=3)
    trainer = part.make_trainer(src, tgt, config_mod.TrainConfig(**opts))
    trainer.run(progress=False, history=part.history, callback=lambda step, logs: step == 5)
    ckpt = part.to_checkpoint(include_trainer=True)
    resumed = NCF.from_checkpoint(ckpt)
    t2 = resumed.make_trainer(src, tgt, config_mod.TrainConfig(**opts))
    t2.load_state_dict(ckpt["trainer"])
    assert t2.step_count == 5
    t2.run(progress=False, history=resumed.history)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert resumed.history["step"] == list(range(1, 13))
    with pytest.raises(ValueError, match="make_trainer"):
        NCF(2).to_checkpoint(include_trainer=True)


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture
def bad(tmp_path, data, capfd):
    """Run the CLI in-process on a malformed input; assert exit 2, one stderr line, no warning,
    no writes."""
    home = tmp_path / "home"

    def check(args, *needles, files_absent=()):
        before = sorted(os.listdir(tmp_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = cli.main([str(a) for a in args])
        assert not caught, f"warnings: {[str(w.message) for w in caught]}"
        out, err = capfd.readouterr()
        assert code == 2, f"exit status {code}, stderr: {err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got: {err}"
        assert lines[0].startswith("ncf-fast: error: ") and "Traceback" not in err
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
        assert not home.exists(), "a run folder (or home_dir) was created"
        assert sorted(os.listdir(tmp_path)) == before, "files were written"
        for path in files_absent:
            assert not os.path.exists(path)
        return lines[0]
    check.home = home
    check.dir = tmp_path
    return check


def _train(bad, data, inp="input_data.npy", out="output_data.npy", conf=None, extra=()):
    return ["train", "--home_dir", bad.home, "--conf", conf or data / "setup.conf", "--input",
            os.path.join(data, inp) if not os.path.isabs(str(inp)) else inp, "--output",
            os.path.join(data, out) if not os.path.isabs(str(out)) else out, "--gpu", "cpu", *extra]


@pytest.fixture
def files(tmp_path_factory):
    """Malformed input files, in their own folder (so the bad() check sees no new files)."""
    d = tmp_path_factory.mktemp("bad_files")
    good = np.random.default_rng(0).standard_normal((50, 2))
    (d / "text.npy").write_text("0.1 0.2\n0.3 0.4\n")
    np.savez(d / "archive.npy", a=good)  # a zip under a .npy name
    os.replace(d / "archive.npy.npz", d / "archive.npy")
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "complex.npy", good.astype(np.complex64))
    nan = good.copy()
    nan[3, 1] = np.nan
    nan[7, 0] = np.nan
    np.save(d / "nan.npy", nan)
    inf = good.copy()
    inf[5, 0] = np.inf
    np.save(d / "inf.npy", inf)
    np.save(d / "rank1.npy", good[:, 0])
    np.save(d / "rank3.npy", good.reshape(5, 10, 2))
    np.save(d / "dim3.npy", np.random.default_rng(1).standard_normal((50, 3)))
    np.save(d / "one.npy", good[:1])
    np.save(d / "labels_short.npy", np.zeros(299, dtype=np.int64))
    np.save(d / "labels_float.npy", np.full(300, 0.5))
    np.save(d / "good.npy", good)
    raw = (d / "good.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    (d / "unknown_key.conf").write_text("train { stpes = 10 }\n")
    (d / "wrong_type.conf").write_text('train { steps = "many" }\n')
    (d / "bad_choice.conf").write_text("model { activation = relu }\n")
    (d / "syntax.conf").write_text("train { steps = 10\n")
    return d


def test_empty_setup_conf_is_valid_and_the_example_is_the_defaults(tmp_path):
    (tmp_path / "empty.conf").write_text("")
    assert config_mod.load_config(tmp_path / "empty.conf") == config_mod.defaults()
    assert config_mod.load_config(os.path.join(REPO, "setup.conf")) == config_mod.defaults()


def test_bad_sample_files(bad, data, files):
    f = files
    bad(_train(bad, data, inp=data / "nope.npy"), "nope.npy", "no such .npy file")
    bad(_train(bad, data, inp=f / "text.npy"), "text.npy", "not a .npy file")
    bad(_train(bad, data, out=f / "archive.npy"), "archive.npy", "zip archive")
    bad(_train(bad, data, inp=f / "objects.npy"), "objects.npy", "pickled", "refusing")
    bad(_train(bad, data, inp=f / "strings.npy"), "strings.npy", "non-numeric dtype")
    bad(_train(bad, data, inp=f / "complex.npy"), "complex.npy", "non-numeric dtype complex64")
    bad(_train(bad, data, inp=f / "nan.npy"), "nan.npy", "2 NaN", "2 row(s)", "first at row 3")
    bad(_train(bad, data, out=f / "inf.npy"), "inf.npy", "1 Inf", "first at row 5")
    bad(_train(bad, data, inp=f / "rank1.npy"), "rank1.npy", "shape (N, d)", "(50,)")
    bad(_train(bad, data, inp=f / "rank3.npy"), "rank3.npy", "shape (N, d)", "(5, 10, 2)")
    bad(_train(bad, data, out=f / "dim3.npy"), "input_data.npy", "dimension 2", "dim3.npy",
        "dimension 3")
    bad(_train(bad, data, inp=f / "one.npy"), "one.npy", "1 sample(s)", "at least 2")
    bad(_train(bad, data, inp=f / "truncated.npy"), "truncated.npy", "truncated or corrupted")


def test_bad_labels(bad, data, files):
    bad(_train(bad, data, extra=["--input_labels", files / "labels_short.npy", "--output_labels",
                                 data / "out_labels.npy"]), "labels_short.npy", "299 entries", "300")
    bad(_train(bad, data, extra=["--input_labels", files / "labels_float.npy", "--output_labels",
                                 data / "out_labels.npy"]), "labels_float.npy", "integer")
    bad(_train(bad, data, extra=["--input_labels", data / "in_labels.npy"]), "--output_labels",
        "together")


def test_bad_config(bad, data, files):
    bad(_train(bad, data, conf=files / "unknown_key.conf"), "unknown_key.conf", "'train.stpes'",
        "did you mean 'train.steps'")
    bad(_train(bad, data, conf=files / "wrong_type.conf"), "wrong_type.conf", "train.steps",
        "must be an integer", "'many'")
    bad(_train(bad, data, conf=files / "bad_choice.conf"), "model.activation", "softplus", "'relu'")
    bad(_train(bad, data, conf=files / "syntax.conf"), "syntax.conf", "not valid HOCON at line 2")
    bad(_train(bad, data, conf=files / "missing.conf"), "missing.conf", "no such config file")
    bad(_train(bad, data, extra=["--stpes", "3"]), "unrecognized arguments", "did you mean --steps")


def test_home_dir_not_writable(bad, data, files, tmp_path):
    bad(_train(bad, data) + ["--home_dir", "/sys/ncf_fast_home"], "/sys/ncf_fast_home", "not writable")
    bad(_train(bad, data) + ["--home_dir", files / "good.npy" / "sub"], "not writable",
        "not a directory")
    if os.geteuid() != 0:  # root writes anywhere; the /sys case above covers it
        locked = tmp_path.parent / f"{tmp_path.name}_locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            bad(_train(bad, data) + ["--home_dir", locked / "h"], "not writable")
        finally:
            locked.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda(bad, data):
    bad(_train(bad, data) + ["--gpu", "0"], "--gpu 0", "CUDA is not available", "--gpu cpu")


def test_bad_checkpoints(bad, reference_run, files, tmp_path_factory):
    run_dir = last_line(reference_run[0].stdout)
    latest = os.path.join(run_dir, "checkpoints", "latest.pt")
    d = tmp_path_factory.mktemp("bad_ckpt")
    raw = open(latest, "rb").read()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    ckpt = read_checkpoint(latest)
    ckpt["config"]["hidden"] = [32, 32, 32]  # weights of another architecture
    torch.save(ckpt, d / "other_arch.pt")
    out = bad.dir / "y.npy"

    def transport(c, x=files / "good.npy"):
        return ["transport", "--checkpoint", c, "--input", x, "--out", out, "--gpu", "cpu"]
    bad(transport(d / "truncated.pt"), "truncated.pt", "truncated or corrupted", files_absent=[out])
    bad(transport(d / "garbage.pt"), "garbage.pt", "not a checkpoint file", files_absent=[out])
    bad(transport(d / "other_arch.pt"), "other_arch.pt", "size mismatch", files_absent=[out])
    bad(transport(d / "missing.pt"), "missing.pt", "no such", files_absent=[out])
    bad(transport(latest, files / "dim3.npy"), "dim3.npy", "dimension 3", "dimension 2",
        files_absent=[out])
    bad(["transport", "--checkpoint", latest, "--input", files / "good.npy", "--out",
         bad.dir / "y.txt", "--gpu", "cpu"], "y.txt", ".npy")
    bad(["evaluate", "--checkpoint", latest, "--problem", "gaussian:5", "--gpu", "cpu"],
        "dimension 5", "dimension 2")
    bad(["train", "--resume", d / "truncated.pt", "--gpu", "cpu"], "truncated or corrupted")


def test_resume_refuses_a_different_architecture_or_data(bad, reference_run, data, files,
                                                         tmp_path_factory):
    run_dir = last_line(reference_run[0].stdout)
    d = tmp_path_factory.mktemp("resume_conf")
    (d / "wide.conf").write_text(TINY_CONF + "\nmodel { hidden = [32, 32] }\n")
    before = sorted(os.listdir(run_dir)), open(os.path.join(run_dir, "log.csv")).read()
    bad(["train", "--resume", run_dir, "--conf", d / "wide.conf", "--gpu", "cpu"], "model.hidden",
        "[32, 32]", "keeps its configuration")
    bad(["train", "--resume", run_dir, "--input", files / "dim3.npy", "--gpu", "cpu"],
        "dim3.npy", "dimension 3")
    bad(["train", "--resume", run_dir, "--input", files / "good.npy", "--gpu", "cpu"], "good.npy",
        "not the data")
    assert (sorted(os.listdir(run_dir)), open(os.path.join(run_dir, "log.csv")).read()) == before


class _Evil:
    """Unpickling this would run a shell command: a checkpoint must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickled_object_is_refused(bad, reference_run, files, tmp_path_factory):
    run_dir = last_line(reference_run[0].stdout)
    d = tmp_path_factory.mktemp("evil")
    marker = d / "code_was_executed"
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
    ckpt["extra"] = _Evil(marker)
    torch.save(ckpt, d / "evil.pt")
    assert ckpt["format"] == FORMAT
    with pytest.raises(ValueError, match="pickled Python objects"):
        NCF.load(d / "evil.pt")
    out = bad.dir / "y.npy"
    bad(["transport", "--checkpoint", d / "evil.pt", "--input", files / "good.npy", "--out", out,
         "--gpu", "cpu"], "evil.pt", "pickled", files_absent=[out])
    proc = run_cli("evaluate", "--checkpoint", d / "evil.pt", "--problem", "gaussian:2", "--gpu",
                   "cpu", cwd=d)
    assert proc.returncode == 2 and "pickled" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), "loading the checkpoint executed code from it"


def test_subprocess_errors_exit_2_with_one_line(data, tmp_path):
    """The same refusals through a real process: status 2, one line, no traceback, no folder."""
    home = tmp_path / "home"
    huge = tmp_path / "huge.npy"
    np.save(huge, np.where(np.arange(600).reshape(300, 2) == 11, 1e30, 0.0).astype(np.float32))
    cases = [(train_args(data, home, "--input", "missing.npy"), "missing.npy: no such .npy file"),
             (train_args(data, home, "--expname", tmp_path / "abs"), "relative folder"),
             (train_args(data, home, "--expname", "../x"), "'../x'"),
             (train_args(data, home, "--input", huge), "1e+30 at row 5, column 1")]
    if not torch.cuda.is_available():
        cases.append((train_args(data, home, "--gpu", "0"), "CUDA is not available"))
    for args, needle in cases:
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert not home.exists() and sorted(os.listdir(tmp_path)) == ["huge.npy"]


def test_import_needs_neither_matplotlib_nor_pyhocon():
    code = ("import sys, ncf_fast, ncf_fast.cli, ncf_fast.config, ncf_fast.plots; "
            "bad = [m for m in ('matplotlib', 'pyhocon') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_console_script_is_installed():
    exe = shutil.which("ncf-fast")
    if exe is None:
        pytest.skip("ncf-fast is not on PATH (package not installed)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and "ncf_fast" in proc.stdout


@pytest.mark.parametrize("dim, exact", [(1, True), (5, False)])
def test_plots_for_one_and_many_dimensions(tmp_path, dim, exact):
    """d = 1 draws the characteristics in the (x, t) plane, d > 2 a principal-axes projection
    (d = 2 runs in the demo and train tests); with and without an exact map; a negative
    held-out estimate and an L_HJ that starts at 0 (u starts flat) on the log axes."""
    from ncf_fast import plots
    rng = np.random.default_rng(dim)
    src = rng.standard_normal((300, dim))
    tgt = 2.0 * rng.standard_normal((300, dim)) + 1.0
    history = {"step": [1, 2, 3, 4], "hj": [0.0, 1e-3, 5e-4, 4e-4], "mmd": [0.1, -0.01, 0.02, 0.0],
               "lr": [1e-3, 1e-3, 5e-4, 1e-4], "heldout_step": [2, 4], "heldout": [0.05, -1e-4]}
    truth = {"truth_forward": 2.0 * src + 1.0, "truth_backward": (tgt - 1.0) / 2.0} if exact else {}
    files = plots.run_plots(str(tmp_path), src, tgt, 2.0 * src + 1.01, (tgt - 1.0) / 2.0 + 0.01,
                            history, max_points=100, title=f"d={dim}", **truth)
    assert [os.path.basename(f) for f in files] == ["forward.png", "inverse.png", "training.png",
                                                    "displacement.png"]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(f) for f in files)  # no temp files


def test_problem_names_readable_and_short_forms_agree():
    from ncf_fast.cli import CLIError
    from ncf_fast.cli.inputs import named_problem as _parse_problem
    for readable, short in (("gaussian:d=2:seed=1", "gaussian:2:1"), ("gaussian:d=3", "gaussian:3"),
                            ("convex:d=3:seed=2", "convex:3:2"),
                            ("toy:circles", "circles"), ("toy:moons:circles", "moons:circles")):
        a, b = _parse_problem(readable), _parse_problem(short)
        assert a.dim == b.dim and a.title == b.title
        np.testing.assert_array_equal(a.sample(5, 0)[1], b.sample(5, 0)[1])
    assert _parse_problem("gaussian:d=2:seed=1").title == "Gaussian pair (d = 2, seed 1)"
    assert _parse_problem("gaussian:circles").title == "N(0, I) → circles (toys)"  # the toy pair
    with pytest.raises(CLIError, match="gaussian:d=D:seed=S"):
        _parse_problem("gaussian:d=2:1")
    with pytest.raises(CLIError, match="convex:d=D:seed=S"):
        _parse_problem("convex:d=2:x")
    # convex: ConvexOT(D, seed=S); the targets are the exact map of source draws
    convex = _parse_problem("convex:d=3:seed=2")
    x, y = convex.sample(50, 7)
    x_for_y = convex.oracle.sample_source(50, np.random.default_rng([8, 1]))  # sample: seed + 1
    np.testing.assert_allclose(y, convex.oracle.forward_map(x_for_y), rtol=1e-12)
    np.testing.assert_allclose(convex.oracle.inverse_map(y), x_for_y, atol=1e-8)
    assert convex.dim == 3 and "ConvexOT" in convex.title and not np.allclose(x, x_for_y)
    # the library layer below the CLI: the same message as a ValueError
    from ncf_fast import problems
    with pytest.raises(ValueError, match="gaussian:d=D:seed=S"):
        problems.parse_problem("gaussian:d=2:1")


def test_help_texts_say_what_each_flag_does():
    from ncf_fast.cli import build_parser
    parser = build_parser()
    assert "flags mean train" in " ".join(parser.format_help().split())
    subs = parser._subparsers._group_actions[0].choices

    def quiet_help(name):
        action = next(a for a in subs[name]._actions if "--quiet" in a.option_strings)
        return action.help
    assert quiet_help("train") == quiet_help("demo") and "progress bar" in quiet_help("train")
    assert "output path" in quiet_help("transport") and "numbers only" in quiet_help("evaluate")
    for name in subs:
        assert any("--threads" in a.option_strings for a in subs[name]._actions), name


def test_progress_bar_names_are_shared():
    from ncf_fast.trainer import progress_fields
    fields = progress_fields({"hj": 1e-4, "mmd": -2e-3, "lr": 1e-3, "heldout": -1e-5})
    assert list(fields) == ["L_HJ", "L_MMD", "ED_heldout", "lr"]
    assert fields["ED_heldout"] == "-1.00e-05"  # a negative estimate is shown as it is
    assert list(progress_fields({"hj": 1.0, "mmd": 1.0, "lr": 1.0})) == ["L_HJ", "L_MMD", "lr"]
