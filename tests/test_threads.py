"""The CPU thread policy (ncf_fast/threads.py): CPUs from affinity and cgroup quota, the
threads setting, the load follower and the OpenMP wait policy."""
import os
import subprocess
import sys

import pytest
import torch

from ncf_fast import threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NCF_FAST_THREADS")}
    full.update(env, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    threads.set_threads(None)
    torch.set_num_threads(before)


def test_available_cpus_follows_affinity():
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("version, files, expect", [
    ("v2", {"cpu.max": "max 100000", "a/cpu.max": "150000 100000"}, 1.5),
    ("v2", {"cpu.max": "max 100000"}, None),
    ("v1", {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
    ("v1", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
])
def test_cgroup_quota(tmp_path, version, files, expect):
    fs = tmp_path / "fs"
    for name, text in files.items():
        (fs / name).parent.mkdir(parents=True, exist_ok=True)
        (fs / name).write_text(text + "\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/a\n" if version == "v2" else "4:cpu,cpuacct:/\n")
    assert threads._cgroup_quota(str(cgroup), str(fs)) == expect


def test_set_threads_and_its_errors(keep_threads, monkeypatch):
    assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.set_threads(bad)
    monkeypatch.setenv(threads.THREADS_ENV, "two")
    with pytest.raises(ValueError, match="NCF_FAST_THREADS"):
        threads.default_threads()
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    assert threads.default_threads() == 1


@pytest.mark.parametrize("others, expect", [(0, 2), (1, 1), (2, 1), (7, 1)])
def test_load_follower_leaves_the_busy_cpus(keep_threads, monkeypatch, others, expect):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "_others_running", lambda: others)
    threads.set_threads(None)  # not fixed: follow the load
    torch.set_num_threads(2)
    follower = threads.LoadFollower()
    assert follower.active and torch.get_num_threads() == expect  # decided before the first step
    monkeypatch.setattr(threads, "_others_running", lambda: 0)  # the others finish
    for _ in range(threads.LoadFollower.DECIDE_EVERY):
        follower.step()
    assert torch.get_num_threads() == 2
    follower.close()
    assert torch.get_num_threads() == 2


def test_load_follower_respects_a_fixed_count(keep_threads, monkeypatch):
    monkeypatch.setattr(threads, "_others_running", lambda: 5)
    threads.set_threads(2)
    follower = threads.LoadFollower()
    for _ in range(2 * threads.LoadFollower.DECIDE_EVERY):
        follower.step()
    assert not follower.active and torch.get_num_threads() == 2


def test_others_running_counts_processes():
    value = threads._others_running()
    assert value is None or value >= 0


def test_wait_policy_and_affinity_in_a_fresh_process():
    code = "import ncf_fast, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    # pinned to one CPU (as taskset -c 0 would) before import: one thread for torch
    pinned = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " + code
              + "; import torch; print(ncf_fast.threads.available_cpus(), torch.get_num_threads())")
    assert _python(pinned).split() == ["PASSIVE", "1", "1"]
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stays
    # torch first: libgomp has read its environment already, so ncf_fast leaves it alone
    assert _python("import torch; " + code) == "None"
