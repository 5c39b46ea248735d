"""``ncf-fast``: train, apply and check NCF transport maps from the command line.

    ncf-fast train --conf setup.conf --data_dir D --input input_data.npy --output output_data.npy
                   [--home_dir H] [--gpu ID|cpu] [--expname NAME] [--steps N] [--seed S]
                   [--resume RUN_DIR] [--backend B] [--energy_backend B]
                   [--input_labels F --output_labels F] [--quiet]
                   [--nepoch N] [--points_batch N] [--is_continue | --eval] [--timestamp T]
                   [--checkpoint latest|N]      (the research code's flags: ncf_fast.lineage)
    ncf-fast transport --checkpoint C --input X.npy --out Y.npy [--inverse] [--t T]
    ncf-fast demo [--problem NAME] [--steps N] [--home_dir H]
    ncf-fast evaluate --checkpoint C (--problem gaussian:d=D[:seed=S] | --problem P.npz | --input X --output Y)

Problems: gaussian:d=D[:seed=S] (a Gaussian pair with a known map; short form gaussian:D[:S]),
toy:TGT or toy:SRC:TGT (2-D toys; short forms TGT, SRC:TGT), or a .npz with Sigma0 and Sigma1.

``python -m ncf_fast`` with the original research code's flags and no sub-command means ``train``.
A run writes one folder ``H/exps/NAME/<timestamp>/`` (see :func:`_create_run_dir`) and prints its
absolute path as the last line of stdout. User mistakes print one line on stderr and exit with
status 2 without writing anything (a full disk too, keeping the last checkpoint); set
NCF_FAST_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import difflib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import textwrap
import time

import numpy as np
import torch

from . import __version__, backends
from . import config as config_mod
from . import distributed, lineage
from .estimator import (DISK_FULL, NCF, default_activation, default_hidden, read_checkpoint, save_atomic,
                        write_atomic)

__all__ = ["main", "CLIError"]

EXIT_USAGE = 2          # bad input: one line on stderr, nothing written
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: checkpoint saved, resume later (128 + SIGINT)
SUBCOMMANDS = ("train", "transport", "demo", "evaluate")
DEMO_PROBLEM = "gaussian:d=2:seed=1"  # a 2-D Gaussian pair: its exact map gives L2-UVP in metrics.json
DEMO_SAMPLES = 20_000      # samples per side the demo draws
METRIC_SAMPLES = 2_000     # rows used for the energy distances in metrics.json (O(n^2) cost)
LOG_COLUMNS = ("step", "L_HJ", "L_MMD", "lr", "seconds")
# the demo trains with the library's defaults: under a minute on 2 CPU cores
DEMO_BASE = {"run.expname": "demo"}


class CLIError(Exception):
    """A user mistake: printed as one line on stderr, exit status 2."""


class _Interrupted(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


def _info(args, msg: str):
    if not getattr(args, "quiet", False) and distributed.is_main():  # torchrun: rank 0 speaks
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ input files
def load_array(path: str, what: str) -> np.ndarray:
    """A numeric (N, d) sample array from a .npy file, or a CLIError naming the file and the problem.

    Never unpickles (allow_pickle=False). Integer arrays are converted to float64, float16 to
    float32; anything else non-float (bool, complex, strings, records, objects) is refused.
    """
    arr = _load_npy(path, what)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind != "f":
        raise CLIError(f"{path}: {what} has non-numeric dtype {arr.dtype}; samples must be "
                       "real numbers (save a float array)")
    from .data import check_samples
    try:
        check_samples(arr, path)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    return np.ascontiguousarray(arr)


def load_labels(path: str, n: int, what: str) -> np.ndarray:
    """Integer class labels (n,) from a .npy file."""
    arr = _load_npy(path, what)
    if arr.dtype.kind not in "iubf":
        raise CLIError(f"{path}: {what} has dtype {arr.dtype}; labels must be integers")
    from .data import check_labels
    try:
        return check_labels(arr, n, path)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{exc} (in {what})") from None


def _load_npy(path: str, what: str) -> np.ndarray:
    from .data import check_regular_file
    try:
        info = check_regular_file(path, f".npy file for {what}")
        with open(path, "rb") as f:
            head = f.read(6)
            if head == b"\x93NUMPY":
                f.seek(0)
                _check_npy_size(f, info.st_size)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if head != b"\x93NUMPY":
        kind = ("a zip archive (.npz?); save one array with numpy.save" if head.startswith(b"PK")
                else "no NumPy header; save the array with numpy.save")
        raise CLIError(f"{path}: not a .npy file ({kind})")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise CLIError(f"{path}: {what} is an object (pickled) array; refusing to unpickle it: "
                           "save a numeric array instead") from None
        raise CLIError(f"{path}: truncated or corrupted .npy file ({_first_line(exc)})") from None
    except Exception as exc:  # EOFError, OSError, UnicodeError from a mangled header
        raise CLIError(f"{path}: truncated or corrupted .npy file ({_first_line(exc)})") from None
    if arr.dtype.hasobject:
        raise CLIError(f"{path}: {what} holds Python objects; save a numeric array instead")
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


def _first_line(exc) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:160]


def _fingerprint(arr: np.ndarray) -> str:
    """sha256 of dtype, shape and bytes: a resumed run must see the same data."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------- device
def resolve_device(gpu: str | None) -> torch.device:
    """--gpu ID|cpu -> torch.device; no flag: CUDA device 0 if available, else the CPU.

    Under torchrun with K > 1 processes rank r uses cuda:LOCAL_RANK (or --gpu cpu)."""
    if str(gpu).strip().lower() == "auto":  # the research code's least loaded GPU
        gpu = None if distributed.launched() else lineage.least_loaded_gpu()
    if distributed.launched() and str(gpu).strip().lower() != "cpu":
        if gpu is not None:
            raise CLIError(f"--gpu {gpu}: under torchrun each rank uses cuda:LOCAL_RANK; choose "
                           "the GPUs with CUDA_VISIBLE_DEVICES (or pass --gpu cpu)")
        return torch.device(distributed.default_device() or "cpu")
    if gpu is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = str(gpu).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda:"):
        text = text[5:]
    if not text.isdigit():
        raise CLIError(f"--gpu takes a CUDA device index such as 0, auto or cpu; got {gpu!r}")
    if not torch.cuda.is_available():
        raise CLIError(f"--gpu {gpu}: CUDA is not available on this machine (torch {torch.__version__}"
                       f"{'' if torch.version.cuda else ', a CPU-only build'}); use --gpu cpu")
    count = torch.cuda.device_count()
    if int(text) >= count:
        raise CLIError(f"--gpu {gpu}: only {count} CUDA device(s) are visible (0..{count - 1}); "
                       "pick one of those or use --gpu cpu")
    return torch.device(f"cuda:{int(text)}")


def _check_backends(model_kwargs: dict, device: torch.device):
    """--backend / --energy_backend triton on a machine without CUDA: refused before any file is
    written (the model's own limits are checked when NCF is built)."""
    for name in ("backend", "energy_backend"):
        if model_kwargs.get(name) == backends.TRITON and device.type != "cuda" and (
                os.environ.get("TRITON_INTERPRET") != "1"):
            raise CLIError(f"{name} triton needs a CUDA device; use --{name} torch (or auto) on "
                           "the CPU")


# ------------------------------------------------------------------------------ atomic files
def _write_npy(path: str, arr: np.ndarray):
    write_atomic(path, lambda f: np.save(f, arr, allow_pickle=False))


def _write_text(path: str, text: str):
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# -------------------------------------------------------------------------------- run folder
def _check_printable(path: str, what: str):
    """Paths printed as the last stdout line: a newline in them would break that contract."""
    bad = next((c for c in str(path) if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise CLIError(f"{what} {str(path)!r} contains the control character {bad!r}")


def _check_home(home: str) -> str:
    """Absolute home_dir, refused early if it cannot hold a run folder (nothing is created)."""
    _check_printable(home, "home_dir")
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


def _create_run_dir(home: str, expname: str) -> tuple[str, list[str]]:
    """Make HOME/exps/EXPNAME/<timestamp>/ with checkpoints/ and plots/.

    Returns (run folder, the parent folders this call created, outermost first), so that a run
    failing before its first checkpoint removes exactly what it made (:func:`_remove_run`)."""
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
        _remove_run(run_dir, created)
        raise CLIError(f"home_dir {home} is not writable ({exc.strerror}: {exc.filename})") from None
    return run_dir, created


def _remove_run(run_dir: str | None, created: list[str]):
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    for folder in reversed(created):
        try:
            os.rmdir(folder)  # only if still empty
        except OSError:
            pass


def _checkpoint_file(path: str) -> str:
    """A checkpoint file, or a run folder (-> its checkpoints/latest.pt)."""
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "checkpoints", "latest.pt"), os.path.join(path, "latest.pt"),
                          *lineage.lineage_run_checkpoints(path)):
            if os.path.isfile(candidate):
                return candidate
        raise CLIError(f"{path}: a folder without checkpoints/latest.pt; pass a run folder written by "
                       "ncf-fast train/demo or a checkpoint file")
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such checkpoint file or run folder")
    return path


def _read_checkpoint(path: str, time_axis=None) -> dict:
    try:
        return read_checkpoint(path, time_axis)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None


def _load_model(path: str, device, time_axis=None) -> NCF:
    ckpt = _read_checkpoint(path, time_axis)
    try:
        return NCF.from_checkpoint(ckpt, device=device, path=path)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


# ------------------------------------------------------------------------------------ train
def _resolve(data_dir: str | None, name: str | None) -> str | None:
    if name is None:
        return None
    return os.path.abspath(os.path.join(data_dir, name) if data_dir else name)


def _overrides(args) -> dict:
    out = {}
    for flag, key in (("steps", "train.steps"), ("seed", "train.seed"), ("expname", "run.expname"),
                      ("backend", "model.backend"), ("energy_backend", "model.energy_backend"),
                      ("time_limit", "train.time_limit")):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    out.update(lineage.overrides(args))  # --points_batch
    return out


def _load_config(args, base=None) -> dict:
    try:
        return config_mod.load_config(args.conf, _overrides(args), base=base)
    except config_mod.ConfigError as exc:
        raise CLIError(str(exc)) from None


def _load_data(paths: dict) -> dict:
    """{"input", "output", "input_labels", "output_labels"} paths -> arrays, checked together."""
    if paths.get("input") is None or paths.get("output") is None:
        raise CLIError("train needs --input and --output: .npy files of source and target samples, "
                       "shape (N, d) (or run `ncf-fast demo`)")
    if (paths.get("input_labels") is None) != (paths.get("output_labels") is None):
        raise CLIError("--input_labels and --output_labels go together (class-conditional OT); "
                       "give both or neither")
    src = load_array(paths["input"], "--input (source samples)")
    tgt = load_array(paths["output"], "--output (target samples)")
    if src.shape[1] != tgt.shape[1]:
        raise CLIError(f"{paths['input']} has dimension {src.shape[1]} but {paths['output']} has "
                       f"dimension {tgt.shape[1]}; source and target samples must have the same d")
    data = {"input": src, "output": tgt, "input_labels": None, "output_labels": None}
    if paths.get("input_labels") is not None:
        data["input_labels"] = load_labels(paths["input_labels"], src.shape[0], "--input_labels")
        data["output_labels"] = load_labels(paths["output_labels"], tgt.shape[0], "--output_labels")
    return data


def _build(cfg: dict, data: dict, device) -> tuple[NCF, object]:
    """NCF + its Trainer, everything validated before any file is written."""
    kwargs = config_mod.model_kwargs(cfg)
    _check_backends(kwargs, device)
    try:
        ncf = NCF(data["input"].shape[1], device=device, **kwargs)
        trainer = ncf.make_trainer(data["input"], data["output"], config_mod.train_config(cfg),
                                   source_labels=data["input_labels"],
                                   target_labels=data["output_labels"])
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    return ncf, trainer


def cmd_train(args) -> int:
    device = resolve_device(args.gpu)
    if lineage.continues(args):  # the research code's --is_continue/--eval [--timestamp] [--checkpoint]
        args.resume = lineage.run_checkpoint(args, args.expname or _load_config(args)["run.expname"])
        if args.eval:
            return cmd_evaluate(lineage.eval_args(args, _read_checkpoint(args.resume)))
    if args.resume:
        return _resume(args, device, distributed.setup(device))
    cfg = _load_config(args)
    paths = {k: _resolve(args.data_dir, getattr(args, k))
             for k in ("input", "output", "input_labels", "output_labels")}
    data = _load_data(paths)
    ncf, trainer = _build(cfg, data, device)
    return _start_run(args, cfg, data, paths, ncf, trainer, args.home_dir or os.getcwd(),
                      problem=None)


def _start_run(args, cfg, data, paths, ncf, trainer, home, problem) -> int:
    def create():
        run_dir, created = _create_run_dir(_check_home(home), cfg["run.expname"])
        try:
            if problem is not None:  # the demo keeps its data in the run folder, so it can resume
                os.mkdir(os.path.join(run_dir, "data"))
                for key, name in (("input", "source.npy"), ("output", "target.npy")):
                    paths[key] = os.path.join(run_dir, "data", name)
                    _write_npy(paths[key], data[key])
            run = {"config": cfg, "paths": paths, "problem": problem, "seconds": 0.0,
                   "fingerprints": {k: _fingerprint(v) for k, v in data.items() if v is not None},
                   "created": datetime.datetime.now().isoformat(timespec="seconds"),
                   "argv": sys.argv[1:], "ncf_fast": __version__, "torch": str(torch.__version__),
                   "device": str(ncf.device)}
            if trainer.dist is not None:
                run["ranks"] = trainer.dist.world_size
            _write_text(os.path.join(run_dir, "setup.conf"), config_mod.to_hocon(cfg))
            _write_text(os.path.join(run_dir, "run.json"), json.dumps(run, indent=2) + "\n")
        except BaseException:
            _remove_run(run_dir, created)
            raise
        return run_dir, created, run

    main = trainer.dist is None or trainer.dist.is_main
    # torchrun: rank 0 alone makes the one run folder and names it to the others
    run_dir, created, run = create() if trainer.dist is None else trainer.dist.run_on_main(create)
    try:
        _report_ignored(args)
        _info(args, f"run folder {run_dir}\n{ncf!r}, {data['input'].shape[0]} source and "
                    f"{data['output'].shape[0]} target samples"
              + (f", {trainer.dist.world_size} ranks" if trainer.dist is not None else ""))
        return _train_and_finish(args, run_dir, run, ncf, trainer, data)
    except BaseException:
        if main and not os.path.exists(os.path.join(run_dir, "checkpoints", "latest.pt")):
            _remove_run(run_dir, created)  # failed before the first checkpoint: leave nothing
        raise


def _resume(args, device, ctx=None) -> int:
    """ctx: the DistContext under torchrun (rank 0 reads the checkpoint, every rank gets it)."""
    def read():
        path = _checkpoint_file(args.resume)
        return path, _read_checkpoint(path)

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
        given = _load_config(args)
        compare = [k for k in config_mod.defaults() if k not in keep and k != "run.expname"]
        if args.conf is None:
            compare = ["train.seed"]
        for key in compare:
            if given[key] != saved[key]:
                raise CLIError(f"--resume: {key} is {given[key]!r} here but {saved[key]!r} in the run "
                               f"{run_dir}; a resumed run keeps its configuration (start a new run "
                               "to change it)")
    cfg = dict(saved)
    for key, value in _overrides(args).items():
        if key in keep:
            cfg[key] = value
    cfg = config_mod.parse_config(config_mod.nested(cfg), "--resume")
    step = int(ckpt["trainer"].get("step", 0))
    if cfg["train.steps"] < step:
        raise CLIError(f"--steps {cfg['train.steps']} is below the step {step} the run has reached")
    paths = dict(run["paths"])
    for k in paths:
        if getattr(args, k, None) is not None:
            paths[k] = _resolve(args.data_dir, getattr(args, k))
    data = _load_data(paths)
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
    _check_backends(ckpt["config"], device)
    try:
        ncf = NCF.from_checkpoint(ckpt, device=device, path=ckpt_path)
        trainer = ncf.make_trainer(data["input"], data["output"], config_mod.train_config(cfg),
                                   source_labels=data["input_labels"],
                                   target_labels=data["output_labels"])
        trainer.load_state_dict(ckpt["trainer"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CLIError(f"{ckpt_path}: cannot resume from this checkpoint ({_first_line(exc)})") from None
    run["config"] = cfg
    run["paths"] = paths
    if ctx is None or ctx.is_main:  # only rank 0 touches the run folder
        _truncate_log(os.path.join(run_dir, "log.csv"), step)
        for name in os.listdir(os.path.join(run_dir, "checkpoints")):
            if name.startswith(".tmp-"):  # a write cut short by a crash
                os.unlink(os.path.join(run_dir, "checkpoints", name))
        if cfg != saved:
            _write_text(os.path.join(run_dir, "setup.conf"), config_mod.to_hocon(cfg))
    if ctx is not None:
        run["ranks"] = ctx.world_size
    _report_ignored(args)
    _info(args, f"resuming {run_dir} at step {step} of {cfg['train.steps']}"
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
    _write_text(path, buf.getvalue())


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

    from .trainer import progress_fields

    cfg = run["config"]
    every = cfg["run.checkpoint_every"]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    log_path = os.path.join(run_dir, "log.csv")
    ctx = trainer.dist  # torchrun: every rank trains, rank 0 alone writes (main)
    main = ctx is None or ctx.is_main
    if main and not os.path.exists(log_path):
        _write_text(log_path, ",".join(LOG_COLUMNS) + "\n")
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
            raise CLIError(_disk_full_message(exc.filename or target, run_dir)) from None

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


def _disk_full_message(path: str, run_dir: str | None = None) -> str:
    latest = os.path.join(run_dir, "checkpoints", "latest.pt") if run_dir else None
    if latest and os.path.exists(latest):
        return (f"no space left on device writing {path}; {latest} still holds the last complete "
                f"checkpoint: free some space, then continue with ncf-fast train --resume {run_dir}")
    return f"no space left on device writing {path}; free some space and run again"


def _rank_stream(trainer) -> dict:
    """This rank's random stream and passive queues (CPU tensors), for the checkpoint."""
    state = trainer.state_dict()
    return {"generator": state["generator"], "passive": state["passive"],
            "passive_backward": state["passive_backward"]}


def _finish(args, run_dir, run, ncf, data):
    """transported.npy, inverse.npy, metrics.json and plots/ from the trained model."""
    src, tgt = data["input"], data["output"]
    pushed, pulled = ncf.transport(src), ncf.inverse(tgt)
    _write_npy(os.path.join(run_dir, "transported.npy"), pushed)
    _write_npy(os.path.join(run_dir, "inverse.npy"), pulled)
    metrics = _run_metrics(ncf, src, tgt, pushed, pulled, run)
    _write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    # run.json was written at the start: now it gets the training time (as in the checkpoint)
    _write_text(os.path.join(run_dir, "run.json"), json.dumps(run, indent=2) + "\n")
    from . import plots
    problem = _parse_problem(run["problem"]) if run["problem"] else None
    exact = problem is not None and problem.oracle is not None and ncf.cost.spec == "quadratic"
    paths = run["paths"]
    files = plots.run_plots(
        os.path.join(run_dir, "plots"), src, tgt, pushed, pulled, ncf.history,
        max_points=run["config"]["run.plot_points"],
        title=problem.title if problem else
        f"{os.path.basename(paths['input'])} → {os.path.basename(paths['output'])}",
        truth_forward=problem.oracle.forward_map(src) if exact else None,
        truth_backward=problem.oracle.inverse_map(tgt) if exact else None)
    _info(args, f"trained {metrics['steps']} steps in {metrics['seconds']:.1f} s "
                f"({metrics['steps_per_second']:.1f} steps/s); energy distance T#mu vs nu "
                f"{metrics['energy_distance_forward']:.2e}, T^-1#nu vs mu "
                f"{metrics['energy_distance_backward']:.2e} (source vs target "
                f"{metrics['energy_distance_initial']:.2e}); cycle error {metrics['cycle_error']:.2e}"
          + (f"; L2-UVP forward {metrics['l2_uvp_forward']:.3g}%, backward "
             f"{metrics['l2_uvp_backward']:.3g}%" if "l2_uvp_forward" in metrics else "")
          + f"\nplots: {', '.join(os.path.basename(p) for p in files)}")
    print(run_dir, flush=True)


def _subsample(rng, arr, n):
    return arr if arr.shape[0] <= n else arr[rng.choice(arr.shape[0], n, replace=False)]


def _run_metrics(ncf, src, tgt, pushed, pulled, run) -> dict:
    from . import metrics as m
    rng = np.random.default_rng(0)
    idx_s = rng.permutation(src.shape[0])[:METRIC_SAMPLES]
    idx_t = rng.permutation(tgt.shape[0])[:METRIC_SAMPLES]
    hist = ncf.history
    tail = max(1, min(50, len(hist["hj"])))
    steps = int(hist["step"][-1]) if hist["step"] else 0
    out = {
        "steps": steps,
        "seconds": round(run["seconds"], 3),
        "steps_per_second": steps / run["seconds"] if run["seconds"] > 0 else float("nan"),
        "L_HJ_final": float(np.mean(hist["hj"][-tail:])) if hist["hj"] else None,
        "L_MMD_final": float(np.mean(hist["mmd"][-tail:])) if hist["mmd"] else None,
        "heldout_energy_distance": hist["heldout"][-1] if hist["heldout"] else None,
        "heldout_energy_distance_backward": (hist["heldout_backward"][-1]
                                             if hist.get("heldout_backward") else None),
        "energy_distance_initial": m.energy_distance(src[idx_s], tgt[idx_t]),
        "energy_distance_forward": m.energy_distance(pushed[idx_s], tgt[idx_t]),
        "energy_distance_backward": m.energy_distance(pulled[idx_t], src[idx_s]),
        "cycle_error": m.cycle_error(ncf, src[idx_s]),
        "cycle_error_relative": m.cycle_error_relative(ncf, src[idx_s]),
        "mean_displacement": float(np.linalg.norm(pushed - src, axis=1).mean()),
        "samples_for_metrics": int(min(METRIC_SAMPLES, src.shape[0], tgt.shape[0])),
        "device": str(ncf.device),
    }
    problem = run.get("problem")
    if problem is not None:
        prob = _parse_problem(problem)
        if prob.oracle is not None and ncf.cost.spec == "quadratic":
            out["l2_uvp_forward"] = m.l2_uvp(pushed, prob.oracle.forward_map(src), tgt)
            out["l2_uvp_backward"] = m.l2_uvp(pulled, prob.oracle.inverse_map(tgt), src)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------- problems
class _Problem:
    """A built-in problem: a toy pair "SRC:TGT" / "TGT" (source N(0, I)), or a Gaussian pair.

    ``title`` names it in plain words for figure titles, e.g. "Gaussian pair (d = 2, seed 1)"."""

    def __init__(self, spec, dim, source, target, oracle=None, title=None):
        self.spec, self.dim, self._source, self._target, self.oracle = spec, dim, source, target, oracle
        self.title = title or spec

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return self._source(n, seed), self._target(n, seed + 1)


def _readable_spec(text: str) -> str:
    """The readable problem names -> the short ones (both accepted): toy:TGT -> TGT,
    toy:SRC:TGT -> SRC:TGT, gaussian:d=D[:seed=S] -> gaussian:D[:S]. "gaussian" alone is also
    a toy (N(0, I)), which is why gaussian:circles and gaussian:2:1 read alike."""
    parts = text.split(":")
    if parts[0] == "toy" and len(parts) in (2, 3):
        return ":".join(parts[1:])
    if parts[0] == "gaussian" and len(parts) in (2, 3) and parts[1].startswith("d="):
        out = ["gaussian", parts[1][2:]]
        if len(parts) == 3:
            if not parts[2].startswith("seed="):
                raise CLIError(f"--problem {text}: write gaussian:d=D:seed=S (e.g. gaussian:d=2:seed=1)")
            out.append(parts[2][5:])
        return ":".join(out)
    return text


def _parse_problem(spec: str) -> _Problem:
    from . import problems
    text = _readable_spec(str(spec).strip())
    if text.lower().endswith(".npz") or os.path.sep in text:
        from .data import check_regular_file
        try:
            check_regular_file(text, ".npz file (a Gaussian problem holds Sigma0 and Sigma1)")
        except (ValueError, FileNotFoundError) as exc:
            raise CLIError(str(exc)) from None
        try:
            gauss = problems.GaussianOT.from_npz(text, seed=0)
        except (ValueError, OSError, KeyError) as exc:
            msg = _first_line(exc)
            raise CLIError(msg if msg.startswith(text) else f"{text}: not a usable Gaussian "
                           f"problem ({msg})") from None
        except Exception as exc:  # zipfile.BadZipFile and friends
            raise CLIError(f"{text}: not a valid .npz file ({_first_line(exc)})") from None
        return _gaussian_problem(text, gauss, f"Gaussian pair from {os.path.basename(text)} "
                                 f"(d = {gauss.dim})")
    parts = text.split(":")
    if parts[0] == "gaussian" and len(parts) in (2, 3) and parts[1].isdigit():
        dim = int(parts[1])
        if not 1 <= dim <= 4096:
            raise CLIError(f"--problem {spec}: dimension must be between 1 and 4096")
        if len(parts) == 3 and not parts[2].isdigit():
            raise CLIError(f"--problem {spec}: the seed in gaussian:D:SEED must be a non-negative integer")
        seed = int(parts[2]) if len(parts) == 3 else 0
        return _gaussian_problem(text, problems.GaussianOT(dim, seed=seed),
                                 f"Gaussian pair (d = {dim}, seed {seed})")
    names = parts if len(parts) == 2 else (["gaussian", parts[0]] if len(parts) == 1 else None)
    bad = [n for n in (names or []) if n not in problems.TOYS]
    if names is None or bad:
        near = difflib.get_close_matches(bad[0], list(problems.TOYS), n=1) if bad else []
        raise CLIError(f"--problem {spec!r}: unknown problem" + (f" {bad[0]!r}" if bad else "")
                       + (f" (did you mean {near[0]!r}?)" if near else "")
                       + f"; use toy:TGT (source N(0, I)) or toy:SRC:TGT with toys "
                       f"{', '.join(problems.TOYS)}; gaussian:d=D[:seed=S] (a Gaussian pair with "
                       "a known map); or a .npz with Sigma0 and Sigma1")
    a, b = names

    def name(toy):
        return "N(0, I)" if toy == "gaussian" else toy
    return _Problem(f"{a}:{b}", 2, lambda n, s: problems.toy(a, n, seed=s),
                    lambda n, s: problems.toy(b, n, seed=s), title=f"{name(a)} → {name(b)} (toys)")


def _gaussian_problem(spec, gauss, title) -> _Problem:
    chol0, chol1 = np.linalg.cholesky(gauss.sigma0), np.linalg.cholesky(gauss.sigma1)

    def source(n, seed):
        return gauss.m0 + np.random.default_rng([seed, 0]).standard_normal((n, gauss.dim)) @ chol0.T

    def target(n, seed):
        return gauss.m1 + np.random.default_rng([seed, 1]).standard_normal((n, gauss.dim)) @ chol1.T
    return _Problem(spec, gauss.dim, source, target, oracle=gauss, title=title)


# ------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    device = resolve_device(args.gpu)
    problem = _parse_problem(args.problem)
    cfg = _load_config(args, base=DEMO_BASE)
    src, tgt = problem.sample(args.samples, cfg["train.seed"])
    src, tgt = src.astype(np.float32), tgt.astype(np.float32)
    data = {"input": src, "output": tgt, "input_labels": None, "output_labels": None}
    ncf, trainer = _build(cfg, data, device)
    paths = {"input": None, "output": None, "input_labels": None, "output_labels": None}
    return _start_run(args, cfg, data, paths, ncf, trainer, args.home_dir or os.getcwd(),
                      problem=problem.spec)


# -------------------------------------------------------------------------------- transport
def cmd_transport(args) -> int:
    device = resolve_device(args.gpu)
    _check_printable(args.out, "--out")
    ckpt_path = _checkpoint_file(args.checkpoint)
    out = os.path.abspath(args.out)
    if not out.endswith(".npy"):
        raise CLIError(f"--out {args.out}: the output is written with numpy.save; give it a .npy name")
    if not os.path.isdir(os.path.dirname(out)):
        raise CLIError(f"--out {args.out}: folder {os.path.dirname(out)} does not exist")
    if not os.access(os.path.dirname(out), os.W_OK):
        raise CLIError(f"--out {args.out}: folder {os.path.dirname(out)} is not writable")
    if args.inverse and args.t is not None:
        raise CLIError("--t gives a point on the forward characteristics x(t); it cannot be combined "
                       "with --inverse")
    ncf = _load_model(ckpt_path, device, getattr(args, "time_axis", None))
    x = load_array(args.input, "--input")
    if x.shape[1] != ncf.dim:
        raise CLIError(f"{args.input} has dimension {x.shape[1]} but the checkpoint {ckpt_path} was "
                       f"trained in dimension {ncf.dim}")
    if args.t is not None and not 0 <= args.t <= ncf.t_final:
        raise CLIError(f"--t {args.t:g}: must lie in [0, t_final = {ncf.t_final:g}]")
    if args.inverse:
        y, what = ncf.inverse(x), "T^-1(x)"
    elif args.t is not None:
        y, what = ncf.interpolate(x, args.t), f"x(t={args.t:g})"
    else:
        y, what = ncf.transport(x), "T(x)"
    _write_npy(out, y)
    _info(args, f"wrote {what} for {x.shape[0]} rows of dimension {x.shape[1]} to {out}")
    print(out, flush=True)
    return 0


# --------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    from . import metrics as m
    device = resolve_device(args.gpu)
    ckpt_path = _checkpoint_file(args.checkpoint)
    if args.problem is None and (args.input is None or args.output is None):
        raise CLIError("evaluate needs --problem (gaussian:d=D[:seed=S], a .npz, toy:SRC:TGT) or "
                       "--input and --output sample files")
    problem = _parse_problem(args.problem) if args.problem is not None else None
    ncf = _load_model(ckpt_path, device, getattr(args, "time_axis", None))
    if problem is not None:
        if problem.dim != ncf.dim:
            raise CLIError(f"--problem {args.problem} has dimension {problem.dim} but the checkpoint "
                           f"{ckpt_path} was trained in dimension {ncf.dim}")
        x, y = problem.sample(args.samples, 1_000_003)  # fresh draws, not the demo's training data
        source_name = problem.spec
    else:
        data = _load_data({"input": args.input, "output": args.output})
        x, y = data["input"], data["output"]
        if x.shape[1] != ncf.dim:
            raise CLIError(f"{args.input} has dimension {x.shape[1]} but the checkpoint {ckpt_path} "
                           f"was trained in dimension {ncf.dim}")
        source_name = f"{args.input} -> {args.output}"
    pushed, pulled = ncf.transport(x), ncf.inverse(y)
    rng = np.random.default_rng(0)
    xs, ys = _subsample(rng, x, METRIC_SAMPLES * 2), _subsample(rng, y, METRIC_SAMPLES * 2)
    ps, qs = ncf.transport(xs), ncf.inverse(ys)
    out = {"checkpoint": os.path.abspath(ckpt_path), "problem": source_name,
           "samples": int(x.shape[0])}
    if problem is not None and problem.oracle is not None:
        if ncf.cost.spec != "quadratic":
            raise CLIError(f"{ckpt_path}: the Gaussian closed form is the OT map of the quadratic cost; "
                           f"this model uses cost {ncf.cost.spec!r}")
        out["l2_uvp_forward"] = m.l2_uvp(pushed, problem.oracle.forward_map(x), y)
        out["l2_uvp_backward"] = m.l2_uvp(pulled, problem.oracle.inverse_map(y), x)
    out["energy_distance_forward"] = m.energy_distance(ps, ys)
    out["energy_distance_backward"] = m.energy_distance(qs, xs)
    out["energy_distance_initial"] = m.energy_distance(xs, ys)
    out["cycle_error"] = m.cycle_error(ncf, xs)
    out["cycle_error_relative"] = m.cycle_error_relative(ncf, xs)
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.quiet:
        width = max(len(k) for k in out)
        for k, v in out.items():
            unit = " %" if k.startswith("l2_uvp") or k == "cycle_error_relative" else ""
            print(f"{k:<{width}}  {v:.4g}{unit}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    else:
        print(evaluation_report(out, xs, ys, ncf.dim, problem.title if problem else source_name))
    return 0


# L2-UVP (%) of the paper's NCF (forward map; docs/method.md, section 9), per dimension
PAPER_L2_UVP = {2: 0.010, 4: 0.021, 8: 0.086, 16: 0.15, 32: 0.44, 64: 0.86}
# the cycle error relative to the source's spread (a rule of thumb, not a published threshold):
# an L2-UVP of 0.1 % is an RMS error of sqrt(0.001) ~ 3 % of the spread, and both maps' errors add
# up in the cycle; the default demos read 0.6 % (d = 2) and 2.6 % (d = 3, L2-UVP 0.07/0.14 %)
CYCLE_GOOD, CYCLE_BAD = 0.05, 0.20


def energy_noise(ys: np.ndarray, splits: int = 4) -> float:
    """How far from 0 the energy distance between two samples of ONE distribution typically
    lands at the size of ``ys``: the RMS over random halvings of ys, halved (under equal
    distributions the unbiased estimate shrinks like 1/n). Data units."""
    from . import metrics as m
    rng = np.random.default_rng(1)
    values = []
    for _ in range(splits):
        idx = rng.permutation(ys.shape[0])
        half = ys.shape[0] // 2
        values.append(m.energy_distance(ys[idx[:half]], ys[idx[half:2 * half]]))
    return float(np.sqrt(np.mean(np.square(values))) / 2)


def evaluation_report(out: dict, xs: np.ndarray, ys: np.ndarray, dim: int, name: str) -> str:
    """``ncf-fast evaluate``'s table: each number with its unit, its scale and, where a threshold
    is known, a verdict in words, then what the numbers mean. out: the metrics; xs, ys: the
    source and target rows the energy distances and the cycle error were measured on."""
    spread = float(np.sqrt(xs.var(axis=0, ddof=1).sum()))  # RMS distance to the mean, sqrt(Var)
    noise = energy_noise(ys)
    initial = out["energy_distance_initial"]
    paper = PAPER_L2_UVP.get(dim)
    rows = [("quantity", "value", "scale", "verdict")]
    for key, what in (("l2_uvp_forward", "forward"), ("l2_uvp_backward", "backward")):
        if key in out:
            v = out[key]
            scale = f"paper's NCF at d = {dim}: {paper:g} %" if paper else "% of Var(target)"
            verdict = ("good (< 0.1 %)" if v < 0.1 else "fair (0.1-1 %)" if v < 1
                       else "poor (> 1 %): train longer")
            if paper and v > 2 * paper:
                verdict += f", {v / paper:.0f}x the paper"
            rows.append((f"L2-UVP {what}", f"{v:.3g} %", scale, verdict))
    for key, label in (("energy_distance_forward", "energy distance T#mu vs nu"),
                       ("energy_distance_backward", "energy distance T^-1#nu vs mu")):
        v = out[key]
        rel = f"{100 * v / initial:.3g} % of before" if initial > 0 else "-"
        verdict = ("at the noise level: matches" if abs(v) <= 3 * noise
                   else f"{v / noise:.0f}x the noise: differs")
        rows.append((label, f"{v:.3g}", f"{rel}; noise ~{noise:.1g}", verdict))
    rows.append(("energy distance source vs target", f"{initial:.3g}", "before transport", ""))
    cyc = out["cycle_error"] / spread if spread > 0 else float("nan")
    verdict = (f"maps agree (< {100 * CYCLE_GOOD:.0f} %)" if cyc < CYCLE_GOOD else
               "maps disagree" if cyc < CYCLE_BAD else
               f"maps do not agree (> {100 * CYCLE_BAD:.0f} %): backward map not usable yet")
    rows.append(("cycle error |T^-1(T(x)) - x|", f"{out['cycle_error']:.3g}",
                 f"{100 * cyc:.2g} % of the spread {spread:.3g}", verdict))
    if "cycle_error_relative" in out:
        rows.append(("cycle error, squared", f"{out['cycle_error_relative']:.3g} %",
                     "E|T^-1(T(x)) - x|^2 / Var(source): the L2-UVP scale", ""))
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = [f"{name}, {out['samples']} samples per side", f"checkpoint {out['checkpoint']}", ""]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    notes = [
        "L2-UVP: 100 E|T(x) - T*(x)|^2 / Var(target), the map's mean squared error against the "
        "exact map as a percentage of the target's variance (backward: roles swapped); the "
        "paper's table is in docs/method.md.",
        f"Energy distances: data units, on {xs.shape[0]} rows per side. The estimate is unbiased, "
        "so near a perfect match it scatters around 0 and can be negative; 'noise' is its typical "
        "size between two samples of the same distribution at this sample size.",
        "Cycle error: how far T^-1(T(x)) lands from x (data units), relative to the source's spread "
        "sqrt(Var(source)); it checks that the two maps agree, not that they are right (identity "
        f"maps score 0). < {100 * CYCLE_GOOD:.0f} % and > {100 * CYCLE_BAD:.0f} % are rules of "
        "thumb from ncf_fast's runs, not published thresholds."]
    if "l2_uvp_forward" not in out:
        notes.pop(0)
    lines.append("")
    for note in notes:
        lines.extend(textwrap.wrap(note, 100, subsequent_indent="  "))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (STYLE: one line on stderr, exit 2) and flag suggestions."""

    def _flags(self):
        for action in self._actions:
            yield from action.option_strings
            if isinstance(action, argparse._SubParsersAction):  # extras are reported at the top
                for sub in action.choices.values():
                    yield from sub._flags()

    def error(self, message):
        if "unrecognized arguments" in message:
            flags = sorted(set(self._flags()))
            for word in message.split(":", 1)[1].split():
                near = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("-") and near:
                    message += f" (did you mean {near[0]}?)"
                    break
        raise CLIError(f"{message} (see {self.prog} --help)")


def _int_at_least(minimum: int, noun: str):
    """An argparse type: an integer >= minimum, else an error naming the expected kind."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {noun} integer, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_TIME_AXIS = "a checkpoint of the research code: its network's input is [x, t] (last) or [t, x] (first)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ncf-fast", description="Optimal transport with Neural Characteristic "
                     "Flows: train a map, apply it, check it. `ncf-fast demo` needs no files.",
                     epilog="Without a sub-command, flags mean train: `ncf-fast --conf setup.conf "
                     "--input X.npy --output Y.npy` (and `python -m ncf_fast ...`, the research "
                     "code's run.py flags) is `ncf-fast train ...`.")
    parser.add_argument("--version", action="version", version=f"ncf_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,transport,demo,evaluate}",
                                parser_class=_Parser)

    def common(p, quiet):
        p.add_argument("--gpu", metavar="ID|auto|cpu", help="CUDA device index, auto or cpu "
                       "(default: CUDA device 0 if available, else cpu)")
        p.add_argument("--threads", type=_positive_int, metavar="N",
                       help="CPU threads (default: the CPUs this process may use, fewer while "
                       "other processes keep them busy; also NCF_FAST_THREADS)")
        p.add_argument("--quiet", "-q", action="store_true", help=quiet)

    training_quiet = "no progress bar: one plain line per held-out check (for log files)"

    p = sub.add_parser("train", help="train on .npy sample files (the original run.py flags)",
                       description="Train an NCF map from --input (source) to --output (target) "
                       "samples; writes HOME/exps/NAME/<timestamp>/ and prints its path last.")
    p.add_argument("--conf", metavar="setup.conf", help="HOCON config (every key has a default)")
    p.add_argument("--home_dir", metavar="H", help="where exps/ goes (default: current folder)")
    p.add_argument("--data_dir", metavar="D", help="folder of --input/--output/labels (default: .)")
    p.add_argument("--input", metavar="input_data.npy", help="source samples, shape (N, d)")
    p.add_argument("--output", metavar="output_data.npy", help="target samples, shape (M, d)")
    p.add_argument("--input_labels", metavar="F", help="class labels of the source, shape (N,)")
    p.add_argument("--output_labels", metavar="F", help="class labels of the target, shape (M,)")
    p.add_argument("--expname", metavar="NAME", help="run.expname (default: ncf)")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="train.steps")
    p.add_argument("--seed", type=_nonneg_int, metavar="S", help="train.seed")
    p.add_argument("--time_limit", type=_number, metavar="SECONDS", help="train.time_limit")
    p.add_argument("--backend", choices=backends.BACKENDS, help="model.backend")
    p.add_argument("--energy_backend", choices=backends.BACKENDS, help="model.energy_backend")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR "
                   "(same step, optimizer, schedule and random stream); --steps may extend it")
    lineage.add_train_flags(p, _positive_int)  # the research code's run.py flags
    common(p, training_quiet)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("transport", help="apply a trained map to samples",
                       description="Write T(x), T^-1(x) (--inverse) or x(t) (--t T) for the rows of "
                       "--input.")
    p.add_argument("--checkpoint", required=True, metavar="C", help="checkpoint file or run folder")
    p.add_argument("--input", required=True, metavar="X.npy", help="points, shape (N, d)")
    p.add_argument("--out", required=True, metavar="Y.npy", help="where to write the result")
    p.add_argument("--inverse", action="store_true", help="backward map T^-1 instead of T")
    p.add_argument("--t", type=_number, metavar="T", help="point x(t) on the characteristic, 0 <= t <= t_f")
    p.add_argument("--time_axis", choices=("last", "first"), help=_TIME_AXIS)
    common(p, "print only the output path (no summary line on stderr)")
    p.set_defaults(func=cmd_transport)

    p = sub.add_parser("demo", help="train on a built-in problem and plot it (no files needed)",
                       description="Train on a built-in problem in about a minute on a CPU, write "
                       "a run folder with plots and print its path last.")
    p.add_argument("--problem", default=DEMO_PROBLEM, metavar="NAME",
                   help=f"gaussian:d=D[:seed=S] (a Gaussian pair with a known map), toy:TGT "
                        f"(source N(0, I)) or toy:SRC:TGT (2-D toys: circles, moons, 8gaussians, "
                        f"...), or a .npz with Sigma0, Sigma1; the short forms gaussian:D[:S], TGT "
                        f"and SRC:TGT also work (default: {DEMO_PROBLEM})")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="train.steps (default: train.steps of the config, 3000)")
    p.add_argument("--home_dir", metavar="H", help="where exps/ goes (default: current folder)")
    p.add_argument("--conf", metavar="setup.conf", help="HOCON config on top of the demo's defaults")
    p.add_argument("--seed", type=_nonneg_int, metavar="S", help="train.seed (also seeds the samples)")
    p.add_argument("--samples", type=_positive_int, default=DEMO_SAMPLES, metavar="N",
                   help=f"samples per side (default: {DEMO_SAMPLES})")
    p.add_argument("--backend", choices=backends.BACKENDS, help="model.backend")
    p.add_argument("--energy_backend", choices=backends.BACKENDS, help="model.energy_backend")
    common(p, training_quiet)
    p.set_defaults(func=cmd_demo, expname=None)

    p = sub.add_parser("evaluate", help="accuracy of a trained map",
                       description="Forward/backward L2-UVP against a Gaussian closed form, energy "
                       "distances and the cycle error |T^-1(T(x)) - x|.")
    p.add_argument("--checkpoint", required=True, metavar="C", help="checkpoint file or run folder")
    p.add_argument("--problem", metavar="P", help="gaussian:d=D[:seed=S], a .npz with Sigma0, "
                   "Sigma1, or toy:SRC:TGT (as for demo); fresh samples are drawn")
    p.add_argument("--input", metavar="X.npy", help="source samples (instead of --problem)")
    p.add_argument("--output", metavar="Y.npy", help="target samples (instead of --problem)")
    p.add_argument("--samples", type=_positive_int, default=10_000, metavar="N",
                   help="samples drawn from --problem (default: 10000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--time_axis", choices=("last", "first"), help=_TIME_AXIS)
    common(p, "print the numbers only, without the explanations and verdicts")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    """Entry point of ``ncf-fast`` and ``python -m ncf_fast``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0].startswith("-") and argv[0] not in (
            "-h", "--help", "--version"):
        argv.insert(0, "train")  # the original run.py flags, no sub-command
    debug = os.environ.get("NCF_FAST_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args = parser.parse_args(argv)
        if args.command is None:
            raise CLIError(f"ncf-fast: choose a command: {', '.join(SUBCOMMANDS)} (see ncf-fast --help)")
        if args.threads is not None:
            from .threads import set_threads
            set_threads(args.threads)
        status = args.func(args)
        distributed.shutdown()
        return status
    except CLIError as exc:
        if debug:
            raise
        print(f"ncf-fast: error: {distributed.rank_prefix()}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nncf-fast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError) as exc:  # library checks that the CLI did not pre-empt
        if debug:
            raise
        print(f"ncf-fast: error: {distributed.rank_prefix()}{_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except distributed.DistributedError as exc:  # names the rank and what to look at
        if debug:
            raise
        print(f"ncf-fast: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug or a device failure: still one line
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:  # outputs, run folder
            print(f"ncf-fast: error: {_disk_full_message(exc.filename or '?')}", file=sys.stderr)
            return EXIT_USAGE
        print(f"ncf-fast: error: {distributed.rank_prefix()}{type(exc).__name__}: "
              f"{_first_line(exc)} (set NCF_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
