"""Validation of user-supplied samples and labels: clear errors instead of silent garbage."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["check_samples", "check_labels"]


def _describe_nonfinite(arr: np.ndarray, name: str) -> str:
    bad = ~np.isfinite(arr)
    rows = np.nonzero(bad.any(axis=1))[0]
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    what = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if s)
    return (f"{name} contains {what} value(s) in {rows.size} row(s), first at row {int(rows[0])}; "
            "remove or impute those rows")


def check_samples(x, name: str = "samples", dim: int | None = None, min_samples: int = 2):
    """Check that x is a finite float array of shape (N, d) with N >= min_samples.

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
    if isinstance(x, torch.Tensor):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(_describe_nonfinite(x.detach().cpu().double().numpy(), name))
    elif not np.isfinite(x).all():
        raise ValueError(_describe_nonfinite(x, name))
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
            and np.array_equal(labels, np.round(labels)):
        return labels.astype(np.int64)
    raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
