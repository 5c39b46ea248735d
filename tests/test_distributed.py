"""Training on 2 processes (gloo, CPU): gradients and a 20-step trajectory equal a single process's
on the union of the ranks' batches, only rank 0 writes, a failing rank ends the job with a clear
message, Ctrl-C on one rank stops both after the same step, and ``torchrun -m ncf_fast train``
runs and resumes with the same or a different number of ranks.

The ranks are real processes. Library-level workers are functions of this file, started as
``python tests/test_distributed.py WORKER DIR`` with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set by :func:`launch`; the CLI runs go through torchrun
itself (``python -m torch.distributed.run``) or the same hand-made environment where a test
needs ranks with different arguments. Each rank uses one thread.

How the single process is given exactly the union of the ranks' batches: every rank records
what its trainer draws (samples, labels, collocation points, in call order); the single process
(batch sizes doubled) replays, call by call, the concatenation of rank 0's and rank 1's draws.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# every test starts two or more processes that import torch and train (-m "not slow" leaves
# them out)
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
# passive_age 4 (not the default 1): with 8 fresh passive rows a step instead of 32, drawn with
# replacement from 150 rows per rank, an active and a passive sample rarely come from the same
# source row. When they do, the two pushes are equal or one ulp apart depending on the batch
# shape, and |a - c|'s gradient jumps at a = c: at age 1 the trajectories parted at step 11 by
# 5e-5 relative (float64); with 30,000 source rows instead of 300 (ties 100x rarer) the age-1
# runs agreed to 1e-9 again, so it is that jump, not a distributed-sum error.
CFG = dict(batch_size=32, mmd_batch_size=32, mmd_active=8, warmup=5, eval_every=10, holdout=32,
           passive_age=4)
# the four loss paths: witness / U-statistic, plain / class-conditional
CASES = {"witness": (8, False), "witness_labels": (8, True), "ustat": (0, False),
         "ustat_labels": (0, True)}
TRAJECTORY_STEPS = 20
CLI_STEPS = 30
TINY_CONF = f"""
train {{ steps = {CLI_STEPS}, batch_size = 32, mmd_batch_size = 32, mmd_active = 8, warmup = 5,
        eval_every = 10, holdout = 32 }}
model {{ hidden = [16, 16] }}
run {{ checkpoint_every = 10, plot_points = 200 }}
"""


def _data():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((300, 2)).astype(np.float32)
    tgt = (rng.standard_normal((280, 2)) * [1.5, 0.5] + [1.0, -0.5]).astype(np.float32)
    return src, tgt, np.arange(300) % 2, np.arange(280) % 2


def _env(extra=None):
    env = dict(os.environ)
    for key in ("NCF_FAST_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO, **(extra or {}))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argvs, cwds, extra_env=None):
    """One process per rank with torchrun's environment; argvs[r] and cwds[r] are rank r's."""
    port = str(_free_port())
    procs = []
    for rank, (argv, cwd) in enumerate(zip(argvs, cwds)):
        env = _env({"RANK": str(rank), "WORLD_SIZE": str(len(argvs)), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(extra_env or {})})
        procs.append(subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def launch_workers(worker, folder, extra_env=None):
    argv = [os.path.abspath(__file__), worker, folder]
    return launch([argv] * WORLD, [folder] * WORLD, extra_env)


def finish(procs, timeout=150):
    """[(returncode, stdout, stderr)] of every rank; kills them all if one outlives timeout."""
    end, out = time.monotonic() + timeout, []
    try:
        for p in procs:
            so, se = p.communicate(timeout=max(end - time.monotonic(), 1))
            out.append((p.returncode, so, se))
    finally:
        stop(procs)
    return out


def stop(procs):
    """Kill the ranks still running (a test that failed half-way, or a rank left hanging)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def torchrun(*args, cwd, nproc=WORLD, timeout=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(_free_port()), "-m", "ncf_fast", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args, cwd, timeout=150):
    return subprocess.run([sys.executable, "-m", "ncf_fast", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- draws: record, replay
def _record(trainer, log):
    """Append every draw of the trainer (kind, x, labels or t) to log, in call order."""
    for kind, sample_set in (("source", trainer.source), ("target", trainer.target)):
        def draw(n, gen, _draw=sample_set.draw, _kind=kind):
            x, lab = _draw(n, gen)
            log.append((_kind, x.clone(), None if lab is None else lab.clone()))
            return x, lab
        sample_set.draw = draw
    colloc = trainer.collocation.draw

    def draw_points(n, source, target, gen, pushes=None):
        x, t = colloc(n, source, target, gen, pushes)
        log.append(("collocation", x.clone(), t.clone()))
        return x, t
    trainer.collocation.draw = draw_points


def _replay(trainer, logs):
    """Make the trainer's draws return the union (rank order) of the ranks' recorded draws."""
    assert len({len(log) for log in logs}) == 1
    union = iter([(rows[0][0], torch.cat([r[1] for r in rows]),
                   None if rows[0][2] is None else torch.cat([r[2] for r in rows]))
                  for rows in zip(*logs)])

    def take(kind, n):
        got, x, extra = next(union)
        assert got == kind, f"draw order differs: {got} recorded, {kind} drawn"
        # the single process asks for exactly the union's size (batch sizes doubled)
        assert x.shape[0] == n or (kind != "collocation" and x.shape[0] >= n), (kind, n, x.shape)
        return x, extra
    trainer.source.draw = lambda n, gen: take("source", n)
    trainer.target.draw = lambda n, gen: take("target", n)
    trainer.collocation.draw = lambda n, s, t, gen, pushes=None: take("collocation", n)
    return union


def _make(case, world_scale=1, dtype="float32"):
    """NCF + trainer for a case; world_scale multiplies the per-rank batch sizes."""
    from ncf_fast import NCF
    from ncf_fast.trainer import TrainConfig
    active, labelled = CASES[case]
    src, tgt, ls, lt = _data()
    ncf = NCF(2, hidden=(16, 16), seed=5, device="cpu", dtype=dtype)
    cfg = dict(CFG, mmd_active=active * world_scale, batch_size=CFG["batch_size"] * world_scale,
               mmd_batch_size=CFG["mmd_batch_size"] * world_scale, steps=TRAJECTORY_STEPS)
    labels = dict(source_labels=ls, target_labels=lt) if labelled else {}
    trainer = ncf.make_trainer(src, tgt, TrainConfig(**cfg), **labels)
    return ncf, trainer


def _perturb(model):
    """Parameters away from the zero-last-layer start (where most gradients vanish)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))


# ---------------------------------------------------------------------------------- workers
def worker_record(folder: Path):
    """Every case: one step from perturbed parameters; then a 20-step float64 run."""
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    for case in CASES:
        ncf, trainer = _make(case)
        assert trainer.dist is not None and trainer.dist.world_size == WORLD
        _perturb(ncf.model)
        log = []
        _record(trainer, log)
        l_hj, l_mmd, _ = trainer.step()
        torch.save({"grads": [p.grad.clone() for p in ncf.model.parameters()],
                    "losses": (float(l_hj), float(l_mmd)), "draws": log},
                   folder / f"{case}_step_rank{rank}.pt")
    for case in ("witness", "ustat_labels"):
        ncf, trainer = _make(case, dtype="float64")
        log = []
        _record(trainer, log)
        trainer.run(progress=False, history=ncf.history)
        torch.save({"params": [p.detach().clone() for p in ncf.model.parameters()],
                    "history": ncf.history, "draws": log},
                   folder / f"{case}_run_rank{rank}.pt")
    torch.distributed.barrier()  # leave the group as the README tells scripts to
    torch.distributed.destroy_process_group()


def _failing_fit(action):
    from ncf_fast import NCF
    src, tgt, _, _ = _data()
    rank = int(os.environ["RANK"])

    def callback(step, logs):
        if rank == 1 and step == 3:
            action()
        return False
    NCF(2, hidden=(16, 16), seed=5, device="cpu").fit(
        src, tgt, steps=200, progress=False, callback=callback, **CFG)


def _boom():
    raise RuntimeError("rank 1 fails on purpose")


def worker_raise(folder: Path):
    _failing_fit(_boom)


def worker_hang(folder: Path):
    _failing_fit(lambda: time.sleep(120))


WORKERS = {"record": worker_record, "raise": worker_raise, "hang": worker_hang}


# ------------------------------------------------------------------ gradient and trajectory
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record")
    results = finish(launch_workers("record", folder))
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return folder


def _load(folder, name):
    return [torch.load(folder / name.format(rank=r), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_gradients_equal_single_process_on_the_union(recorded, case):
    ranks = _load(recorded, f"{case}_step_rank{{rank}}.pt")
    for g0, g1 in zip(ranks[0]["grads"], ranks[1]["grads"]):  # one all-reduce: the same bits
        assert torch.equal(g0, g1)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    ncf, trainer = _make(case, world_scale=WORLD)
    _perturb(ncf.model)
    union = _replay(trainer, [r["draws"] for r in ranks])
    l_hj, l_mmd, _ = trainer.step()
    assert next(union, None) is None  # every recorded draw was used
    single = [p.grad for p in ncf.model.parameters()]
    scale = max(float(g.abs().max()) for g in single)
    # the perturbed parameters give every weight matrix a gradient (the last bias, u's additive
    # constant, has none: the losses do not see it)
    assert scale > 1e-3 and all(float(g.abs().max()) > 0 for g in single[:-1])
    for k, (gd, gs) in enumerate(zip(ranks[0]["grads"], single)):
        err = float((gd - gs).abs().max())
        assert err <= 1e-5 * scale, f"{case}: parameter {k}: max |2 ranks - 1 process| = " \
                                    f"{err:.3e} > 1e-5 x {scale:.3e}"
    for name, ld, ls in zip(("L_HJ", "L_MMD"), ranks[0]["losses"], (float(l_hj), float(l_mmd))):
        assert abs(ld - ls) <= 1e-5 * max(abs(ls), 1e-2), f"{case}: {name} {ld!r} vs {ls!r}"


@pytest.mark.parametrize("case", ["witness", "ustat_labels"])
def test_20_step_run_equals_single_process_on_the_union(recorded, case):
    """'Matches': with the single process fed the union of the ranks' draws (float64), the two
    runs follow one trajectory: every logged loss and the final parameters agree to 1e-9
    relative, i.e. only float rounding separates them. (With its own random stream a single
    process draws other batches and the runs agree only in distribution: not tested here.)"""
    ranks = _load(recorded, f"{case}_run_rank{{rank}}.pt")
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)  # the ranks hold one model
    assert ranks[0]["history"]["mmd"] == ranks[1]["history"]["mmd"]
    ncf, trainer = _make(case, world_scale=WORLD, dtype="float64")
    _replay(trainer, [r["draws"] for r in ranks])
    trainer.run(progress=False, history=ncf.history)
    hist_d, hist_s = ranks[0]["history"], ncf.history
    assert hist_d["step"] == hist_s["step"] == list(range(1, TRAJECTORY_STEPS + 1))
    for key in ("hj", "mmd", "heldout"):
        d, s = np.array(hist_d[key]), np.array(hist_s[key])
        np.testing.assert_allclose(d, s, rtol=1e-9, atol=1e-9 * np.abs(s).max(), err_msg=key)
    for k, (pd, ps) in enumerate(zip(ranks[0]["params"], ncf.model.parameters())):
        err = float((pd - ps.detach()).abs().max())
        assert err <= 1e-9 * max(float(ps.detach().abs().max()), 1.0), f"parameter {k}: {err:.3e}"


def test_rank_0_draws_the_single_process_stream_and_rank_1_its_own(recorded):
    ranks = _load(recorded, "witness_step_rank{rank}.pt")
    ncf, trainer = _make("witness")
    _perturb(ncf.model)
    log = []
    _record(trainer, log)
    trainer.step()
    assert len(log) == len(ranks[0]["draws"])
    for (k, x, e), (k0, x0, e0), (_, x1, _) in zip(log, ranks[0]["draws"], ranks[1]["draws"]):
        assert k == k0 and torch.equal(x, x0) and (e is None or torch.equal(e, e0))
        assert not torch.equal(x, x1)


# ------------------------------------------------------------------------------- failures
def test_a_rank_that_raises_ends_the_other_with_a_clear_message(tmp_path):
    start = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = finish(launch_workers("raise", tmp_path,
                                                           {"NCF_DIST_TIMEOUT": "60"}), 100)
    assert rc1 != 0 and "rank 1 fails on purpose" in err1
    assert rc0 != 0, "rank 0 went on although rank 1 died"
    assert "DistributedError: rank 0/2:" in err0 and "Another rank probably crashed" in err0
    assert time.monotonic() - start < 60  # a peer that exits is seen at once, not at the timeout


def test_a_rank_that_hangs_ends_the_other_after_the_timeout(tmp_path):
    procs = launch_workers("hang", tmp_path, {"NCF_DIST_TIMEOUT": "3"})
    start = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        stop(procs)  # rank 1 still sleeps: end it
    assert procs[0].returncode != 0
    assert "DistributedError: rank 0/2:" in err0 and "waits at most 3 s" in err0, err0[-2000:]
    assert elapsed < 60


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src, tgt, _, _ = _data()
    np.save(root / "input_data.npy", src)
    np.save(root / "output_data.npy", tgt)
    (root / "setup.conf").write_text(TINY_CONF)
    return root


def train_args(data, home, *extra):
    return ["train", "--home_dir", home, "--conf", data / "setup.conf", "--data_dir", data,
            "--input", "input_data.npy", "--output", "output_data.npy", "--quiet", *extra]


@pytest.fixture(scope="module")
def torchrun_run(data, tmp_path_factory):
    """``torchrun --nproc_per_node=2 -m ncf_fast train ...``, uninterrupted."""
    home = tmp_path_factory.mktemp("torchrun") / "home"
    proc = torchrun(*train_args(data, home), cwd=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, home


def _weights(path):
    from ncf_fast.estimator import read_checkpoint
    return read_checkpoint(path)["state_dict"]


def test_torchrun_train_writes_one_run_folder(torchrun_run):
    import json
    proc, home = torchrun_run
    run_dir = proc.stdout.strip().splitlines()[-1]
    assert os.listdir(home / "exps" / "ncf") == [os.path.basename(run_dir)]
    assert {"transported.npy", "inverse.npy", "metrics.json", "log.csv", "plots"} <= set(
        os.listdir(run_dir))
    with open(os.path.join(run_dir, "log.csv")) as f:
        assert [int(line.split(",")[0]) for line in f.readlines()[1:]] == list(
            range(1, CLI_STEPS + 1))
    assert json.loads(open(os.path.join(run_dir, "run.json")).read())["ranks"] == WORLD
    from ncf_fast.estimator import read_checkpoint
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert ckpt["trainer"]["step"] == CLI_STEPS and len(ckpt["trainer"]["ranks"]) == WORLD
    assert proc.stderr.count(f"step {CLI_STEPS}/{CLI_STEPS}") == 1  # rank 0 alone prints


def _copy_at(run_dir, dest, step):
    """A copy of a run folder as it was at ``step`` (its latest.pt is that step's checkpoint)."""
    shutil.copytree(run_dir, dest)
    shutil.copy(dest / "checkpoints" / f"step_{step:06d}.pt", dest / "checkpoints" / "latest.pt")
    for name in os.listdir(dest / "checkpoints"):
        if name.startswith("step_") and int(name[5:11]) > step:
            os.unlink(dest / "checkpoints" / name)
    return dest


def test_resume_with_the_same_ranks_is_exact_and_with_one_rank_runs(torchrun_run, tmp_path):
    run_dir = Path(torchrun_run[0].stdout.strip().splitlines()[-1])
    same = _copy_at(run_dir, tmp_path / "same", 20)
    proc = torchrun("train", "--resume", same, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final, ref = _weights(same / "checkpoints" / "latest.pt"), _weights(
        run_dir / "checkpoints" / "latest.pt")
    for k in ref:  # every rank's stream and passive queue came back: bit-for-bit
        assert torch.equal(final[k], ref[k]), k
    one = _copy_at(run_dir, tmp_path / "one", 20)
    proc = run_cli("train", "--resume", one, "--gpu", "cpu", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(one / "log.csv") as f:
        assert int(f.readlines()[-1].split(",")[0]) == CLI_STEPS


def test_a_single_process_run_resumes_on_two_ranks(data, tmp_path):
    proc = run_cli(*train_args(data, tmp_path / "home", "--steps", 20, "--gpu", "cpu"),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = proc.stdout.strip().splitlines()[-1]
    proc = torchrun("train", "--resume", run_dir, "--steps", CLI_STEPS, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ncf_fast.estimator import read_checkpoint
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert ckpt["trainer"]["step"] == CLI_STEPS and len(ckpt["trainer"]["ranks"]) == WORLD


def test_only_rank_0_writes(data, tmp_path):
    """Rank 1 gets its own (empty) home and working folders: nothing may appear in them."""
    homes = [tmp_path / f"home{r}" for r in range(WORLD)]
    cwds = [tmp_path / f"cwd{r}" for r in range(WORLD)]
    for folder in homes + cwds:
        folder.mkdir()
    argvs = [["-m", "ncf_fast", *train_args(data, homes[r])] for r in range(WORLD)]
    results = finish(launch(argvs, cwds))
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank}:\n{err[-3000:]}"
    run_dir = results[0][1].strip().splitlines()[-1]
    assert run_dir.startswith(str(homes[0])) and os.path.isfile(
        os.path.join(run_dir, "metrics.json"))
    assert results[1][1] == ""  # nothing on rank 1's stdout either
    for folder in (homes[1], cwds[1], cwds[0]):
        assert list(folder.rglob("*")) == [], f"rank 1 wrote into {folder}"


def test_a_signal_to_one_rank_stops_both_after_the_same_step(data, tmp_path):
    home = tmp_path / "home"
    argv = ["-m", "ncf_fast", *train_args(data, home, "--steps", 100000)]
    procs = launch([argv] * WORLD, [tmp_path] * WORLD)
    try:
        ckpts = home / "exps" / "ncf"
        end = time.monotonic() + 120
        while not list(ckpts.glob("*/checkpoints/step_000020.pt")):
            assert procs[0].poll() is None and time.monotonic() < end, "training did not start"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 must learn of it
        results = finish(procs, 120)
    finally:
        stop(procs)
    assert [r[0] for r in results] == [130, 130], [r[2][-2000:] for r in results]
    run_dir = results[0][1].strip().splitlines()[-1]
    from ncf_fast.estimator import read_checkpoint
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
    step = ckpt["trainer"]["step"]
    assert 20 <= step < 100000 and len(ckpt["trainer"]["ranks"]) == WORLD
    assert f"interrupted at step {step}/" in results[0][2]


if __name__ == "__main__":  # a worker process: python tests/test_distributed.py WORKER FOLDER
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
