"""``ncf-fast train`` and ``ncf-fast demo``: build the model from a config, train it with a
progress bar, checkpoints and a log, stop cleanly on Ctrl-C/SIGTERM, resume, and write the
outputs, metrics.json and plots of a finished run."""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from .. import __version__, distributed, lineage
from .. import config as config_mod
from ..checkpoints import DISK_FULL, save_atomic
from ..estimator import NCF, default_activation, default_hidden
from .applying import METRIC_SAMPLES, cmd_evaluate
from .errors import EXIT_INTERRUPTED, CLIError, first_line, info, usage_errors
from .inputs import (check_backends, checkpoint_file, flag_overrides, load_checkpoint, load_data,
                     named_problem, resolve_device, resolve_path, run_config)
from .run_folder import (check_home, create_run_dir, disk_full_message, remove_run, write_npy,
                         write_text)

__all__ = ["cmd_train", "cmd_demo", "DEMO_PROBLEM", "DEMO_SAMPLES"]

DEMO_PROBLEM = "gaussian:d=2:seed=1"  # a 2-D Gaussian pair: its exact map gives L2-UVP in metrics.json
DEMO_SAMPLES = 20_000      # samples per side the demo draws
LOG_COLUMNS = ("step", "L_HJ", "L_MMD", "lr", "seconds")
# the demo trains with the library's defaults: under a minute on 2 CPU cores
DEMO_BASE = {"run.expname": "demo"}


def cmd_train(args) -> int:
    device = resolve_device(args.gpu)
    if lineage.continues(args):  # the research code's --is_continue/--eval [--timestamp] [--checkpoint]
        args.resume = lineage.run_checkpoint(args, args.expname or run_config(args)["run.expname"])
        if args.eval:
            return cmd_evaluate(lineage.eval_args(args, load_checkpoint(args.resume)))
    if args.resume:
        return _resume(args, device, distributed.setup(device))
    cfg = run_config(args)
    paths = {k: resolve_path(args.data_dir, getattr(args, k))
             for k in ("input", "output", "input_labels", "output_labels")}
    data = load_data(paths)
    ncf, trainer = _build(cfg, data, device)
    return _start_run(args, cfg, data, paths, ncf, trainer, args.home_dir or os.getcwd(),
                      problem=None)


def cmd_demo(args) -> int:
    device = resolve_device(args.gpu)
    problem = named_problem(args.problem)
    cfg = run_config(args, base=DEMO_BASE)
    src, tgt = problem.sample(args.samples, cfg["train.seed"])
    src, tgt = src.astype(np.float32), tgt.astype(np.float32)
    data = {"input": src, "output": tgt, "input_labels": None, "output_labels": None}
    ncf, trainer = _build(cfg, data, device)
    paths = {"input": None, "output": None, "input_labels": None, "output_labels": None}
    return _start_run(args, cfg, data, paths, ncf, trainer, args.home_dir or os.getcwd(),
                      problem=problem.spec)


def _build(cfg: dict, data: dict, device) -> tuple[NCF, object]:
    """NCF + its Trainer, everything validated before any file is written."""
    kwargs = config_mod.model_kwargs(cfg)
    check_backends(kwargs, device)
    with usage_errors(ValueError, TypeError):
        ncf = NCF(data["input"].shape[1], device=device, **kwargs)
        trainer = ncf.make_trainer(data["input"], data["output"], config_mod.train_config(cfg),
                                   source_labels=data["input_labels"],
                                   target_labels=data["output_labels"])
    return ncf, trainer


def _start_run(args, cfg, data, paths, ncf, trainer, home, problem) -> int:
    def create():
        run_dir, created = create_run_dir(check_home(home), cfg["run.expname"])
        try:
            if problem is not None:  # the demo keeps its data in the run folder, so it can resume
                os.mkdir(os.path.join(run_dir, "data"))
                for key, name in (("input", "source.npy"), ("output", "target.npy")):
                    paths[key] = os.path.join(run_dir, "data", name)
                    write_npy(paths[key], data[key])
            run = {"config": cfg, "paths": paths, "problem": problem, "seconds": 0.0,
                   "fingerprints": {k: _fingerprint(v) for k, v in data.items() if v is not None},
                   "created": datetime.datetime.now().isoformat(timespec="seconds"),
                   "argv": sys.argv[1:], "ncf_fast": __version__, "torch": str(torch.__version__),
                   "device": str(ncf.device)}
            if trainer.dist is not None:
                run["ranks"] = trainer.dist.world_size
            write_text(os.path.join(run_dir, "setup.conf"), config_mod.to_hocon(cfg))
            write_text(os.path.join(run_dir, "run.json"), json.dumps(run, indent=2) + "\n")
        except BaseException:
            remove_run(run_dir, created)
            raise
        return run_dir, created, run

    main = trainer.dist is None or trainer.dist.is_main
    # torchrun: rank 0 alone makes the one run folder and names it to the others
    run_dir, created, run = create() if trainer.dist is None else trainer.dist.run_on_main(create)
    try:
        _report_ignored(args)
        info(args, f"run folder {run_dir}\n{ncf!r}, {data['input'].shape[0]} source and "
                   f"{data['output'].shape[0]} target samples"
             + (f", {trainer.dist.world_size} ranks" if trainer.dist is not None else ""))
        return _train_and_finish(args, run_dir, run, ncf, trainer, data)
    except BaseException:
        if main and not os.path.exists(os.path.join(run_dir, "checkpoints", "latest.pt")):
            remove_run(run_dir, created)  # failed before the first checkpoint: leave nothing
        raise


def _resume(args, device, ctx=None) -> int:
    """ctx: the DistContext under torchrun (rank 0 reads the checkpoint, every rank gets it)."""
    def read():
        path = checkpoint_file(args.resume)
        return path, load_checkpoint(path)

    ckpt_path, ckpt = read() if ctx is None else ctx.run_on_main(read)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    if "trainer" not in ckpt or "run" not in ckpt:
        raise CLIError(f"{ckpt_path}: has no trainer state (not written by ncf-fast train); it can be "
                       "used with transport/evaluate but not resumed")
    run = dict(ckpt["run"])
    try:
        saved = config_mod.parse_config(config_mod.nested(run["config"]), ckpt_path)
    except (config_mod.ConfigError, KeyError, TypeError) as exc:
        raise CLIError(f"{ckpt_path}: its stored config is unusable ({exc})") from None
    keep = {"train.steps", "model.backend", "model.energy_backend",  # what a resume may change
            "train.time_limit"}
    if args.conf is not None or args.seed is not None:
        given = run_config(args)
        compare = [k for k in config_mod.defaults() if k not in keep and k != "run.expname"]
        if args.conf is None:
            compare = ["train.seed"]
        for key in compare:
            if given[key] != saved[key]:
                raise CLIError(f"--resume: {key} is {given[key]!r} here but {saved[key]!r} in the run "
                               f"{run_dir}; a resumed run keeps its configuration (start a new run "
                               "to change it)")
    cfg = dict(saved)
    for key, value in flag_overrides(args).items():
        if key in keep:
            cfg[key] = value
    cfg = config_mod.parse_config(config_mod.nested(cfg), "--resume")
    step = int(ckpt["trainer"].get("step", 0))
    if cfg["train.steps"] is not None and cfg["train.steps"] < step:
        raise CLIError(f"--steps {cfg['train.steps']} is below the step {step} the run has reached")
    paths = dict(run["paths"])
    for k in paths:
        if getattr(args, k, None) is not None:
            paths[k] = resolve_path(args.data_dir, getattr(args, k))
    data = load_data(paths)
    dim = int(ckpt["config"]["dim"])
    if data["input"].shape[1] != dim:
        raise CLIError(f"{paths['input']} has dimension {data['input'].shape[1]} but the checkpoint "
                       f"{ckpt_path} was trained in dimension {dim}")
    for k, arr in data.items():
        if arr is not None and _fingerprint(arr) != run["fingerprints"].get(k):
            raise CLIError(f"--resume: {paths[k]} is not the data the run {run_dir} was trained on "
                           "(its content differs); resume with the original file or start a new run")
    want = config_mod.model_kwargs(cfg)
    have = dict(ckpt["config"])
    want_hidden = list(want["hidden"] or default_hidden(dim))
    want_activation = want["activation"] or default_activation(dim)
    if [int(h) for h in have.get("hidden", [])] != want_hidden or have.get("activation") != want_activation:
        raise CLIError(f"{ckpt_path}: checkpoint of a different architecture (hidden "
                       f"{have.get('hidden')}, {have.get('activation')}) than its run config "
                       f"(hidden {want_hidden}, {want_activation})")
    ckpt["config"] = {**have, "backend": cfg["model.backend"],
                      "energy_backend": cfg["model.energy_backend"]}
    check_backends(ckpt["config"], device)
    try:
        ncf = NCF.from_checkpoint(ckpt, device=device, path=ckpt_path)
        trainer = ncf.make_trainer(data["input"], data["output"], config_mod.train_config(cfg),
                                   source_labels=data["input_labels"],
                                   target_labels=data["output_labels"])
        trainer.load_state_dict(ckpt["trainer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CLIError(f"{ckpt_path}: cannot resume from this checkpoint ({first_line(exc)})") from None
    run["config"] = cfg
    run["paths"] = paths
    if ctx is None or ctx.is_main:  # only rank 0 touches the run folder
        _truncate_log(os.path.join(run_dir, "log.csv"), step)
        for name in os.listdir(os.path.join(run_dir, "checkpoints")):
            if name.startswith(".tmp-"):  # a write cut short by a crash
                os.unlink(os.path.join(run_dir, "checkpoints", name))
        if cfg != saved:
            write_text(os.path.join(run_dir, "setup.conf"), config_mod.to_hocon(cfg))
    if ctx is not None:
        run["ranks"] = ctx.world_size
    _report_ignored(args)
    info(args, f"resuming {run_dir} at step {step} of {trainer.config.steps}"
         + (f" on {ctx.world_size} ranks" if ctx is not None else ""))
    return _train_and_finish(args, run_dir, run, ncf, trainer, data)


def _report_ignored(args):
    """The research code's setup.conf keys that mean nothing here: one line, once a run starts."""
    line = lineage.take_ignored(getattr(args, "conf", None))
    if line is not None and distributed.is_main():
        print(f"ncf-fast: {line}", file=sys.stderr, flush=True)


def _truncate_log(path: str, step: int):
    """Drop log rows past ``step`` (written after the checkpoint a crashed run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [list(LOG_COLUMNS)] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(keep)
    write_text(path, buf.getvalue())


class _StopSignals:
    """First Ctrl-C / SIGTERM: finish the current step, save, exit 130. Second: stop at once.

    Under torchrun (``dist``, a DistContext) the request travels with the next gradient
    all-reduce, so every rank stops after the same step; a second signal within
    _REPEAT_WINDOW seconds is the same request (torchrun forwards the terminal's Ctrl-C to
    workers that received it already).
    """
    _REPEAT_WINDOW = 2.0

    def __init__(self, dist=None):
        self.stop = False
        self.dist, self.first = dist, 0.0
        self._old = {}

    def _handle(self, signum, frame):
        if self.stop:
            if self.dist is not None and time.monotonic() - self.first < self._REPEAT_WINDOW:
                return
            raise KeyboardInterrupt
        self.stop, self.first = True, time.monotonic()
        if self.dist is not None:
            self.dist.stop_requested = True
        if distributed.is_main():
            print("\ninterrupt: saving a checkpoint after this step (press Ctrl-C again to abort "
                  "without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the default behaviour
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _train_and_finish(args, run_dir, run, ncf, trainer, data) -> int:
    from tqdm.auto import tqdm

    from ..trainer import progress_fields

    cfg = run["config"]
    every = cfg["run.checkpoint_every"]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    log_path = os.path.join(run_dir, "log.csv")
    ctx = trainer.dist  # torchrun: every rank trains, rank 0 alone writes (main)
    main = ctx is None or ctx.is_main
    if main and not os.path.exists(log_path):
        write_text(log_path, ",".join(LOG_COLUMNS) + "\n")
    rows: list[str] = []
    base_seconds, start = float(run.get("seconds", 0.0)), time.perf_counter()
    total, first_step = trainer.config.steps, trainer.step_count

    def seconds():
        return base_seconds + time.perf_counter() - start

    def save(periodic: bool):
        # every rank's random stream and passive queue, so that a resume with as many ranks is
        # exact (a collective: every rank calls save at the same steps)
        ranks = ctx.gather_objects(_rank_stream(trainer)) if ctx is not None else None
        if not main:
            return
        target = log_path
        try:
            if rows:  # the log first: on a crash it may run ahead of the checkpoint, never behind
                with open(log_path, "a") as f:
                    f.write("".join(rows))
                    f.flush()
                    os.fsync(f.fileno())
                rows.clear()
            ckpt = ncf.to_checkpoint(include_trainer=True)
            if ranks is not None:
                ckpt["trainer"]["ranks"] = ranks
            ckpt["run"] = {**run, "seconds": seconds()}
            step = trainer.step_count
            if periodic:
                target = os.path.join(ckpt_dir, f"step_{step:06d}.pt")
                save_atomic(ckpt, target)
            target = os.path.join(ckpt_dir, "latest.pt")
            save_atomic(ckpt, target)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise CLIError(disk_full_message(exc.filename or target, run_dir)) from None

    bar = tqdm(total=total, initial=trainer.step_count, unit="step", desc="NCF", dynamic_ncols=True,
               disable=args.quiet or not main, file=sys.stderr, mininterval=0.25)
    rate = {"t": time.perf_counter(), "step": trainer.step_count}
    post = {}

    with _StopSignals(ctx) as signals:
        def stopping():  # under torchrun: the request every rank agreed on in the last step
            return ctx.stop_agreed if ctx is not None else signals.stop

        def callback(step, logs):
            rows.append(f"{step},{logs['hj']:.9g},{logs['mmd']:.9g},{logs['lr']:.9g},{seconds():.3f}\n")
            post.update(progress_fields(logs))  # the same names as NCF.fit's bar
            if "heldout" in logs:
                if args.quiet and main:
                    now = time.perf_counter()
                    speed = (step - rate["step"]) / max(now - rate["t"], 1e-9)
                    rate.update(t=now, step=step)
                    print(f"step {step}/{total}  L_HJ {logs['hj']:.3e}  L_MMD {logs['mmd']:.3e}  "
                          f"ED_heldout {logs['heldout']:.3e}  lr {logs['lr']:.2e}  "
                          f"{speed:.1f} steps/s", file=sys.stderr, flush=True)
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if step % every == 0 and step < total:
                save(periodic=True)
            return stopping()

        try:
            trainer.run(progress=False, callback=callback, history=ncf.history)
        finally:
            bar.close()
        interrupted = stopping() and trainer.step_count < total
        if interrupted:
            save(periodic=False)
        else:
            final = trainer.step_count != first_step or not os.path.exists(
                os.path.join(ckpt_dir, f"step_{trainer.step_count:06d}.pt"))
            if ctx is not None:  # rank 0 decides, every rank joins the save
                final = ctx.broadcast_object(final)
            if final:
                save(periodic=True)
        if ctx is not None:  # the last collective: every rank may now leave the group
            ctx.barrier("end-of-training barrier")
        if interrupted:
            if not main:
                return EXIT_INTERRUPTED
            print(f"interrupted at step {trainer.step_count}/{total}; checkpoint saved. Resume with: "
                  f"ncf-fast train --resume {run_dir}", file=sys.stderr, flush=True)
            print(run_dir, flush=True)
            return EXIT_INTERRUPTED
        run["seconds"] = seconds()
    if main:  # outputs, metrics and plots: rank 0
        _finish(args, run_dir, run, ncf, data)
    return 0


def _rank_stream(trainer) -> dict:
    """This rank's random stream and passive queues (CPU tensors), for the checkpoint."""
    state = trainer.state_dict()
    return {"generator": state["generator"], "passive": state["passive"],
            "passive_backward": state["passive_backward"]}


def _finish(args, run_dir, run, ncf, data):
    """transported.npy, inverse.npy, metrics.json and plots/ from the trained model."""
    src, tgt = data["input"], data["output"]
    pushed, pulled = ncf.transport(src), ncf.inverse(tgt)
    write_npy(os.path.join(run_dir, "transported.npy"), pushed)
    write_npy(os.path.join(run_dir, "inverse.npy"), pulled)
    metrics = _run_metrics(ncf, src, tgt, pushed, pulled, run)
    write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    # run.json was written at the start: now it gets the training time (as in the checkpoint)
    write_text(os.path.join(run_dir, "run.json"), json.dumps(run, indent=2) + "\n")
    from .. import plots
    problem = named_problem(run["problem"]) if run["problem"] else None
    exact = problem is not None and problem.oracle is not None and ncf.cost.spec == "quadratic"
    paths = run["paths"]
    files = plots.run_plots(
        os.path.join(run_dir, "plots"), src, tgt, pushed, pulled, ncf.history,
        max_points=run["config"]["run.plot_points"],
        title=problem.title if problem else
        f"{os.path.basename(paths['input'])} → {os.path.basename(paths['output'])}",
        truth_forward=problem.oracle.forward_map(src) if exact else None,
        truth_backward=problem.oracle.inverse_map(tgt) if exact else None)
    info(args, f"trained {metrics['steps']} steps in {metrics['seconds']:.1f} s "
               f"({metrics['steps_per_second']:.1f} steps/s); energy distance T#mu vs nu "
               f"{metrics['energy_distance_forward']:.2e}, T^-1#nu vs mu "
               f"{metrics['energy_distance_backward']:.2e} (source vs target "
               f"{metrics['energy_distance_initial']:.2e}); cycle error {metrics['cycle_error']:.2e}"
         + (f"; L2-UVP forward {metrics['l2_uvp_forward']:.3g}%, backward "
            f"{metrics['l2_uvp_backward']:.3g}%" if "l2_uvp_forward" in metrics else "")
         + f"\nplots: {', '.join(os.path.basename(p) for p in files)}")
    print(run_dir, flush=True)


def _run_metrics(ncf, src, tgt, pushed, pulled, run) -> dict:
    """metrics.json: the training summary and :func:`ncf_fast.metrics.transport_metrics` on
    METRIC_SAMPLES rows per side; NaN/Inf written as null."""
    from .. import metrics
    rng = np.random.default_rng(0)
    rows_s = rng.permutation(src.shape[0])[:METRIC_SAMPLES]
    rows_t = rng.permutation(tgt.shape[0])[:METRIC_SAMPLES]
    hist = ncf.history
    tail = max(1, min(50, len(hist["hj"])))
    steps = int(hist["step"][-1]) if hist["step"] else 0
    problem = named_problem(run["problem"]) if run.get("problem") is not None else None
    exact = problem is not None and problem.oracle is not None and ncf.cost.spec == "quadratic"
    out = {
        "steps": steps,
        "seconds": round(run["seconds"], 3),
        "steps_per_second": steps / run["seconds"] if run["seconds"] > 0 else float("nan"),
        "L_HJ_final": float(np.mean(hist["hj"][-tail:])) if hist["hj"] else None,
        "L_MMD_final": float(np.mean(hist["mmd"][-tail:])) if hist["mmd"] else None,
        "heldout_energy_distance": hist["heldout"][-1] if hist["heldout"] else None,
        "heldout_energy_distance_backward": (hist["heldout_backward"][-1]
                                             if hist.get("heldout_backward") else None),
        **metrics.transport_metrics(ncf, src, tgt, pushed, pulled, rows_s, rows_t,
                                    oracle=problem.oracle if exact else None),
        "mean_displacement": float(np.linalg.norm(pushed - src, axis=1).mean()),
        "samples_for_metrics": int(min(METRIC_SAMPLES, src.shape[0], tgt.shape[0])),
        "device": str(ncf.device),
    }
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _fingerprint(arr: np.ndarray) -> str:
    """sha256 of dtype, shape and bytes: a resumed run must see the same data."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:20]
