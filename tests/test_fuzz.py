"""Seeded fuzzing of everything a user hands to ncf-fast: .npy sample and label files, checkpoints,
setup.conf files and in-memory arrays.

Each mutated input goes through the CLI's loaders (in-process) or the library's checks and must
either load or raise the documented clean error (CLIError / ConfigError / ValueError / TypeError /
FileNotFoundError): no other exception, no warning, no hang (a 20 s alarm per case), no file
written, no network connection and no file opened besides the one under test.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import signal
import socket
import warnings

import numpy as np
import pytest
import torch

from ncf_fast import NCF, cli
from ncf_fast.cli import inputs
from ncf_fast import config as config_mod
from ncf_fast.data import check_labels, check_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 14
CLEAN = (cli.CLIError, config_mod.ConfigError, ValueError, TypeError, FileNotFoundError)


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _guard(case: str, allowed_file: str | None):
    """Fail on a hang, a warning, a connection or an open() of any other file."""
    opened, connects = [], []
    real_open = builtins.open

    def spy_open(path, *a, **k):
        opened.append(os.fspath(path) if isinstance(path, (str, os.PathLike)) else path)
        return real_open(path, *a, **k)

    def spy_connect(self, *a, **k):
        connects.append(a)
        raise OSError("network access in a fuzz case")

    def alarm(signum, frame):
        raise _Hang(case)
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
            patch.setattr(builtins, "open", spy_open)
            patch.setattr(socket.socket, "connect", spy_connect)
            warnings.simplefilter("error")
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not connects, f"{case}: tried to connect to {connects}"
    others = [p for p in opened if isinstance(p, str) and p != allowed_file]
    assert not others, f"{case}: opened {others}"


def _run(case, fn, allowed_file):
    try:
        with _guard(case, allowed_file):
            fn()
        return "loaded"
    except CLEAN as exc:
        msg = str(exc)
        assert msg and "\n" not in msg.strip() and "Traceback" not in msg, f"{case}: {msg!r}"
        return "refused"
    except _Hang:
        pytest.fail(f"{case}: hung")
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------- mutations
def _mutate_bytes(rng, raw: bytes) -> bytes:
    raw = bytearray(raw)
    op = rng.integers(6)
    if op == 0:  # flip a few bytes
        for i in rng.integers(0, len(raw), rng.integers(1, 8)):
            raw[i] ^= int(rng.integers(1, 256))
    elif op == 1:  # truncate
        del raw[rng.integers(0, len(raw)):]
    elif op == 2:  # insert garbage
        at = rng.integers(0, len(raw) + 1)
        raw[at:at] = rng.bytes(int(rng.integers(1, 64)))
    elif op == 3:  # duplicate a slice
        a = int(rng.integers(0, len(raw)))
        raw[a:a] = raw[a:a + int(rng.integers(1, 200))]
    elif op == 4:  # zero a slice
        a = int(rng.integers(0, len(raw)))
        raw[a:a + int(rng.integers(1, 64))] = b"\0" * len(raw[a:a + 64])
    else:  # flip a byte in the first 128 (headers, zip local header)
        raw[int(rng.integers(0, min(128, len(raw))))] ^= 0xFF
    return bytes(raw)


DESCRS = ["<f4", "<f8", ">f8", "<f2", "<i8", "|u1", "|b1", "<c8", "<U3", "|S4", "|O", "|V8",
          "<M8[s]", [("a", "<f4"), ("b", "<f4")], "<f16", "bogus"]
SHAPES = [(), (0,), (0, 2), (7,), (7, 2), (7, 0), (3, 2, 2), (2 ** 40, 2), (-1, 2), (7, 2.5),
          "x"]


def _npy_with_header(rng) -> bytes:
    """A .npy file whose header says something its data may not back up."""
    descr = DESCRS[rng.integers(len(DESCRS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    header = (f"{{'descr': {descr!r}, 'fortran_order': {bool(rng.integers(2))}, "
              f"'shape': {shape!r}, }}")
    header += " " * ((-len(header) - 11) % 64) + "\n"
    data = rng.standard_normal(int(rng.integers(0, 40))).astype(np.float32).tobytes()
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


def _valid_npy(rng, path) -> bytes:
    choice = rng.integers(5)
    if choice == 0:
        arr = rng.standard_normal((int(rng.integers(1, 30)), int(rng.integers(1, 4))))
    elif choice == 1:
        arr = rng.integers(-5, 5, size=int(rng.integers(1, 40)))
    elif choice == 2:
        arr = (rng.standard_normal((20, 2)) * 10.0 ** rng.integers(-40, 40)).astype(np.float32)
    elif choice == 3:
        arr = rng.standard_normal((20, 2)) * 10.0 ** rng.integers(15, 300)
    else:
        arr = rng.standard_normal((10, 2)).astype(np.float16)
    np.save(path, arr)
    return open(path, "rb").read()


CONF_TOKENS = ["{", "}", "[", "]", '"', '"""', "=", ":", ",", "\n", "#", "//", "\\", "${", "${?",
               "}", "null", "true", "1e400", "-1", "0", "3.5", "include", 'include "x.conf"',
               'include url("http://127.0.0.1:9/x")', "include required(file(\"/etc/hosts\"))",
               "train", "model", "run", "steps", "expname", "../x", "/abs", "+=", "\t", "\0",
               "\u00e9", "\ufeff", "train.steps = ", "run.expname = ", "${HOME}", "${PATH}"]


def _mutate_conf(rng, text: str) -> str:
    for _ in range(int(rng.integers(1, 5))):
        at = int(rng.integers(0, len(text) + 1))
        op = rng.integers(3)
        if op == 0:
            text = text[:at] + CONF_TOKENS[rng.integers(len(CONF_TOKENS))] + text[at:]
        elif op == 1:
            text = text[:at] + text[at + int(rng.integers(1, 20)):]
        else:
            text = text[:at] + "[" * int(rng.integers(1, 3000)) + text[at:]
    return text


# ---------------------------------------------------------------------------------- tests
def test_fuzz_npy_files_through_the_cli_loaders(tmp_path, monkeypatch):
    rng = np.random.default_rng(SEED)
    monkeypatch.chdir(tmp_path)
    outcomes = []
    for k in range(160):
        path = str(tmp_path / f"case_{k}.npy")
        raw = _valid_npy(rng, path)
        raw = _npy_with_header(rng) if k % 4 == 0 else (_mutate_bytes(rng, raw) if k % 4 else raw)
        with open(path, "wb") as f:
            f.write(raw)
        outcomes.append(_run(f"npy case {k}", lambda: inputs.samples_file(path, "--input"), path))
        outcomes.append(_run(f"labels case {k}", lambda: inputs.labels_file(path, 20, "--labels"), path))
        os.unlink(path)
    assert os.listdir(tmp_path) == []
    assert outcomes.count("loaded") > 10 and outcomes.count("refused") > 100  # both paths ran


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    rng = np.random.default_rng(0)
    ncf = NCF(2, hidden=(8, 8), seed=0, device="cpu")
    ncf.make_trainer(rng.standard_normal((64, 2)), rng.standard_normal((64, 2)) + 1)
    ncf.transport(np.zeros((3, 2)))  # builds the native CPU passes now, not inside a timed case
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    ncf.save(path, include_trainer=True)
    return open(path, "rb").read(), ncf.to_checkpoint(include_trainer=True)


def _edit_checkpoint(rng, ckpt: dict) -> dict:
    ckpt = {**ckpt, "config": dict(ckpt["config"]), "state_dict": dict(ckpt["state_dict"])}
    edits = [
        lambda c: c.pop(["config", "state_dict", "shift", "scale", "format"][rng.integers(5)]),
        lambda c: c["config"].update(dim=["x", -1, 0, 3, 2.5, None][rng.integers(6)]),
        lambda c: c["config"].update(hidden=[[-1], [], "8", [8, 8, 8], None][rng.integers(5)]),
        lambda c: c["config"].update(activation=["relu", None, 3][rng.integers(3)]),
        lambda c: c["config"].update(dtype=["float16", "int64", None][rng.integers(3)]),
        lambda c: c["config"].update(cost=["power:3", "l1", None][rng.integers(3)]),
        lambda c: c["config"].update(t_final=[0.0, -1.0, float("nan"), "1"][rng.integers(4)]),
        lambda c: c.update(scale=[float("nan"), 0.0, -2.0, "s", float("inf")][rng.integers(5)]),
        lambda c: c.update(shift=[torch.zeros(3), torch.full((2,), float("nan")), "s"][rng.integers(3)]),
        lambda c: c["state_dict"].update({next(iter(c["state_dict"])): torch.full((1,), float("nan"))}),
        lambda c: c["state_dict"].update({k: v * float("nan") for k, v in c["state_dict"].items()}),
        lambda c: c.update(config=[None, [], "x"][rng.integers(3)]),
        lambda c: c.update(history=[None, 3, {"step": "x"}][rng.integers(3)]),
    ]
    edits[rng.integers(len(edits))](ckpt)
    return ckpt


def test_fuzz_checkpoints_through_the_cli_and_the_library(tmp_path, monkeypatch, checkpoint_bytes):
    raw_good, ckpt_good = checkpoint_bytes
    rng = np.random.default_rng(SEED + 1)
    monkeypatch.chdir(tmp_path)
    outcomes = []
    for k in range(120):
        path = str(tmp_path / f"case_{k}.pt")
        if k % 2:
            with open(path, "wb") as f:
                f.write(_mutate_bytes(rng, raw_good))
        else:
            torch.save(_edit_checkpoint(rng, ckpt_good), path)

        def load():
            inputs.load_model(path, torch.device("cpu"))
            model = NCF.load(path)
            out = model.transport(np.zeros((3, 2)))
            assert np.isfinite(out).all(), "a loaded model maps to NaN"
        outcomes.append(_run(f"checkpoint case {k}", load, path))
        os.unlink(path)
    assert os.listdir(tmp_path) == []
    assert outcomes.count("refused") > 60


def test_fuzz_setup_conf_files(tmp_path, monkeypatch):
    text = open(os.path.join(REPO, "setup.conf")).read()
    rng = np.random.default_rng(SEED + 2)
    monkeypatch.chdir(tmp_path)
    outcomes = []
    for k in range(150):
        path = str(tmp_path / f"case_{k}.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_mutate_conf(rng, text))
        outcomes.append(_run(f"conf case {k}", lambda: config_mod.load_config(path), path))
        os.unlink(path)
    assert os.listdir(tmp_path) == []
    assert outcomes.count("loaded") > 5 and outcomes.count("refused") > 50


def test_fuzz_arrays_through_the_library_checks():
    rng = np.random.default_rng(SEED + 3)
    dtypes = [np.float32, np.float64, np.float16, np.int64, np.bool_, np.complex64, object]
    outcomes = []
    for k in range(200):
        shape = [(20, 2), (20,), (0, 2), (1, 2), (20, 0), (4, 3, 2), (20, 1)][rng.integers(7)]
        arr = rng.standard_normal(shape) * 10.0 ** int(rng.integers(-5, 40))
        if arr.size and rng.integers(3) == 0:
            arr.flat[rng.integers(arr.size)] = [np.nan, np.inf, -np.inf, 1e300][rng.integers(4)]
        with np.errstate(all="ignore"):
            arr = arr.astype(dtypes[rng.integers(len(dtypes))])
        data = torch.from_numpy(arr) if arr.dtype.kind == "f" and rng.integers(2) else arr
        outcomes.append(_run(f"array case {k}", lambda: check_samples(data, "x", None), None))
        outcomes.append(_run(f"label case {k}", lambda: check_labels(data, 20, "labels"), None))
    assert outcomes.count("loaded") > 20 and outcomes.count("refused") > 100
