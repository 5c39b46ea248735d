"""Validation of user-supplied samples, labels and input files: clear errors instead of silent
garbage or a blocked read."""
from __future__ import annotations

import os
import stat

import numpy as np
import torch

__all__ = ["check_samples", "check_labels", "check_regular_file", "magnitude_limit"]

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
