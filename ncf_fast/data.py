"""Validation of user-supplied samples, labels and input files: clear errors instead of silent
garbage or a blocked read; loading sample and label arrays from .npy files."""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import torch

__all__ = ["check_samples", "check_labels", "check_regular_file", "magnitude_limit", "load_array",
           "load_labels", "first_line"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def magnitude_limit(dim: int) -> float:
    """Largest |value| a sample may have in dimension ``dim``: with |x|, |y| <= L the squared
    distance |x - y|^2 <= 4 d L^2 stays 4x below float32's maximum (the energy distance, the
    standardisation and the float32 model all square differences of samples)."""
    return float(np.sqrt(_FLOAT32_MAX / (16 * max(int(dim), 1))))


def check_regular_file(path, noun: str, max_bytes: int | None = None) -> os.stat_result:
    """os.stat of ``path`` if it is a regular file (symlinks followed), else a ValueError in the
    user's words; FileNotFoundError if it does not exist. Called before anything opens the file:
    opening a FIFO blocks until a writer appears, and a device never ends.

    noun: what the file should be ("config file", "checkpoint file"), used in the messages.
    max_bytes: refuse larger files (the message states the limit)."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {noun}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {noun} ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: is a directory, not a {noun}")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else
                "a socket" if stat.S_ISSOCK(info.st_mode) else "a device")
        raise ValueError(f"{path}: {kind}, not a regular file; the {noun} must be a regular file "
                         "(pipes and devices are not read)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ValueError(f"{path}: {info.st_size / 1024:.0f} KiB is larger than the "
                         f"{max_bytes // 1024} KiB limit for a {noun}")
    return info


def _describe_too_large(x, name: str, limit: float) -> str:
    flat = int(np.argmax(np.abs(x)))
    row, col = divmod(flat, x.shape[1])
    return (f"{name} has a value too large for float32 arithmetic: {float(x[row, col]):.3g} at row "
            f"{row}, column {col}; squared distances between samples would overflow. In dimension "
            f"{x.shape[1]} every |value| must be <= {limit:.2g}: rescale the data (e.g. divide by "
            "its standard deviation) and map the results back")


def _describe_nonfinite(arr: np.ndarray, name: str) -> str:
    bad = ~np.isfinite(arr)
    rows = np.nonzero(bad.any(axis=1))[0]
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    what = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if s)
    return (f"{name} contains {what} value(s) in {rows.size} row(s), first at row {int(rows[0])}; "
            "remove or impute those rows")


def check_samples(x, name: str = "samples", dim: int | None = None, min_samples: int = 2):
    """Check that x is a finite float array of shape (N, d) with N >= min_samples and every
    |value| <= :func:`magnitude_limit` (d) (about 4.6e18 / sqrt(d): larger values overflow the
    float32 squared distances).

    Accepts numpy arrays and torch tensors and returns x unchanged (no copy). Raises TypeError for
    non-array or non-float input and ValueError for bad shape, too few rows or NaN/Inf.
    """
    if isinstance(x, torch.Tensor):
        dtype_ok = x.dtype.is_floating_point
        dtype = str(x.dtype).replace("torch.", "")
    elif isinstance(x, np.ndarray):
        dtype_ok = np.issubdtype(x.dtype, np.floating)
        dtype = str(x.dtype)
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape (N, d) "
                        f"(or a sampler n -> (n, d)), got {type(x).__name__}")
    if not dtype_ok:
        raise TypeError(f"{name} has dtype {dtype}; samples must be floating point "
                        "(convert with .astype(np.float32) or .float())")
    if x.ndim != 2:
        hint = " (for 1-D data use x.reshape(-1, 1))" if x.ndim == 1 else ""
        raise ValueError(f"{name} must have shape (N, d), got shape {tuple(x.shape)}{hint}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: it needs at least one coordinate")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the model has dim={dim}")
    if x.shape[0] < min_samples:
        raise ValueError(f"{name} has {x.shape[0]} sample(s); at least {min_samples} are needed")
    if x.shape[0] == 0:
        return x
    limit = magnitude_limit(x.shape[1])
    if isinstance(x, torch.Tensor):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(_describe_nonfinite(x.detach().cpu().double().numpy(), name))
        if max(float(x.max()), -float(x.min())) > limit:  # no |x| copy of the data
            raise ValueError(_describe_too_large(x.detach().cpu().double().numpy(), name, limit))
    else:
        if not np.isfinite(x).all():
            raise ValueError(_describe_nonfinite(x, name))
        if max(float(x.max()), -float(x.min())) > limit:
            raise ValueError(_describe_too_large(x, name, limit))
    return x


def check_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    """Check class labels: integers (or integral floats), shape (n,); returns an int64 numpy array."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if not isinstance(labels, np.ndarray):
        if isinstance(labels, (list, tuple)):
            labels = np.asarray(labels)
        else:
            raise TypeError(f"{name} must be an integer array of shape (N,), got {type(labels).__name__}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but there are {n} samples; "
                         "give one label per sample")
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() \
            and np.array_equal(labels, np.round(labels)) and np.abs(labels).max(initial=0) < 2 ** 53:
        return labels.astype(np.int64)  # integral floats below 2^53 convert exactly
    raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")


def first_line(exc) -> str:
    """An exception's message on one line (at most 160 characters), for one-line errors."""
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:160]


def load_array(path: str, what: str) -> np.ndarray:
    """A numeric (N, d) sample array from a .npy file, or a ValueError naming the file and the
    problem (FileNotFoundError if it does not exist); ``what`` names the array in the messages.

    Never unpickles (allow_pickle=False). Integer arrays are converted to float64, float16 to
    float32; anything else non-float (bool, complex, strings, records, objects) is refused.
    """
    arr = _load_npy(path, what)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind != "f":
        raise ValueError(f"{path}: {what} has non-numeric dtype {arr.dtype}; samples must be "
                         "real numbers (save a float array)")
    try:
        check_samples(arr, path)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return np.ascontiguousarray(arr)


def load_labels(path: str, n: int, what: str) -> np.ndarray:
    """Integer class labels (n,) from a .npy file, or a ValueError as :func:`load_array`."""
    arr = _load_npy(path, what)
    if arr.dtype.kind not in "iubf":
        raise ValueError(f"{path}: {what} has dtype {arr.dtype}; labels must be integers")
    try:
        return check_labels(arr, n, path)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{exc} (in {what})") from None


def _load_npy(path: str, what: str) -> np.ndarray:
    info = check_regular_file(path, f".npy file for {what}")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            if head == b"\x93NUMPY":
                f.seek(0)
                _check_npy_size(f, info.st_size)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if head != b"\x93NUMPY":
        kind = ("a zip archive (.npz?); save one array with numpy.save" if head.startswith(b"PK")
                else "no NumPy header; save the array with numpy.save")
        raise ValueError(f"{path}: not a .npy file ({kind})")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise ValueError(f"{path}: {what} is an object (pickled) array; refusing to unpickle "
                             "it: save a numeric array instead") from None
        raise ValueError(f"{path}: truncated or corrupted .npy file ({first_line(exc)})") from None
    except Exception as exc:  # EOFError, OSError, UnicodeError from a mangled header
        raise ValueError(f"{path}: truncated or corrupted .npy file ({first_line(exc)})") from None
    if arr.dtype.hasobject:
        raise ValueError(f"{path}: {what} holds Python objects; save a numeric array instead")
    return arr


def _check_npy_size(f, size: int):
    """The header's shape times the item size against the bytes on disk, before numpy allocates
    the array a (possibly mangled) header asks for."""
    fmt = np.lib.format
    try:
        reader = {(1, 0): fmt.read_array_header_1_0,
                  (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(f))
        if reader is None:  # format 3.0 (utf-8 header): np.load checks it
            return
        shape, _, dtype = reader(f)
    except Exception:  # noqa: BLE001 - a mangled header: np.load names the problem below
        return
    if dtype.hasobject:
        return
    need = math.prod(shape) * dtype.itemsize
    if need > size - f.tell():
        raise ValueError(f"{f.name}: truncated or corrupted .npy file (its header says shape "
                         f"{tuple(shape)} of {dtype}, {need} bytes, but the file holds "
                         f"{size - f.tell()})")
