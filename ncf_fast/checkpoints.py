"""Checkpoint files: reading one with errors that say what is wrong with the file, and writing
any file atomically (a crash or a full disk leaves the old file or the new one, never half)."""
from __future__ import annotations

import errno
import os
import secrets
import warnings

import torch

from .data import check_regular_file

__all__ = ["FORMAT", "read_checkpoint", "write_atomic", "save_atomic", "DISK_FULL"]

FORMAT = "ncf_fast.checkpoint/1"


def read_checkpoint(path, time_axis: str | None = None, beta: float | None = None) -> dict:
    """torch.load(weights_only=True) with errors that say what is wrong with the file.

    A checkpoint of the research code comes back converted (time_axis, beta: see
    :func:`ncf_fast.lineage.checkpoint_from_lineage`)."""
    path = os.fspath(path)
    check_regular_file(path, "checkpoint file")  # FileNotFoundError; a folder, a FIFO: ValueError
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK":  # torch.save writes a zip archive; a bare pickle starts with 0x80
        kind = ("a plain pickle file (torch.load would unpickle it)" if head[:1] == b"\x80"
                else "another kind of file, or a corrupted checkpoint")
        raise ValueError(f"{path}: not a checkpoint file: {kind}; ncf_fast checkpoints are the zip "
                         "archives written by NCF.save and ncf-fast train")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, EOFError, zip errors: all say "bad file"
        text = str(exc).strip()
        # torch says "Unsupported global" (allow-listable classes) or "unsupported GLOBAL ...
        # whose module is blocked" (os, builtins, subprocess): both mean a pickled object
        if "unsupported global" in text.lower():
            raise ValueError(f"{path}: refusing to load: the file holds pickled Python objects "
                             "(only tensors and plain data are allowed)") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        if first.lower().startswith("weights only load failed"):  # then torch's advice on 2.6
            first = "its data record is not plain tensors and values"
        raise ValueError(f"{path}: truncated or corrupted checkpoint ({first[:120]})") from None
    if isinstance(ckpt, dict) and "format" not in ckpt and (
            "model_state_dict" in ckpt or "optimizer_state_dict" in ckpt):  # the research code's
        from .lineage import checkpoint_from_lineage
        ckpt = {"format": FORMAT, **checkpoint_from_lineage(ckpt, path, time_axis, beta)}
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an ncf_fast checkpoint (missing format tag {FORMAT!r})")
    return ckpt


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # errno values of a full disk or quota


class _WriteRecorder:
    """A file object that remembers the OSError of a failed write: torch.save turns it into
    'unexpected pos', which no longer says that the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        try:
            return self.f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _disk_full(exc: BaseException, recorder) -> bool:
    seen = [getattr(recorder, "error", None)]
    while exc is not None and len(seen) < 20:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return any(isinstance(e, OSError) and e.errno in DISK_FULL for e in seen)


def write_atomic(path, write, suffix: str = "") -> None:
    """write(f) into a temporary file beside ``path``, fsync, then rename over ``path``: a crash
    leaves the old file or the new one, never half of one.

    The file gets mode 0o666 less the umask, like any file the user writes. A full disk (or
    quota) raises OSError(ENOSPC, ..., path) and leaves the old file as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)  # not mkstemp: it forces 0o600
            break
        except FileExistsError:
            continue
    recorder = None
    try:
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteRecorder(f)
            write(recorder)
            recorder.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and _disk_full(exc, recorder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
        raise


def save_atomic(obj, path) -> None:
    """torch.save through :func:`write_atomic`."""
    write_atomic(path, lambda f: torch.save(obj, f), suffix=".pt")
