"""Defects an adversarial pass found: run folders that escape home_dir, configs that
reach the network, extreme values, non-regular files, an unfitted model used as a map, a full
disk, a mkdir race, a flag hiding a bad file value, file modes, huge configs and messages in
the library's words instead of the user's.

Every refusal goes through the ``bad`` check of test_cli (exit 2, one line on stderr, no
warning, nothing written); a few that could hang before the fix run in a subprocess with a
timeout instead.
"""
from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import stat
import warnings

import numpy as np
import pytest
import torch

from ncf_fast import NCF, cli
from ncf_fast.cli import run_folder
from ncf_fast import config as config_mod
from ncf_fast.data import check_samples
from ncf_fast.estimator import read_checkpoint
from test_cli import _train, bad, data, run_cli, train_args  # noqa: F401 (fixtures)


def tree(root) -> list[str]:
    """Every path under root (hidden ones included), sorted."""
    out = []
    for folder, dirs, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in dirs + names]
    return sorted(out)


@pytest.fixture
def listener():
    """A local TCP port that listens and never answers: a tripwire for network access."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/setup.conf"

    def connected() -> bool:
        try:
            sock.accept()[0].close()
            return True
        except BlockingIOError:
            return False
    connected.url = url
    yield connected
    sock.close()


# -------------------------------------------------------------------- 1. run folder escapes
def test_expname_must_name_a_folder_inside_exps(bad, data, tmp_path, monkeypatch, capfd):
    outside = tmp_path / "outside"
    bad(_train(bad, data, extra=["--expname", outside]), str(outside), "run.expname", "relative")
    bad(_train(bad, data, extra=["--expname", "../../escape"]), "'../../escape'", "..")
    bad(_train(bad, data, extra=["--expname", "a/../../b"]), "..")
    bad(_train(bad, data, extra=["--expname", "two\nlines"]), "control character")
    bad(_train(bad, data, extra=["--expname", "."]), "run.expname")
    # with H/exps already there: still nothing written, inside H or beside it
    (bad.home / "exps").mkdir(parents=True)
    before = tree(tmp_path)
    for name in ("../escape", "../../escape", str(outside)):
        assert cli.main([str(a) for a in _train(bad, data, extra=["--expname", name])]) == 2
        assert len(capfd.readouterr().err.strip().splitlines()) == 1
    assert tree(tmp_path) == before
    (bad.home / "exps").rmdir()
    bad.home.rmdir()
    # ${HOME} in setup.conf: the environment is read, the result is checked like a flag
    fake_home = tmp_path / "fake_home"
    fake_home.mkdir()
    monkeypatch.setenv("HOME", str(fake_home))
    conf = tmp_path / "confs"
    conf.mkdir()
    (conf / "home.conf").write_text("run { expname = ${HOME} }\n")
    bad(_train(bad, data, conf=conf / "home.conf"), "home.conf", "run.expname", str(fake_home))
    assert os.listdir(fake_home) == []
    with pytest.raises(cli.CLIError, match="control character"):
        run_folder.check_home(str(tmp_path / "two\nlines"))
    bad(["transport", "--checkpoint", tmp_path, "--input", data / "input_data.npy", "--out",
         tmp_path / "y\n.npy"], "--out", "control character")


def test_nested_expname_is_a_folder_inside_exps():
    cfg = config_mod.parse_config({}, overrides={"run.expname": "group/run_1"})
    assert cfg["run.expname"] == "group/run_1"
    for name in ("/abs", "../x", "a/..", "a\tb", "", "a/./../b"):
        with pytest.raises(config_mod.ConfigError, match="run.expname"):
            config_mod.parse_config({"run": {"expname": name}})


# ------------------------------------------------------------------ 2. includes, substitutions
INCLUDES = [
    'include url("{url}")',
    'include required(url("{url}"))',
    'include "{url}"',
    'INCLUDE "{url}"',
    '\u0131nclude "{url}"',  # dotless i: pyparsing's caseless match upper-cases it to INCLUDE
    'train {{ include url("{url}") }}',
    'run {{ checkpoint_every = 5, include"{url}" }}',
    'train.steps = 5\ninclude file("{secret}")',
    'include required(file("{secret}"))',
    'include "{secret}"',
    'include "beside.conf"',
    'include package("pyhocon:x.conf")',
]


@pytest.mark.parametrize("text", INCLUDES)
def test_setup_conf_includes_are_refused_before_anything_is_opened(text, bad, data, tmp_path,
                                                                   listener, monkeypatch):
    conf = tmp_path / "confs"
    conf.mkdir()
    (conf / "beside.conf").write_text("train.steps = 7\n")
    secret = conf / "secret.conf"
    secret.write_text("train.steps = 8\n")
    (conf / "setup.conf").write_text(text.format(url=listener.url, secret=secret) + "\n")
    opened = []
    real_open = open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", spy)

    def hung(signum, frame):  # pyhocon's urlopen has no timeout: never wait on it
        raise AssertionError("reading the config hung on an include")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        bad(_train(bad, data, conf=conf / "setup.conf"), "setup.conf", "include", "self-contained")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not listener(), "ncf-fast connected to the URL of an include"
    assert str(secret) not in opened and str(conf / "beside.conf") not in opened


def test_the_word_include_in_a_comment_or_a_string_is_not_an_include(tmp_path):
    (tmp_path / "ok.conf").write_text('# include url("http://example.com/x.conf")\n'
                                      'run { expname = "include" }  // include "x"\n'
                                      '// include "y"\n'
                                      'train { steps = 9 }\n')
    cfg = config_mod.load_config(tmp_path / "ok.conf")
    assert cfg["run.expname"] == "include" and cfg["train.steps"] == 9


def test_include_url_exits_2_at_once_in_a_process(data, tmp_path, listener):
    """Before the fix this hung forever on a server that never answers."""
    (tmp_path / "net.conf").write_text(f'include required(url("{listener.url}"))\n')
    home = tmp_path / "home"
    args = train_args(data, home) + ["--conf", tmp_path / "net.conf"]
    proc = run_cli(*args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "include" in proc.stderr and not home.exists() and not listener()


def test_environment_substitutions_are_allowed_and_checked(tmp_path, monkeypatch):
    """${VAR} falls back to the environment (HOCON); the value is a string, checked like a flag."""
    monkeypatch.setenv("NCF_FAST_TEST_NAME", "group/run")
    monkeypatch.setenv("NCF_FAST_TEST_STEPS", "7")
    (tmp_path / "env.conf").write_text("run { expname = ${NCF_FAST_TEST_NAME} }\n"
                                       "train { seed = ${?NCF_FAST_TEST_UNSET} }\n")
    cfg = config_mod.load_config(tmp_path / "env.conf")
    assert cfg["run.expname"] == "group/run" and cfg["train.seed"] == 0
    monkeypatch.setenv("NCF_FAST_TEST_NAME", "../run")
    with pytest.raises(config_mod.ConfigError, match="run.expname must be a relative folder"):
        config_mod.load_config(tmp_path / "env.conf")
    (tmp_path / "steps.conf").write_text("train { steps = ${NCF_FAST_TEST_STEPS} }\n")
    with pytest.raises(config_mod.ConfigError, match="train.steps must be an integer, got '7'"):
        config_mod.load_config(tmp_path / "steps.conf")


# ------------------------------------------------------------------------ 3. extreme values
@pytest.mark.parametrize("value", [1e30, 3e38, -2e19])
def test_values_that_overflow_float32_distances_are_refused(value, bad, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("huge")
    x = np.random.default_rng(0).standard_normal((60, 2)).astype(np.float32)
    x[5, 1] = value
    np.save(d / "huge.npy", x)
    bad(_train(bad, data, inp=d / "huge.npy"), "huge.npy", "row 5, column 1", "float32")
    with pytest.raises(ValueError, match="row 5, column 1"):
        NCF(2, hidden=(8,), device="cpu").fit(x, x + 1, steps=1, progress=False)
    with pytest.raises(ValueError, match="row 5, column 1"):
        check_samples(torch.from_numpy(x), "x")


def test_large_but_safe_values_still_train():
    x = np.random.default_rng(0).standard_normal((60, 2)) * 1e12 + 1e15
    check_samples(x, "x")
    ncf = NCF(2, hidden=(8,), device="cpu", seed=0).fit(x, x + 1e12, steps=2, progress=False)
    assert np.isfinite(ncf.transport(x)).all()


# ------------------------------------------------------------------------ 4. FIFO as input
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_refused_before_it_is_opened(data, tmp_path):
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    home = tmp_path / "home"
    for extra, what in ((["--input", fifo], "pipe.npy"), (["--conf", fifo], "pipe.npy")):
        proc = run_cli(*train_args(data, home), *extra, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and what in proc.stderr
        assert "not a regular file" in proc.stderr and not home.exists()
    with pytest.raises(ValueError, match="not a regular file"):
        read_checkpoint(fifo)


# ------------------------------------------------------------------- 5. maps before fit
def test_maps_of_an_unfitted_model_raise():
    ncf = NCF(2, hidden=(8,), device="cpu")
    x = np.zeros((3, 2), dtype=np.float32)
    for call in (ncf.transport, ncf.inverse, ncf.potential, lambda v: ncf.interpolate(v, 0.5)):
        with pytest.raises(ValueError, match="not fitted"):
            call(x)
    rng = np.random.default_rng(0)
    src, tgt = rng.standard_normal((40, 2)), rng.standard_normal((40, 2)) + 1
    ncf.make_trainer(src, tgt)  # a trainer (resume, callbacks) makes the maps usable
    assert ncf.transport(x).shape == (3, 2)
    assert NCF.from_checkpoint(ncf.to_checkpoint()).inverse(x).shape == (3, 2)


# --------------------------------------------------------------------------- 6. disk full
def _fill_disk_after(monkeypatch, checkpoints_ok: int):
    """Writes into checkpoints/ fail with ENOSPC after ``checkpoints_ok`` complete files."""
    real_fdopen = os.fdopen
    count = {"n": 0}

    class Full:
        def __init__(self, f):
            self.f, self.budget = f, 1000

        def write(self, b):
            if self.budget < len(b):
                raise OSError(errno.ENOSPC, "No space left on device")
            self.budget -= len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        if os.path.basename(os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))) == "checkpoints":
            count["n"] += 1
            if count["n"] > checkpoints_ok:
                return Full(f)
        return f
    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_says_so_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capfd):
    home = tmp_path / "home"
    old = os.umask(0o022)
    try:
        _fill_disk_after(monkeypatch, checkpoints_ok=2)  # step_000010.pt and latest.pt
        code = cli.main([str(a) for a in train_args(data, home, "--quiet")])
    finally:
        os.umask(old)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "no space left on device" in lines[-1] and "step_000020.pt" in lines[-1], err
    assert "--resume" in lines[-1]
    run_dir = (home / "exps" / "ncf")
    run_dir = run_dir / os.listdir(run_dir)[0]
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts == ["latest.pt", "step_000010.pt"]  # no temporary file left
    assert read_checkpoint(run_dir / "checkpoints" / "latest.pt")["trainer"]["step"] == 10
    # 9. files follow the umask like any file the user writes
    for name in ("setup.conf", "run.json", "log.csv", "checkpoints/latest.pt"):
        assert stat.S_IMODE(os.stat(run_dir / name).st_mode) == 0o644, name


def test_library_save_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    ncf = NCF(2, hidden=(8,), device="cpu")
    target = tmp_path / "checkpoints" / "model.pt"
    target.parent.mkdir()
    ncf.save(target)
    before = target.read_bytes()
    _fill_disk_after(monkeypatch, checkpoints_ok=0)
    with pytest.raises(OSError, match="No space left on device") as info:
        ncf.save(target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == before and os.listdir(target.parent) == ["model.pt"]


# ----------------------------------------------------------------------- 7. mkdir race
def test_two_runs_creating_exps_at_once(tmp_path, monkeypatch):
    """The other run makes H/exps between our check and our mkdir."""
    home = str(tmp_path / "home")
    real_mkdir = os.mkdir

    def racing_mkdir(path, *a, **k):
        if not os.path.exists(path) and os.path.basename(path) in ("home", "exps"):
            real_mkdir(path, *a, **k)  # the other process wins
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    run_dir, created = run_folder.create_run_dir(home, "ncf")
    assert os.path.isdir(os.path.join(run_dir, "checkpoints"))
    assert created == [os.path.join(home, "exps", "ncf")]  # only what this call made


# ------------------------------------------------------------- 8. a flag hides a bad value
def test_a_flag_does_not_hide_an_invalid_file_value(bad, data, tmp_path):
    d = tmp_path / "confs"
    d.mkdir()
    (d / "steps.conf").write_text('train { steps = "abc" }\n')
    with pytest.raises(config_mod.ConfigError, match="'abc'"):
        config_mod.load_config(d / "steps.conf", {"train.steps": 50})
    bad(_train(bad, data, conf=d / "steps.conf", extra=["--steps", "50"]), "steps.conf",
        "train.steps", "'abc'")


# --------------------------------------------------------------------------- 9. file modes
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        NCF(2, hidden=(8,), device="cpu").save(tmp_path / "m.pt")
        run_folder.write_npy(str(tmp_path / "y.npy"), np.zeros((2, 2)))
        run_folder.write_text(str(tmp_path / "t.txt"), "x\n")
    finally:
        os.umask(old)
    for name in ("m.pt", "y.npy", "t.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


# ------------------------------------------------------------------------- 10. config size
def test_a_huge_setup_conf_is_refused_at_once(bad, data, tmp_path):
    d = tmp_path / "confs"
    d.mkdir()
    (d / "big.conf").write_text("# padding\n" * 20_000 + "train.steps = 5\n")
    bad(_train(bad, data, conf=d / "big.conf"), "big.conf", "KiB")


def test_deep_bracket_nesting_is_refused_before_pyhocon(bad, data, tmp_path):
    """pyhocon's time grows exponentially with nesting: 3000 '[' in a small file hung it."""
    d = tmp_path / "deep"
    d.mkdir()
    (d / "deep.conf").write_text("train {\n  steps = 5\n  x = " + "[" * 3000 + "\n}\n")
    bad(_train(bad, data, conf=d / "deep.conf"), "deep.conf", "line 3", "nested more than")
    # brackets inside strings and comments do not count; the documented file nests 3 deep
    (d / "ok.conf").write_text('# ' + "[" * 40 + '\nrun { expname = "a' + "[" * 40 + '" }\n')
    assert config_mod.load_config(str(d / "ok.conf"))["run.expname"].startswith("a[")
    assert config_mod._too_deep(open(os.path.join(cli_repo(), "setup.conf")).read()) is None


def test_an_unterminated_triple_quote_is_scanned_in_linear_time(tmp_path):
    """The include scan's string pattern once backtracked exponentially in the lines after an
    unterminated triple quote (a 60-line file would have run for years)."""
    path = tmp_path / "open.conf"
    path.write_text('run { expname = """x\n' + "  # line\n" * 60)

    def hang(signum, frame):
        raise TimeoutError("the scan hung")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        with pytest.raises(config_mod.ConfigError, match="open.conf"):
            config_mod.load_config(str(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli_repo():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- 11. messages
def test_messages_in_the_users_words(bad, data, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "script.conf").write_text("import os\nx = {'a': 1}\nprint(x)\n")
    line = bad(_train(bad, data, conf=d / "script.conf"), "script.conf", "not valid HOCON at line 2")
    assert "Suppress" not in line and "{{" not in line and len(line) < 300
    pickle.dump({"format": "x", "weights": [1, 2]}, open(d / "raw.pt", "wb"))
    (d / "text.pt").write_text("hello\n" * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning must not leak
        for name, needle in (("raw.pt", "plain pickle"), ("text.pt", "not a checkpoint")):
            with pytest.raises(ValueError, match=needle) as info:
                read_checkpoint(d / name)
            assert "PyTorch 2.6" not in str(info.value) and "(101)" not in str(info.value)
    with pytest.raises(ValueError, match="is a directory"):
        read_checkpoint(d)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"only in source \[7\], only in target \[2\]"):
        NCF(2, hidden=(8,), device="cpu").fit(rng.standard_normal((30, 2)),
                                              rng.standard_normal((30, 2)),
                                              source_labels=np.array([0, 1, 7] * 10),
                                              target_labels=np.array([0, 1, 2] * 10),
                                              steps=1, progress=False)


def test_bad_checkpoint_values_are_refused(tmp_path):
    good = NCF(2, hidden=(8,), device="cpu").to_checkpoint()
    for key, value in (("scale", float("nan")), ("scale", -1.0), ("shift", [float("inf"), 0.0])):
        ckpt = dict(good, **{key: value})
        with pytest.raises(ValueError, match="not a valid ncf_fast checkpoint"):
            NCF.from_checkpoint(ckpt)
