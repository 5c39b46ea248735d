"""Compiled CPU kernels: the energy distance's pair sums in low dimension, and the elementwise
passes of the torch backend's MLP sweeps.

Pair sums (cpu_pairs.c). In d <= MAX_D the torch path costs a dozen elementwise passes per block
of pairs (explicit differences in d <= 2, the Gram form with its near-pair fix above); one C loop
(explicit differences, fp32 arithmetic, double accumulators, vectorised over 64 columns, OpenMP
over rows) does the same sums faster up to MAX_D = 8; from d = 16 on the Gram form's GEMM is
faster (the timings: README, "Energy distance at scale").

MLP passes (cpu_mlp.c): for fp32 CPU tensors, each elementwise step of ncf_fast/torch_backend.py's
sweeps (activation with its derivative, input adjoint with the curvature, tangent, adjoint with
the bias gradient) as one vectorised loop instead of two to four torch ops (each op is a pass
over the (rows, width) block, so the loop saves memory traffic).

Each source is compiled on first use with the system C compiler (``CC`` or ``cc``) into a cache
folder (``NCF_FAST_CACHE``, else ``$XDG_CACHE_HOME/ncf_fast`` or ``~/.cache/ncf_fast``), once per
source, compiler and CPU (the build uses -march=native); the write is atomic, so concurrent
ranks are safe. Without a compiler (or glibc's vector math library, for the MLP passes), or with
``NCF_FAST_NATIVE=0``, :func:`available` / :func:`mlp_usable` are False and the torch ops run:
the same results within fp32 rounding.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "pair_sums", "MAX_D", "DISABLE_ENV", "mlp_usable", "act_forward",
           "delta_curv", "tangent", "abar"]

MAX_D = 8
DISABLE_ENV = "NCF_FAST_NATIVE"
SOURCE = Path(__file__).with_name("cpu_pairs.c")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
          "-shared")
_LIBS = ("-lm",)  # after the source on the command line (libm's linker script brings libmvec)
# Columns per tile: each thread's share of the column gradient is tile x d doubles.
_TILE = 4096


def _cache_dir() -> Path:
    if os.environ.get("NCF_FAST_CACHE"):
        return Path(os.environ["NCF_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ncf_fast"


def _cpu_id() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the arch."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(line for line in text.splitlines()[:40]
                         if line.startswith(("model name", "flags"))).encode()
    except OSError:
        import platform
        return platform.machine().encode()


def _compile(source: Path) -> ctypes.CDLL | None:
    """Compile ``source`` into the cache (once per source, compiler, flags and CPU) and load it;
    None without a working compiler, or with NCF_FAST_NATIVE=0."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join((cc, *_FLAGS, *_LIBS)).encode()
                         + _cpu_id())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
            os.close(fd)
            try:
                subprocess.run([cc, *_FLAGS, str(source), "-o", tmp, *_LIBS], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None  # no working compiler, OpenMP or libmvec: the torch path runs instead


@functools.cache
def _library():
    lib = _compile(SOURCE)
    if lib is not None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.ncf_pair_sums.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr, i64,
                                      ctypes.c_int]
        lib.ncf_pair_sums.restype = ctypes.c_int
    return lib


def _check(status: int, what: str):
    if status != 0:
        raise RuntimeError(f"ncf_fast native {what} failed (status {status}); set "
                           f"{DISABLE_ENV}=0 to use the torch path")


def available() -> bool:
    """True when the kernel is compiled and loaded (compiles it on the first call)."""
    return _library() is not None


def usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`pair_sums` takes these inputs: fp32 CPU tensors with d <= MAX_D."""
    return (a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == torch.float32
            and b.dtype == torch.float32 and a.shape[1] <= MAX_D and available())


def pair_sums(a: torch.Tensor, b: torch.Tensor, grad_a: bool, grad_b: bool, same: bool):
    """(S, Ga, Gb) as :func:`ncf_fast.pair_sums.pair_distance_sums` returns them (S in float64,
    Ga and Gb in fp32, None when not asked for)."""
    n, d = a.shape
    m = b.shape[0]
    a = a.contiguous()
    bt = b.t().contiguous()
    rows = torch.zeros(n, dtype=torch.float64)
    ga = torch.zeros(n, d, dtype=torch.float64) if grad_a else None
    gb = torch.zeros(m, d, dtype=torch.float64) if grad_b else None
    status = _library().ncf_pair_sums(
        a.data_ptr(), bt.data_ptr(), n, m, d, int(same), rows.data_ptr(),
        ga.data_ptr() if grad_a else None, gb.data_ptr() if grad_b else None, _TILE,
        torch.get_num_threads())
    _check(status, "pair sums")
    return (rows.sum(), None if ga is None else ga.to(a.dtype),
            None if gb is None else gb.to(b.dtype))


# ---------------------------------------------------------------------------------------------
# The torch backend's elementwise passes (cpu_mlp.c): see ncf_fast/torch_backend.py for where they run.

MLP_SOURCE = Path(__file__).with_name("cpu_mlp.c")
_KIND = {"softplus": 0, "tanh": 1, "silu": 2}


@functools.cache
def _mlp_library():
    lib = _compile(MLP_SOURCE)
    if lib is not None:
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.ncf_act_forward.argtypes = [i32, ptr, ptr, ptr, ptr, i64, i64, i32]
        lib.ncf_delta_curv.argtypes = [i32, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i32]
        lib.ncf_tangent.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i32]
        lib.ncf_abar.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i32]
        for fn in (lib.ncf_act_forward, lib.ncf_delta_curv, lib.ncf_tangent, lib.ncf_abar):
            fn.restype = i32
    return lib


# tanh's compiled passes are left out of the torch backend: on some CPUs its weight gradients
# miss the float64 tolerance of tests/test_mlp.py (README, "Backends"); the passes stay tested
COMPILED_ACTIVATIONS = ("softplus", "silu")


def mlp_usable(x: torch.Tensor, act: str | None = None) -> bool:
    """Whether the MLP sweeps over rows of ``x`` (with activation ``act``) take the compiled
    elementwise passes: fp32 on the CPU, an activation in COMPILED_ACTIVATIONS, and the library
    compiled (its first call compiles it)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and (act is None or act in COMPILED_ACTIVATIONS) and _mlp_library() is not None)


def _ptr(t):
    return None if t is None else t.data_ptr()


def act_forward(act: str, a: torch.Tensor, bias: torch.Tensor):
    """(z, s'(a + b), pre) for a GEMM output a (rows, w), contiguous, which this consumes:
    softplus and tanh leave s'(a + b) in it, silu leaves a + b (pre; None for the others)."""
    rows, w = a.shape
    z = torch.empty_like(a)
    d1 = torch.empty_like(a) if act == "silu" else a
    _check(_mlp_library().ncf_act_forward(_KIND[act], a.data_ptr(), bias.contiguous().data_ptr(),
                                          z.data_ptr(), d1.data_ptr(), rows, w,
                                          torch.get_num_threads()), "activation")
    return z, d1, (a if act == "silu" else None)


def delta_curv(act: str, g: torch.Tensor, d1: torch.Tensor, aux, with_curv: bool):
    """(delta, curv) = (g s'(a), g s''(a)) (curv None unless with_curv: the backward needs it for
    silu only, see :func:`tangent`); g (rows, w) or one row
    (1, w) shared by all rows; aux: y = s(a) for tanh, a for silu, unused for softplus."""
    rows, w = d1.shape
    g = g.contiguous()
    if g.shape not in ((rows, w), (1, w)):
        raise ValueError(f"g must have shape ({rows}, {w}) or (1, {w}), got {tuple(g.shape)}")
    delta = torch.empty_like(d1)
    curv = torch.empty_like(d1) if with_curv else None
    _check(_mlp_library().ncf_delta_curv(_KIND[act], g.data_ptr(), w if g.shape[0] == rows else 0,
                                         d1.data_ptr(), _ptr(aux), delta.data_ptr(), _ptr(curv),
                                         rows, w, torch.get_num_threads()), "input gradient")
    return delta, curv


def tangent(act: str, d1: torch.Tensor, curv, delta, y, adot: torch.Tensor) -> torch.Tensor:
    """zdot = s'(a) adot, returned; adot becomes g s''(a) adot in place, with g s''(a) given
    (curv: silu) or formed from delta = g s'(a) (softplus; tanh with y = s(a))."""
    zdot = torch.empty_like(adot)
    _check(_mlp_library().ncf_tangent(_KIND[act], d1.data_ptr(), _ptr(curv), _ptr(delta), _ptr(y),
                                      adot.data_ptr(), zdot.data_ptr(), adot.numel(),
                                      torch.get_num_threads()), "tangent")
    return zdot


def abar(bend, zbar: torch.Tensor, d1: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """[bend +] zbar s'(a), written over bend (else over zbar) and returned; its column sums are
    added to bias_grad (w,) in place."""
    out = zbar if bend is None else bend
    rows, w = zbar.shape
    _check(_mlp_library().ncf_abar(_ptr(bend), zbar.data_ptr(), d1.data_ptr(), out.data_ptr(),
                                   bias_grad.data_ptr(), rows, w, torch.get_num_threads()),
           "adjoint")
    return out
