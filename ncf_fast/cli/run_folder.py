"""The run folder ``HOME/exps/NAME/<timestamp>/`` and the files written into it atomically: made
whole or not at all, removed again when a run fails before its first checkpoint."""
from __future__ import annotations

import datetime
import os
import shutil

import numpy as np

from ..checkpoints import write_atomic
from .errors import CLIError

__all__ = ["check_printable", "check_home", "create_run_dir", "remove_run", "write_npy",
           "write_text", "disk_full_message"]


def write_npy(path: str, arr: np.ndarray):
    write_atomic(path, lambda f: np.save(f, arr, allow_pickle=False))


def write_text(path: str, text: str):
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def check_printable(path: str, what: str):
    """Paths printed as the last stdout line: a newline in them would break that contract."""
    bad = next((c for c in str(path) if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise CLIError(f"{what} {str(path)!r} contains the control character {bad!r}")


def check_home(home: str) -> str:
    """Absolute home_dir, refused early if it cannot hold a run folder (nothing is created)."""
    check_printable(home, "home_dir")
    home = os.path.abspath(os.path.expanduser(home))
    probe = home
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise CLIError(f"home_dir {home} is not writable: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"home_dir {home} is not writable (permission denied on {probe}); "
                       "pass --home_dir with a folder you can write")
    return home


def create_run_dir(home: str, expname: str) -> tuple[str, list[str]]:
    """Make HOME/exps/EXPNAME/<timestamp>/ with checkpoints/ and plots/.

    Returns (run folder, the parent folders this call created, outermost first), so that a run
    failing before its first checkpoint removes exactly what it made (:func:`remove_run`)."""
    parent = os.path.join(home, "exps", expname)
    missing, probe = [], parent
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    created, run_dir = [], None
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
                created.append(folder)
            except FileExistsError:  # another run made it a moment ago: share it
                if not os.path.isdir(folder):
                    raise
        for k in range(1, 1000):  # two runs started in the same second get _2, _3, ...
            try:
                run_dir = os.path.join(parent, stamp if k == 1 else f"{stamp}_{k}")
                os.mkdir(run_dir)
                break
            except FileExistsError:
                run_dir = None
        os.mkdir(os.path.join(run_dir, "checkpoints"))
        os.mkdir(os.path.join(run_dir, "plots"))
    except OSError as exc:
        remove_run(run_dir, created)
        raise CLIError(f"home_dir {home} is not writable ({exc.strerror}: {exc.filename})") from None
    return run_dir, created


def remove_run(run_dir: str | None, created: list[str]):
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    for folder in reversed(created):
        try:
            os.rmdir(folder)  # only if still empty
        except OSError:
            pass


def disk_full_message(path: str, run_dir: str | None = None) -> str:
    """What to do after ENOSPC: where the last complete checkpoint is and how to continue."""
    latest = os.path.join(run_dir, "checkpoints", "latest.pt") if run_dir else None
    if latest and os.path.exists(latest):
        return (f"no space left on device writing {path}; {latest} still holds the last complete "
                f"checkpoint: free some space, then continue with ncf-fast train --resume {run_dir}")
    return f"no space left on device writing {path}; free some space and run again"
