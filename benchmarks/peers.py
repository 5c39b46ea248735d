"""ncf_fast beside other OT map estimators: same problems, same samples, same wall-clock budget.

    python benchmarks/peers.py --problems gaussian,convex --dims 2 --budget 40 --methods all \\
        --out peers.json --plot peers.png
    python benchmarks/peers.py --dims 2,4,8,16,32,64 --budget 60 --methods ncf_fast,pot_linear
    python benchmarks/peers.py --rows a.json b.json --plot peers.png  # saved rows: table, figure

For every problem (``gaussian``: GaussianOT(d, seed=0), a linear OT map; ``convex``:
ConvexOT(d, seed=0), a known non-linear Brenier map with a translation) and dimension, each
method fits the SAME 50,000 source and 50,000 target samples (``--samples``; unpaired, raw data
units, as a user would pass them) under the same wall-clock budget ``--budget`` seconds per fit:
a method trains with its recommended settings and is stopped after the step that crosses the
budget if it is not done. Then, on 20,000 fresh samples per side (``--test_samples``):

* uvp_fwd / uvp_bwd: L2-UVP (%) of the forward map T and of the backward map T^-1 against the
  problem's exact maps (:func:`ncf_fast.metrics.l2_uvp`); null where the method gives no
  backward map;
* fit_s: wall time of the whole fit, first step (JIT compilation) included; the budget itself
  starts after a peer's first training step (:class:`Budget`), so compilation does not eat
  its training time (``first_step_s`` in the JSON says what the first step took);
* peak_mb: peak resident memory of the worker process that imported the method's framework,
  fitted and mapped (imports included: a JAX process starts at ~0.3 GB);
* map_s: time to map 10^5 fresh source points forward (``--map_samples``), in chunks of 10,000.

Every (method, problem, d) runs in its own worker process (``python peers.py --worker ...``), so
a crash, a missing package or a hang (killed at 2 x budget + 5 min) gives a row with null
numbers and an ``error`` note, and peak memory is the fit's own. Every worker runs
single-threaded (``--threads``, default 1): OMP/MKL/OpenBLAS threads 1, torch threads 1, and
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for JAX, so all
methods get the same CPU on a shared machine.

Methods and their settings (the class defaults or the project's documented example unless said;
batch sizes where the library leaves them to the user are ours and stated):

* ``ncf_fast``: ``NCF(d, seed=0).fit(src, tgt, time_limit=budget)``, every other setting at its
  default (3000 steps; stopped at the budget if not done; the cosine decay follows whichever is
  further along, steps or time, so a fit cut by the budget still ends at lr_final).
  Its limit counts from the start of its training loop, first step included (no compilation
  to exempt), after the data's standardisation.
* ``ott_enot``: OTT-JAX ``ExpectileNeuralDual`` (ENOT, Buzun et al. 2024) with its defaults:
  two MLP potentials [128] x 4 (ELU), Adam 3e-4 (b1 = b2 = 0.9), expectile 0.99, coefficient 1,
  20,000 iterations; batch 1024. Backward map: ``transport(y, forward=False)``.
* ``ott_w2``: OTT-JAX ``W2NeuralDual`` (Makkuva/Amos ICNN dual) with its defaults: two ICNNs
  [64] x 4 with positive weights, Adam 1e-4 (b1 = 0.5, b2 = 0.9), regression amortisation, the
  default Fenchel conjugate solver, 20,000 iterations; batch 1024. Backward: grad g.
* ``ott_monge_gap``: OTT-JAX ``MongeGapEstimator`` (Uscidda & Cuturi 2023) as in OTT's Monge gap
  tutorial: ``PotentialMLP([128, 64, 64], is_potential=False)`` (a residual map x + MLP(x)),
  fitting loss ``sinkdiv`` (entropic Sinkhorn divergence, default epsilon), regulariser
  ``monge_gap_from_samples`` (default epsilon), strength 1, Adam 1e-3 (the class default),
  10,000 iterations (the class default); batch 1024. Forward map only.
* ``pot_linear``: POT ``ot.da.LinearTransport`` (the Gaussian closed form from the sample means
  and covariances, reg 1e-8); backward: ``inverse_transform``.
* ``pot_emd``: POT ``ot.da.EMDTransport`` on a 4000-point subsample per side (exact plan,
  barycentric projection; POT's out-of-sample extension moves a new point like its nearest
  subsample point; its ``transform`` is called with batch_size 2000: the default 128
  renormalises the plan per 128 points, minutes for 10^5 points); backward: ``inverse_transform``.
* ``pot_sinkhorn``: POT ``ot.da.SinkhornTransport`` on a 2000-point subsample per side: its
  defaults (log-domain Sinkhorn, 1000 iterations, tol 1e-8, the "continuous" out-of-sample map:
  the entropic map's extension to new points) with the cost divided by its median
  (``norm="median"``) and reg_e 0.05 (the default 1 would blur the plan over the whole data).

POT's methods are not iterative under a budget: they run to completion (their fit_s may pass the
budget). Imports happen before the budget starts.
* ``torchcfm``: torchcfm ``ExactOptimalTransportConditionalFlowMatcher`` (OT-CFM, sigma 0, the
  class default) with torchcfm's ``MLP(d, w=64, time_varying=True)``, Adam 1e-3, batch 256 as in
  torchcfm's 2-D examples, 20,000 iterations; the map integrates the learned ODE from t = 0 to 1
  (forward) or 1 to 0 (backward) with torchdiffeq dopri5, atol = rtol = 1e-4 (the examples'
  tolerances; a fixed-step RK4 with 100 steps if torchdiffeq is missing).

Prints one markdown table; ``--out`` holds ONE JSON array of rows {method, problem, d, uvp_fwd,
uvp_bwd, fit_s, peak_mb, map_s, ...}, rewritten after every row, so a cut run keeps its rows.
``--plot`` draws L2-UVP against dimension per method. Timings depend on what the machine is
doing: say so beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere: this checkout's ncf_fast
    sys.path.insert(0, ROOT)

COLUMNS = ("method", "problem", "d", "uvp_fwd", "uvp_bwd", "fit_s", "peak_mb", "map_s")
PROBLEMS = ("gaussian", "convex")
CHUNK = 10_000  # rows per map call: one JIT shape for JAX methods, bounded memory for all
SUBSAMPLE = 4000  # POT's exact plan: n^2 doubles = 128 MB per plan at 4000
SINKHORN_SUBSAMPLE = 2000  # POT's log-domain Sinkhorn: ~0.1 s an iteration at 2000, 1000 iterations
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
    "NCF_FAST_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "TQDM_DISABLE": "1",
}


class OutOfTime(Exception):
    """Raised by a :class:`Budget`'s batch stream once the budget is spent (stops a peer's own
    training loop between two steps; its parameters stay as the last step left them)."""


class Budget:
    """A wall-clock budget for one fit, in seconds (started at construction).

    The first training step is not charged: the budget's clock restarts when a batch stream is
    asked for its second batch, so that JAX's one-time compilation (5-30 s on a loaded 2-core
    machine) does not eat a peer's training time. ``first_step_s`` records what it took;
    :meth:`elapsed` is the whole fit's time.
    """

    def __init__(self, seconds: float):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                0 < seconds < math.inf):
            raise ValueError(f"budget must be a positive finite number of seconds, got {seconds!r}")
        self.seconds = float(seconds)
        self.start = self.clock = time.perf_counter()
        self.first_step_s = None
        self.steps = 0  # batches drawn by the busiest stream: training steps begun

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return time.perf_counter() - self.clock >= self.seconds

    def batches(self, data: np.ndarray, size: int, rng: np.random.Generator, convert=None):
        """Endless random batches (size, d) of ``data``; raises :class:`OutOfTime` when asked for
        one after the budget is spent (the first batch always comes: every fit takes a step)."""
        drawn = 0
        while True:
            if drawn == 1 and self.first_step_s is None:  # the first step is done
                self.clock = time.perf_counter()
                self.first_step_s = self.clock - self.start
            if drawn and self.spent():
                raise OutOfTime
            drawn += 1
            self.steps = max(self.steps, drawn)
            batch = data[rng.integers(0, data.shape[0], size)]
            yield batch if convert is None else convert(batch)


@dataclass
class Fitted:
    """A fitted method: forward (n, d) -> (n, d) numpy, backward likewise or None; steps taken."""
    forward: Callable[[np.ndarray], np.ndarray]
    backward: Callable[[np.ndarray], np.ndarray] | None = None
    steps: int | None = None
    note: str = ""


def chunked(fn: Callable, x: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """fn applied to ``x`` in row chunks of ``chunk``, float64 out."""
    return np.concatenate([np.asarray(fn(x[i:i + chunk]), dtype=np.float64)
                           for i in range(0, x.shape[0], chunk)], axis=0)


# ------------------------------------------------------------------------------------ methods
def fit_ncf_fast(src, tgt, budget: Budget, seed: int) -> Fitted:
    from ncf_fast import NCF

    model = NCF(src.shape[1], seed=seed).fit(src, tgt, progress=False, time_limit=budget.seconds)
    stopped = model.history.get("stopped_early")
    note = f"stopped at step {stopped['step']} of {model.train_config.steps}" if stopped else ""
    return Fitted(model.transport, model.inverse, model.trainer.step_count, note)


def _jax_batches(budget, data, size, seed):
    import jax.numpy as jnp
    return budget.batches(data.astype(np.float32), size, np.random.default_rng(seed), jnp.asarray)


def _jax_map(fn):
    import jax
    import jax.numpy as jnp
    jitted = jax.jit(fn)
    return lambda x: np.asarray(jitted(jnp.asarray(x, dtype=jnp.float32)))


def _run_until_out_of_time(train, *args, **kwargs):
    try:
        train(*args, **kwargs)
    except OutOfTime:
        pass


def _fit_ott_dual(solver_cls, src, tgt, budget: Budget, seed: int) -> Fitted:
    """An OTT-JAX neural dual solver (its defaults) trained on batches of 1024 until the budget;
    forward map grad f, backward map grad g (``DualPotentials.transport``)."""
    import jax

    solver = solver_cls(src.shape[1], rng=jax.random.key(seed))
    loaders = [_jax_batches(budget, a, 1024, seed + k) for k, a in enumerate((src, tgt, src, tgt))]
    _run_until_out_of_time(solver.train_fn, *loaders)
    pot = solver.to_dual_potentials()
    return Fitted(_jax_map(lambda x: pot.transport(x, forward=True)),
                  _jax_map(lambda y: pot.transport(y, forward=False)), budget.steps)


def fit_ott_enot(src, tgt, budget: Budget, seed: int) -> Fitted:
    from ott.neural.methods.expectile_neural_dual import ExpectileNeuralDual
    return _fit_ott_dual(ExpectileNeuralDual, src, tgt, budget, seed)


def fit_ott_w2(src, tgt, budget: Budget, seed: int) -> Fitted:
    from ott.neural.methods.neuraldual import W2NeuralDual
    return _fit_ott_dual(W2NeuralDual, src, tgt, budget, seed)


def fit_ott_monge_gap(src, tgt, budget: Budget, seed: int) -> Fitted:
    import jax
    from ott.neural.methods.monge_gap import MongeGapEstimator, monge_gap_from_samples
    from ott.neural.networks.potentials import PotentialMLP
    from ott.tools import sinkhorn_divergence

    def fitting_loss(x, y):
        div, out = sinkhorn_divergence.sinkdiv(x, y)
        return div, None

    def regularizer(x, y):
        gap, out = monge_gap_from_samples(x, y, return_output=True)
        return gap, None

    d = src.shape[1]
    model = PotentialMLP(dim_hidden=[128, 64, 64], is_potential=False)
    solver = MongeGapEstimator(d, model=model, fitting_loss=fitting_loss, regularizer=regularizer,
                               regularizer_strength=1.0, rng=jax.random.key(seed))
    loaders = [_jax_batches(budget, a, 1024, seed + k) for k, a in enumerate((src, tgt, src, tgt))]
    _run_until_out_of_time(solver.train_map_estimator, *loaders)
    state = solver.state_neural_net
    return Fitted(_jax_map(lambda x: state.apply_fn({"params": state.params}, x)), None,
                  budget.steps)


def fit_pot_linear(src, tgt, budget: Budget, seed: int) -> Fitted:
    import ot

    est = ot.da.LinearTransport(reg=1e-8)
    est.fit(Xs=src, Xt=tgt)
    return Fitted(lambda x: est.transform(Xs=x), lambda y: est.inverse_transform(Xt=y), 1)


def _pot_plan(kind: str, src, tgt, seed: int) -> Fitted:
    import ot

    rng = np.random.default_rng(seed)
    xs = src[rng.choice(src.shape[0], min(SUBSAMPLE, src.shape[0]), replace=False)]
    xt = tgt[rng.choice(tgt.shape[0], min(SUBSAMPLE, tgt.shape[0]), replace=False)]
    if kind == "emd":
        est = ot.da.EMDTransport()
    else:  # entropic, log domain, on a smaller subsample: an iteration costs n^2 log-sum-exps
        xs, xt = xs[:SINKHORN_SUBSAMPLE], xt[:SINKHORN_SUBSAMPLE]
        est = ot.da.SinkhornTransport(reg_e=0.05, norm="median")
    est.fit(Xs=xs, Xt=xt)
    # batch_size: POT renormalises the whole plan once per batch of new points (default 128 rows:
    # minutes for 10^5 points); 2000 rows keep its distance block at 2000 x 4000
    return Fitted(lambda x: est.transform(Xs=x, batch_size=2000),
                  lambda y: est.inverse_transform(Xt=y, batch_size=2000), 1,
                  f"plan on {xs.shape[0]} points per side")


def fit_pot_emd(src, tgt, budget: Budget, seed: int) -> Fitted:
    return _pot_plan("emd", src, tgt, seed)


def fit_pot_sinkhorn(src, tgt, budget: Budget, seed: int) -> Fitted:
    return _pot_plan("sinkhorn", src, tgt, seed)


def _ode_map(velocity, reverse: bool):
    """x -> the learned ODE's solution from t = 0 to 1 (reverse: 1 to 0), numpy in and out."""
    import torch

    t = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0])

    def f(tt, x):
        return velocity(torch.cat([x, tt.expand(x.shape[0], 1)], 1))

    @torch.no_grad()
    def apply(x):
        x0 = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        try:
            from torchdiffeq import odeint
            return odeint(f, x0, t, method="dopri5", atol=1e-4, rtol=1e-4)[-1].numpy()
        except ImportError:  # fixed-step RK4, 100 steps
            n, h = 100, (t[1] - t[0]) / 100
            x, tt = x0, t[0].clone()
            for _ in range(n):
                k1 = f(tt, x)
                k2 = f(tt + h / 2, x + h / 2 * k1)
                k3 = f(tt + h / 2, x + h / 2 * k2)
                k4 = f(tt + h, x + h * k3)
                x, tt = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tt + h
            return x.numpy()
    return apply


def fit_torchcfm(src, tgt, budget: Budget, seed: int) -> Fitted:
    import torch
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    from torchcfm.models import MLP

    torch.manual_seed(seed)
    d = src.shape[1]
    model = MLP(dim=d, w=64, time_varying=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    rng = np.random.default_rng(seed)
    to_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    sources = budget.batches(src, 256, rng, to_t)
    targets = budget.batches(tgt, 256, np.random.default_rng(seed + 1), to_t)
    try:
        for _ in range(20_000):
            x0, x1 = next(sources), next(targets)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            vt = model(torch.cat([xt, t[:, None]], dim=-1))
            loss = ((vt - ut) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    except OutOfTime:
        pass
    model.eval()
    return Fitted(_ode_map(model, False), _ode_map(model, True), budget.steps)


METHODS: dict[str, Callable] = {
    "ncf_fast": fit_ncf_fast, "ott_enot": fit_ott_enot, "ott_w2": fit_ott_w2,
    "ott_monge_gap": fit_ott_monge_gap, "pot_linear": fit_pot_linear, "pot_emd": fit_pot_emd,
    "pot_sinkhorn": fit_pot_sinkhorn, "torchcfm": fit_torchcfm,
}
PACKAGES = {"ott_enot": "ott", "ott_w2": "ott", "ott_monge_gap": "ott", "pot_linear": "ot",
            "pot_emd": "ot", "pot_sinkhorn": "ot", "torchcfm": "torchcfm"}


# ------------------------------------------------------------------------------------ harness
def make_problem(name: str, dim: int, seed: int = 0):
    from ncf_fast.problems import ConvexOT, GaussianOT

    if name == "gaussian":
        return GaussianOT(dim, seed=seed)
    if name == "convex":
        return ConvexOT(dim, seed=seed)
    raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")


def empty_row(method: str, problem: str, dim: int, error: str | None = None) -> dict:
    """A row with every number null (a method that failed or is not installed: ``error``)."""
    row = {"method": method, "problem": problem, "d": dim, **{k: None for k in COLUMNS[3:]}}
    row.update(steps=None, budget_s=None, note="")
    if error is not None:
        row["error"] = error
    return row


def _finite(v):
    return float(v) if v is not None and math.isfinite(v) else None


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def evaluate(method: str, problem: str, dim: int, budget_s: float, n_train: int = 50_000,
             n_test: int = 20_000, n_map: int = 100_000, seed: int = 0,
             methods: dict | None = None) -> dict:
    """Fit ``method`` on ``problem`` in dimension ``dim`` under ``budget_s`` seconds and measure
    it (one row). Exceptions from the method become the row's ``error``, never propagate."""
    from ncf_fast.metrics import l2_uvp

    methods = METHODS if methods is None else methods
    row = empty_row(method, problem, dim)
    row["budget_s"] = budget_s
    prob = make_problem(problem, dim)
    src, tgt = prob.sample_source(n_train), prob.sample_target(n_train)
    _preload(method)
    x, y = prob.sample_source(n_test), prob.sample_target(n_test)
    try:
        budget = Budget(budget_s)
        fitted = methods[method](src, tgt, budget, seed)
        row["fit_s"] = budget.elapsed()
        row["first_step_s"] = budget.first_step_s
        row["steps"], row["note"] = fitted.steps, fitted.note
        pushed = chunked(fitted.forward, x)
        row["uvp_fwd"] = _finite(l2_uvp(pushed, prob.forward_map(x), y))
        if fitted.backward is not None:
            row["uvp_bwd"] = _finite(l2_uvp(chunked(fitted.backward, y), prob.inverse_map(y), x))
        xm = prob.sample_source(n_map)
        start = time.perf_counter()
        chunked(fitted.forward, xm)
        row["map_s"] = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a failing peer is a row, never a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    row["peak_mb"] = peak_rss_mb()
    return row


def _preload(method: str):
    """Import the method's framework (and start JAX's CPU backend) before its budget starts."""
    import importlib
    pkg = PACKAGES.get(method)
    if pkg is None:
        return
    try:
        importlib.import_module(pkg)
        if pkg == "ott":
            import jax
            import ott.neural.methods.expectile_neural_dual  # noqa: F401
            import ott.neural.methods.monge_gap  # noqa: F401
            import ott.neural.methods.neuraldual  # noqa: F401
            jax.numpy.zeros(1).block_until_ready()
        if pkg == "torchcfm":
            import torchcfm.conditional_flow_matching  # noqa: F401
            import torchcfm.models  # noqa: F401
    except ImportError:
        pass  # the fit reports it


def missing_package(method: str) -> str | None:
    """'package X not installed' if the method's package cannot be imported, else None."""
    import importlib.util
    pkg = PACKAGES.get(method)
    if pkg is not None and importlib.util.find_spec(pkg) is None:
        return f"not installed: {pkg} (pip install \".[peers]\")"
    return None


def run_worker(method: str, problem: str, dim: int, budget_s: float, sizes: dict, threads: int,
               timeout: float | None = None) -> dict:
    """:func:`evaluate` in a fresh single-threaded process; any failure becomes an error row."""
    missing = missing_package(method)
    if missing:
        return empty_row(method, problem, dim, missing)
    spec = json.dumps({"method": method, "problem": problem, "dim": dim, "budget_s": budget_s,
                       **sizes})
    env = dict(os.environ, **{k: str(threads) if k.endswith("_THREADS") else v
                              for k, v in SINGLE_THREAD_ENV.items()})
    if threads != 1:
        env["XLA_FLAGS"] = ""
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # a fit past twice its budget, plus five minutes to map and measure, is a stuck peer
    timeout = 2 * budget_s + 300 if timeout is None else timeout
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return empty_row(method, problem, dim, f"killed after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return empty_row(method, problem, dim, f"worker exit {proc.returncode}: {tail}"[:300])
    return json.loads(lines[-1])


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (— for a missing number; the error note in the last column)."""
    head = ("| method | problem | d | L2-UVP fwd % | L2-UVP bwd % | fit s | steps | peak MB "
            "| map 1e5 s | note |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        note = r.get("error") or r.get("note") or ""
        lines.append(f"| {r['method']} | {r['problem']} | {r['d']} | {_fmt(r['uvp_fwd'])} "
                     f"| {_fmt(r['uvp_bwd'])} | {_fmt(r['fit_s'], 1)} | {_fmt(r.get('steps'))} "
                     f"| {_fmt(r['peak_mb'], 0)} | {_fmt(r['map_s'], 2)} | {note} |")
    return "\n".join(lines)


def pivot_tables(rows: list[dict]) -> str:
    """One markdown table per problem: a row per method, a column per d, cells "forward / backward"
    L2-UVP %, the lowest of each direction in a column in bold (a later row for the same
    method, problem and d replaces an earlier one)."""
    cells = {(r["problem"], r["method"], r["d"]): r for r in rows}
    out = []
    for problem in [p for p in PROBLEMS if any(k[0] == p for k in cells)]:
        dims = sorted({k[2] for k in cells if k[0] == problem})
        methods = list(dict.fromkeys(k[1] for k in cells if k[0] == problem))
        best = {(d, key): min((r[key] for (p, _, dd), r in cells.items()
                               if p == problem and dd == d and r[key] is not None), default=None)
                for d in dims for key in ("uvp_fwd", "uvp_bwd")}

        def cell(r, d):
            if r is None or r["uvp_fwd"] is None:
                return "not run" if r is None else "failed"
            parts = [f"**{_fmt(r[k])}**" if r[k] is not None and r[k] == best[(d, k)] else _fmt(r[k])
                     for k in ("uvp_fwd", "uvp_bwd")]
            return " / ".join(parts)
        out += [f"{problem}:", "", "| method | " + " | ".join(f"d = {d}" for d in dims) + " |",
                "|---|" + "---|" * len(dims)]
        out += [f"| {m} | " + " | ".join(cell(cells.get((problem, m, d)), d) for d in dims) + " |"
                for m in methods]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_rows(rows: list[dict], path: str):
    """Rewrite ``path`` with the JSON array of rows (atomically: a cut run leaves a valid file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def read_rows(paths: list[str]) -> list[dict]:
    """The rows of :func:`write_rows` files, in order; a file that is not such an array is an error."""
    rows = []
    for path in paths:
        with open(path) as f:
            got = json.load(f)
        if not isinstance(got, list) or not all(isinstance(r, dict) and set(COLUMNS) <= r.keys()
                                                for r in got):
            raise SystemExit(f"peers.py: {path} is not a JSON array of rows from --out")
        rows.extend(got)
    return rows


def plot_rows(rows: list[dict], path: str):
    """L2-UVP (%) against dimension per method, one panel per problem, forward solid and
    backward dashed; log scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = [p for p in PROBLEMS if any(r["problem"] == p for r in rows)]
    fig, axes = plt.subplots(1, max(len(problems), 1), figsize=(6.0 * max(len(problems), 1), 4.6),
                             squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, problem in zip(axes[0], problems):
        for m in methods:
            sub = sorted((r for r in rows if r["method"] == m and r["problem"] == problem),
                         key=lambda r: r["d"])
            for key, style, label in (("uvp_fwd", "-o", f"{m} forward"),
                                      ("uvp_bwd", "--s", f"{m} backward")):
                pts = [(r["d"], r[key]) for r in sub if r[key] is not None and r[key] > 0]
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[m], label=label, ms=4,
                            lw=2.2 if m == "ncf_fast" else 1.2)
        ax.set_xscale("log", base=2)
        dims = sorted({r["d"] for r in rows})
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_yscale("log")
        ax.set_xlabel("dimension d")
        ax.set_ylabel("L2-UVP (%), lower is better")
        ax.set_title(f"{problem}: forward (solid), backward (dashed)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    budgets = sorted({r["budget_s"] for r in rows if r.get("budget_s")})
    fig.suptitle(f"L2-UVP vs dimension at equal wall-clock budget ({', '.join(f'{b:g}' for b in budgets)} s per fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _csv(kind, choices=None):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if kind is int:
            try:
                items = [int(s) for s in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
            if min(items) < 1:
                raise argparse.ArgumentTypeError(f"dimensions must be >= 1, got {text!r}")
        elif choices is not None:
            if items == ["all"]:
                return list(choices)
            bad = [s for s in items if s not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {bad[0]!r}; choose from {', '.join(choices)} (or all)")
        return items
    return parse


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 < v < math.inf:
            raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=_csv(str, PROBLEMS), default=list(PROBLEMS))
    p.add_argument("--dims", type=_csv(int), default=[2, 8])
    p.add_argument("--budget", type=_positive(float), default=60.0, help="seconds per fit")
    p.add_argument("--methods", type=_csv(str, tuple(METHODS)), default=list(METHODS),
                   help=f"comma-separated from {', '.join(METHODS)}, or all")
    p.add_argument("--out", metavar="FILE.json", help="rewritten after every row")
    p.add_argument("--plot", metavar="FILE.png", help="L2-UVP against dimension per method")
    p.add_argument("--samples", type=_positive(int), default=50_000, help="training samples per side")
    p.add_argument("--test_samples", type=_positive(int), default=20_000)
    p.add_argument("--map_samples", type=_positive(int), default=100_000)
    p.add_argument("--threads", type=_positive(int), default=1, help="threads per worker")
    p.add_argument("--rows", nargs="+", metavar="FILE.json",
                   help="fit nothing: the table (and --plot) of rows saved by earlier --out runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "ott-jax", "jax", "flax", "optax", "pot", "torchcfm",
                 "torchdiffeq", "geomloss"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None, methods: dict | None = None, isolate: bool = True) -> list[dict]:
    """Run the table; returns the rows. ``methods``/``isolate=False`` (tests): fit in this
    process with the given method table instead of one worker process per row."""
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(evaluate(**spec)), flush=True)
        return []
    if args.rows:
        rows = read_rows(args.rows)
        print(markdown_table(rows))
        print()
        print(pivot_tables(rows))
        if args.plot:
            plot_rows(rows, args.plot)
        return rows
    table = METHODS if methods is None else methods
    names = args.methods if methods is None else [m for m in args.methods if m in table] or list(table)
    sizes = {"n_train": args.samples, "n_test": args.test_samples, "n_map": args.map_samples}
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, budget {args.budget:g} s per fit, "
          f"{args.threads} thread(s) per worker, {os.cpu_count()} CPUs; versions "
          + ", ".join(f"{k} {v}" for k, v in versions().items() if v), flush=True)
    rows = []
    for problem in args.problems:
        for dim in args.dims:
            for method in names:
                if isolate:
                    row = run_worker(method, problem, dim, args.budget, sizes, args.threads)
                else:
                    row = evaluate(method, problem, dim, args.budget, methods=table, **sizes)
                rows.append(row)
                if args.out:
                    write_rows(rows, args.out)
                print(markdown_table([row]).splitlines()[-1], flush=True)
    print()
    print(markdown_table(rows))
    if args.plot:
        plot_rows(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
