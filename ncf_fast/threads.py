"""CPU thread policy: how many threads torch and the compiled C loops use, and how they wait.

Three things make a CPU fit collapse on a shared machine (README, "CPU threads"):

* **Spin-waiting.** torch's intra-op pool and ncf_fast's C loops (native.py) share one OpenMP
  runtime (the libgomp torch ships). By default a libgomp thread that reaches the end of a
  parallel region spins for a while before sleeping. When other processes occupy the cores, a
  thread that is descheduled holds up the others, which burn their time slices spinning.
  ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once. libgomp reads it once, when it is
  loaded, i.e. at ``import torch``: importing ncf_fast before torch (the CLI always does) sets
  it; a process that imported torch first keeps the policy it started with (set the variable
  in the shell to choose). A variable the user set is never overridden.
* **Too many threads.** torch sizes its pool from the CPUs it is allowed to run on, but not from
  a container's CPU quota (cgroup ``cpu.max`` / ``cpu.cfs_quota_us``), so a quota of 2 CPUs on a
  64-core host would start 64 threads. :func:`available_cpus` takes both into account, and
  :func:`apply_default` (run when ncf_fast is imported) lowers torch's thread count to it; it
  never raises it, and leaves it alone when ``OMP_NUM_THREADS`` or ``NCF_FAST_THREADS`` is set.
* **Other busy processes.** Even with passive waiting, two threads that share two cores with
  two busy processes wait on each other at every parallel region. A CPU fit therefore watches
  the machine (:class:`LoadFollower`): every few steps it counts the runnable tasks that are not
  its own (``/proc/loadavg`` minus this process's running threads), and before the first step
  and every 50 steps after it sets its thread count to the CPUs left free (at least 1, at most
  the count it started with). This works whatever was imported first, which the wait policy
  does not. The thread count changes the order of floating-point sums: runs that must repeat
  bit for bit fix the count (below).

The setting: :func:`set_threads` (``ncf-fast --threads N``, or ``NCF_FAST_THREADS=N`` in the
environment) fixes the count for torch and the C loops together (they read
``torch.get_num_threads()``); a fixed count, or ``OMP_NUM_THREADS`` in the environment, turns
the load following off.

This module must not import torch at module level: ncf_fast/__init__ imports it first so that
the wait policy is in the environment before libgomp loads.
"""
from __future__ import annotations

import math
import os
import sys
import time

__all__ = ["available_cpus", "default_threads", "set_threads", "apply_default", "LoadFollower",
           "THREADS_ENV", "WAIT_POLICY"]

THREADS_ENV = "NCF_FAST_THREADS"
# passive: an idle OpenMP thread sleeps instead of spinning (measured beside busy processes:
# README, "CPU threads")
WAIT_POLICY = "PASSIVE"


def _set_wait_policy():
    """OMP_WAIT_POLICY=PASSIVE unless the user chose one, and only while libgomp is not loaded
    yet (it reads the variable once, at load: later it would only mislead a reader of the env)."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY


_set_wait_policy()


def _cgroup_quota(cgroup_file: str = "/proc/self/cgroup", fs: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the cgroup quota allows this process (cgroup v2 ``cpu.max`` along the process's
    cgroup path, or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), None without a quota."""
    limits = []
    try:
        with open(cgroup_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: every level of the hierarchy may carry a cpu.max
            parts = [p for p in path.strip("/").split("/") if p]
            for k in range(len(parts), -1, -1):
                text = _read(os.path.join(fs, *parts[:k], "cpu.max"))
                if text and text.split()[0] != "max":
                    quota, period = text.split()[:2]
                    limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):
            for base in (os.path.join(fs, "cpu,cpuacct"), os.path.join(fs, "cpu")):
                for sub in (path.strip("/"), ""):
                    quota = _read(os.path.join(base, sub, "cpu.cfs_quota_us"))
                    period = _read(os.path.join(base, sub, "cpu.cfs_period_us"))
                    if quota and period and int(quota) > 0:
                        limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may actually use: its affinity mask (``taskset``, cpusets), capped by the
    cgroup CPU quota (rounded up: a quota of 1.5 CPUs still runs 2 threads), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def default_threads() -> int:
    """``NCF_FAST_THREADS`` if set (a positive integer), else :func:`available_cpus`."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{THREADS_ENV}={text!r}: expected a positive integer number of threads")
        return int(text)
    return available_cpus()


_fixed = False  # set_threads(n) was called: the user chose, no load following


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads in torch and ncf_fast's C loops and stop following the
    machine's load (None: :func:`default_threads`, and follow the load again); returns the count
    now in use. A process-wide setting, like ``torch.set_num_threads``."""
    import torch

    global _fixed
    _fixed = threads is not None
    if threads is None:
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _others_running() -> int | None:
    """Runnable tasks on the machine that are not this process's threads (None off Linux)."""
    try:
        with open("/proc/loadavg") as f:
            total = int(f.read().split()[3].split("/")[0])
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, total - own)


class LoadFollower:
    """Thread count of a CPU fit that follows the other processes' load (see the module doc).

    Call :meth:`step` once per training step and :meth:`close` at the end (restores the count
    the fit started with). Inactive (every call a no-op) when the count is fixed by
    :func:`set_threads`, ``NCF_FAST_THREADS`` or ``OMP_NUM_THREADS``, or off Linux."""

    SAMPLE_EVERY = 5    # steps between samples: one costs ~0.1 ms, a 2-D step ~10-20 ms
    DECIDE_EVERY = 50   # steps between decisions, from the median of the samples since the last
    # the median, not the latest sample: a short-lived process (a shell command, a compiler)
    # must not halve a fit's threads for 50 steps

    def __init__(self):
        import torch

        self._torch = torch
        self.start = torch.get_num_threads()
        self.active = (not _fixed and not os.environ.get(THREADS_ENV, "").strip()
                       and not os.environ.get("OMP_NUM_THREADS") and self.start > 1
                       and _others_running() is not None)
        self.cpus = min(self.start, available_cpus())
        self.samples: list[int] = []
        self.steps = 0
        if self.active:  # the first decision before the first step: 5 samples over ~5 ms
            for _ in range(5):
                self.samples.append(_others_running() or 0)
                time.sleep(0.001)
            self._decide()

    def step(self):
        if not self.active:
            return
        self.steps += 1
        if self.steps % self.SAMPLE_EVERY == 0:
            others = _others_running()
            if others is not None:
                self.samples.append(others)
        if self.steps % self.DECIDE_EVERY == 0 and self.samples:
            self._decide()

    def _decide(self):
        others = sorted(self.samples)[len(self.samples) // 2]
        self.samples.clear()
        want = max(1, min(self.start, self.cpus - others))
        if want != self._torch.get_num_threads():
            self._torch.set_num_threads(want)

    def close(self):
        if self.active and self._torch.get_num_threads() != self.start:
            self._torch.set_num_threads(self.start)


def apply_default() -> int:
    """The import-time policy: NCF_FAST_THREADS if set; else lower torch's thread count to
    :func:`available_cpus` if it is above (an explicit OMP_NUM_THREADS is left alone)."""
    import torch

    if os.environ.get(THREADS_ENV, "").strip():
        return set_threads(default_threads())
    if not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > available_cpus():
        torch.set_num_threads(available_cpus())
    return torch.get_num_threads()
