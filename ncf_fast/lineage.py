"""The research code's conventions: its setup.conf schema, its run.py flags, its checkpoints.

NCF's own repository is not available to us. Its README's command line (``run.py --home_dir
--conf setup.conf --data_dir --input --output --gpu``) is the first author's house style, shown
in full by her earlier released code (PINC, 2023), which belongs to the IGR lineage of
implicit-network code. This module accepts that lineage's conventions so that a user of the
research code switches by changing only the program name. All of it is *inferred* from the
lineage, not verified against NCF's repository (README, "Coming from the research code").

- setup.conf: :data:`CONF_MAP` is the one mapping table; :func:`translate` (called by
  :func:`ncf_fast.config.parse_config`) turns the lineage's keys into ncf_fast's and collects
  the keys with no ncf_fast meaning, which the CLI reports once, by name (:func:`take_ignored`).
- flags: ``--nepoch`` (= steps: the lineage's epoch is one optimizer step), ``--points_batch``,
  ``--is_continue``, ``--timestamp``, ``--checkpoint``, ``--eval`` (:func:`add_train_flags`,
  :func:`run_checkpoint`) and ``--gpu auto`` (:func:`least_loaded_gpu`).
- checkpoints: ``checkpoints/ModelParameters/<epoch>.pth`` and ``latest.pth`` holding
  ``{"epoch", "model_state_dict"}`` of an MLP ``lin0 ... linK`` with softplus(beta) are read
  (:func:`checkpoint_from_lineage`), never written: such a file holds raw weights only, so a
  reader cannot tell our standardisation, cost, horizon or activation from it, and we cannot
  check what NCF's own loader would make of it.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re

import torch

from .config import ConfigError

__all__ = ["CONF_MAP", "translate", "take_ignored", "mapping_markdown", "add_train_flags",
           "overrides", "continues", "run_checkpoint", "eval_args", "least_loaded_gpu",
           "checkpoint_from_lineage", "lineage_run_checkpoints", "DEFAULT_BETA"]

DEFAULT_BETA = 100.0  # the lineage network's softplus beta when its setup.conf gives none

# The one mapping table: (the research code's key, the ncf_fast key it sets or None, note).
# A key ending in ".*" stands for its whole section.
CONF_MAP: tuple[tuple[str, str | None, str], ...] = (
    ("train.learning_rate_schedule", "train.lr_schedule",
     "`[{Type = Step, Initial, Interval, Factor}]` → `lr_schedule = step`, `lr`, `lr_interval`, "
     "`lr_factor` and `warmup = 0`; `Type = Constant, Value` → a step schedule with factor 1; "
     "entries after the first (the lineage's latent-code group) are ignored"),
    ("train.checkpoint_frequency", "run.checkpoint_every", "steps between checkpoints"),
    ("train.status_frequency", "train.eval_every", "steps between status lines (held-out checks)"),
    ("network.inputs.dims", "model.hidden", "hidden widths"),
    ("network.inputs.beta", "model.activation",
     "softplus; training uses beta 1 (ncf_fast's softplus), a checkpoint's beta is honoured exactly"),
)
# the research code's keys that mean nothing here: key, then why (one per line)
_IGNORED = """\
network.inputs.skip_in         ignored: ncf_fast's MLP has no skip connections
network.inputs.geometric_init  ignored: ncf_fast starts u constant (T = identity)
network.inputs.radius_init     ignored (geometric initialisation)
train.plot_frequency           ignored: the plots are drawn once, at the end
train.d_in                     ignored: d comes from the data
train.network_class            ignored: the network is ncf_fast's
train.input_path               ignored: --data_dir, --input, --output name the data
train.dataset_path             ignored, as input_path
train.preprocess               ignored: ncf_fast standardises the data itself
train.latent_size              ignored: no latent codes
network.sampler.*              ignored: ncf_fast's collocation is `train.collocation`
network.loss.*                 ignored: ncf_fast's loss weight is `train.mmd_weight`
plot.*                         ignored: ncf_fast's plots take `run.plot_points`
"""
CONF_MAP += tuple((line[:line.index(" ")], None, line[line.index(" "):].strip())
                  for line in _IGNORED.splitlines())
_MAPPED = {k: v for k, v, _ in CONF_MAP if not k.endswith(".*")}
_SECTIONS = tuple(k[:-2] for k, _, _ in CONF_MAP if k.endswith(".*"))
_SCHEDULE_KEYS = {"Step": ("Initial", "Interval", "Factor"), "Constant": ("Value",)}
_ignored: dict[str, list] = {}  # {file: the names translate() ignored there}, until take_ignored()


def translate(tree: dict, source: str) -> tuple[dict, dict]:
    """A parsed setup.conf (nested dicts) -> (the tree without the lineage's keys, {ncf_fast
    dotted key: value} they set). Keys with no ncf_fast meaning are remembered for
    :func:`take_ignored`; a misspelt lineage key or a bad value raises :class:`ConfigError`."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    found: dict = {}   # lineage dotted name -> value
    ignored: list[str] = []
    for section in ("network", "plot"):
        if section in tree:
            _collect(tree.pop(section), section, found, ignored, source)
    train = tree.get("train")
    for key in [k for k in train if f"train.{k}" in _MAPPED] if isinstance(train, dict) else ():
        value = train.pop(key)
        if _MAPPED[f"train.{key}"] is None:
            ignored.append(f"train.{key}")
        else:
            found[f"train.{key}"] = value
    out = {}
    if "train.learning_rate_schedule" in found:
        out.update(_schedule(found.pop("train.learning_rate_schedule"), source, ignored))
    for name, value in found.items():
        where = f"{source}: {name}"
        if name == "network.inputs.dims":
            if (not isinstance(value, list) or not value or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
                raise ConfigError(f"{where} must be a list of positive integers such as [512, 512], "
                                  f"got {value!r}")
            out["model.hidden"] = list(value)
        elif name == "network.inputs.beta":
            _number(value, where)
            out["model.activation"] = "softplus"
            ignored.append(f"{name}'s value (softplus with beta 1 in training)")
        else:
            out[_MAPPED[name]] = _number(value, where, integer=True)
    for key, value in out.items():  # ncf_fast's own key may say the same, or set warmup anew
        if _get(tree, key, value) != value and key != "train.warmup":
            given = [n for n, k in _MAPPED.items() if k == key] or ["train.learning_rate_schedule"]
            raise ConfigError(f"{source}: {key} and the research code's {given[0]} both set it, "
                              "differently; keep one of them")
    if ignored:
        _ignored[source] = ignored
    return tree, out


def _collect(node, name: str, found: dict, ignored: list, source: str):
    """Sort the leaves under ``name`` (network or plot) into mapped ones and ignored ones."""
    if any(name == s or name.startswith(s + ".") for s in _SECTIONS):
        ignored.extend(_leaves(node, name))
    elif not isinstance(node, dict):
        if name not in _MAPPED:
            raise ConfigError(f"{source}: {name} must be a section {{ ... }}, got {node!r}")
        if _MAPPED[name] is None:
            if node not in ([], None):  # skip_in = []: no skips, as here
                ignored.append(name)
        else:
            found[name] = node
    else:
        for key, value in node.items():
            child = f"{name}.{key}"
            names = list(_MAPPED) + list(_SECTIONS)
            if not any(k == child or k.startswith(child + ".") for k in names):
                near = difflib.get_close_matches(child, names, n=1)
                raise ConfigError(f"{source}: unknown key {child!r}" + (
                    f"; did you mean {near[0]!r}?" if near else
                    "; see the README, \"Coming from the research code\""))
            _collect(value, child, found, ignored, source)


def _leaves(node, name: str) -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{name}.{k}")]
    return [name]


def _get(tree: dict, dotted: str, missing=None):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _number(value, where: str, integer: bool = False):
    """A positive number (integer if asked), or a ConfigError naming the research code's key."""
    noun = "a positive integer" if integer else "a positive number"
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            or value != value or value == float("inf") or (integer and not float(value).is_integer())):
        raise ConfigError(f"{where} must be {noun}, got {value!r}")
    return int(value) if integer else float(value)


def _schedule(value, source: str, ignored: list) -> dict:
    """train.learning_rate_schedule -> ncf_fast's step schedule (warm-up off: the lineage has none)."""
    where = f"{source}: train.learning_rate_schedule"
    entries = [value] if isinstance(value, dict) else value
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{where} must be a list of schedules such as [{{ Type = Step, Initial = "
                          f"0.001, Interval = 2000, Factor = 0.5 }}], got {value!r}")
    ignored.extend(f"train.learning_rate_schedule[{i}]" for i in range(1, len(entries)))
    entry, kind = entries[0], entries[0].get("Type")
    if kind not in _SCHEDULE_KEYS:
        raise ConfigError(f"{where}: Type {kind!r} is not supported; use Step (Initial, Interval, "
                          "Factor) or Constant (Value), or ncf_fast's own train.lr_schedule = cosine")
    for key in entry:
        if key != "Type" and key not in _SCHEDULE_KEYS[kind]:
            near = difflib.get_close_matches(key, _SCHEDULE_KEYS[kind], n=1)
            raise ConfigError(f"{where}: unknown key {key!r} in a {kind} schedule"
                              + (f"; did you mean {near[0]!r}?" if near else
                                 f" (it takes {', '.join(_SCHEDULE_KEYS[kind])})"))
    missing = [k for k in _SCHEDULE_KEYS[kind] if k not in entry]
    if missing:
        raise ConfigError(f"{where}: a {kind} schedule needs {', '.join(missing)}")
    if kind == "Constant":
        return {"train.lr": _number(entry["Value"], f"{where}: Value"), "train.lr_schedule": "step",
                "train.lr_factor": 1.0, "train.warmup": 0}
    return {"train.lr": _number(entry["Initial"], f"{where}: Initial"), "train.lr_schedule": "step",
            "train.lr_interval": _number(entry["Interval"], f"{where}: Interval", integer=True),
            "train.lr_factor": _number(entry["Factor"], f"{where}: Factor"), "train.warmup": 0}


def take_ignored(source) -> str | None:
    """The line naming the research code's keys that :func:`translate` ignored in ``source``
    (None if none), once. The CLI prints it when a run starts, so that bad input still gives
    exactly one line on stderr."""
    names = _ignored.pop(str(source), None) if source is not None else None
    if not names:
        return None
    return f"{source}: keys of the research code with no ncf_fast meaning, ignored: {', '.join(names)}"


def mapping_markdown() -> str:
    """The README's table of :data:`CONF_MAP`."""
    rows = ["| research code | ncf_fast | note |", "|---|---|---|"]
    rows += [f"| `{k}` | {f'`{v}`' if v else '—'} | {note} |" for k, v, note in CONF_MAP]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------ flags
def add_train_flags(parser: argparse.ArgumentParser, positive_int):
    """The research code's run.py flags that ncf-fast train adds to its own."""
    parser.add_argument("--nepoch", type=positive_int, dest="steps", metavar="N",
                        help="= --steps (the research code's name: one epoch is one step)")
    parser.add_argument("--points_batch", type=positive_int, metavar="N",
                        help="train.batch_size (collocation points per step)")
    parser.add_argument("--is_continue", action="store_true", help="continue the latest run of "
                        "EXPNAME (or --timestamp T) from its latest checkpoint (or --checkpoint N)")
    parser.add_argument("--timestamp", type=_timestamp, metavar="T",
                        help="the run folder under HOME/exps/EXPNAME (default: latest)")
    parser.add_argument("--checkpoint", type=_checkpoint, metavar="latest|N",
                        help="the step to continue or evaluate from (default: latest)")
    parser.add_argument("--eval", action="store_true", help="evaluate that run instead of "
                        "training (prints the metrics; writes nothing)")


def _timestamp(text: str) -> str:
    if not text or text in (".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"expected a run folder name under HOME/exps/EXPNAME or "
                                         f"latest, got {text!r}")
    return text


def _checkpoint(text: str):
    if text == "latest":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected latest or a step number, got {text!r}")
    return int(text)


def overrides(args) -> dict:
    """{config key: value} of the research code's flags that set a key (--nepoch is --steps)."""
    value = getattr(args, "points_batch", None)
    return {} if value is None else {"train.batch_size": value}


def continues(args) -> bool:
    """True when --is_continue or --eval names a run to use; checks the flags go together."""
    is_continue, evaluate = getattr(args, "is_continue", False), getattr(args, "eval", False)
    if not (is_continue or evaluate):
        for flag in ("timestamp", "checkpoint"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag} names the run to continue or evaluate; add --is_continue "
                                 "or --eval")
        return False
    if is_continue and evaluate:
        raise ValueError("--is_continue trains on, --eval only evaluates; choose one")
    if args.resume:
        raise ValueError("--resume RUN_DIR and --is_continue/--eval both name a run; use one")
    return True


def _run_key(name: str):
    """Chronological order of run folders: ncf_fast's 2026-01-31_12-00-00[_2] and the lineage's
    2026_01_31_12_00_00 both sort by their numbers."""
    return [int(k) for k in re.findall(r"\d+", name)], name


def run_checkpoint(args, expname: str) -> str:
    """The checkpoint file --is_continue/--eval [--timestamp T] [--checkpoint N] name:
    HOME/exps/EXPNAME/T/checkpoints/latest.pt or step_N.pt (T: the latest run that has one)."""
    home = os.path.abspath(os.path.expanduser(args.home_dir or os.getcwd()))
    folder = os.path.join(home, "exps", expname)
    runs = sorted((n for n in (os.listdir(folder) if os.path.isdir(folder) else ())
                   if os.path.isdir(os.path.join(folder, n))), key=_run_key)
    stamp = args.timestamp if args.timestamp not in (None, "latest") else None
    if stamp is None:
        usable = [n for n in runs
                  if os.path.isfile(os.path.join(folder, n, "checkpoints", "latest.pt"))]
        if not usable:
            raise ValueError(f"no run of {expname!r} to continue or evaluate"
                             + (" (only runs of the research code: ncf_fast reads, not continues them)"
                                if runs else "; start one without --is_continue/--eval") + f": {folder}")
        stamp = usable[-1]
    elif stamp not in runs:
        near = difflib.get_close_matches(stamp, runs, n=1)
        raise ValueError(f"--timestamp {stamp}: no such run of {expname!r}"
                         + (f"; did you mean {near[0]!r}?" if near else
                            f" (the latest: {', '.join(runs[-3:]) or 'none'})") + f" in {folder}")
    ckpt_dir = os.path.join(folder, stamp, "checkpoints")
    name = "latest.pt" if args.checkpoint in (None, "latest") else f"step_{args.checkpoint:06d}.pt"
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path) and os.path.isdir(os.path.join(ckpt_dir, "ModelParameters")):
        raise ValueError(f"--timestamp {stamp}: a run of the research code; ncf_fast reads its "
                         "checkpoints (transport/evaluate --checkpoint) but cannot continue it")
    if not os.path.isfile(path):
        steps = sorted(int(n[5:11]) for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ())
                       if re.fullmatch(r"step_\d{6}\.pt", n))
        raise ValueError(f"--checkpoint {args.checkpoint or 'latest'}: no {name} (checkpoints at steps "
                         f"{', '.join(map(str, steps[-8:])) or 'none'}) in {os.path.join(folder, stamp)}")
    return path


def eval_args(args, ckpt: dict) -> argparse.Namespace:
    """The ``ncf-fast evaluate`` arguments for --eval: the run's checkpoint on the run's data
    (--input/--output, under --data_dir, replace it) or on its built-in problem."""
    run = ckpt.get("run")
    if not isinstance(run, dict):
        raise ValueError(f"{args.resume}: not written by ncf-fast train (no run record); use "
                         "ncf-fast evaluate --checkpoint with --input and --output")
    paths = dict(run.get("paths") or {})
    for k in ("input", "output"):
        if getattr(args, k, None) is not None:
            paths[k] = os.path.abspath(os.path.join(args.data_dir or "", getattr(args, k)))
    problem = run.get("problem") if getattr(args, "input", None) is None else None
    return argparse.Namespace(**{**vars(args), "checkpoint": args.resume, "problem": problem,
                                 "input": paths.get("input"), "output": paths.get("output"),
                                 "samples": 10_000, "json": False, "time_axis": None})


def least_loaded_gpu() -> str:
    """--gpu auto: the visible CUDA device with the most free memory, "cpu" without CUDA (the
    lineage asks GPUtil for the least loaded one)."""
    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if count == 1:
        return "0"
    free = [torch.cuda.mem_get_info(i)[0] for i in range(count)]
    return str(max(range(count), key=free.__getitem__))


# ------------------------------------------------------------------------------ checkpoints
_LIN = re.compile(r"lin(\d+)\.(weight|bias|weight_g|weight_v)")


def lineage_run_checkpoints(folder: str) -> tuple[str, ...]:
    """Where a run folder of the research code keeps its latest model parameters."""
    return (os.path.join(folder, "checkpoints", "ModelParameters", "latest.pth"),
            os.path.join(folder, "ModelParameters", "latest.pth"))


def checkpoint_from_lineage(obj: dict, path: str, time_axis: str | None = None,
                            beta: float | None = None) -> dict:
    """A research-code checkpoint ``{"epoch", "model_state_dict"}`` -> the fields of an ncf_fast
    checkpoint (config, state_dict, shift, scale) of the same potential.

    The network must be a plain MLP ``lin0 ... linK`` (weights W_k (n_k+1, n_k), optionally
    weight-normed ``weight_g``/``weight_v``) on an input of d + 1 columns, softplus with ``beta``
    between the layers and a scalar output: u(x, t) on raw (unstandardised) coordinates, with the
    quadratic cost and t_f = 1 (the lineage's and the paper's; not recorded in the file).

    time_axis: "last" (the input is [x, t]) or "first" ([t, x]); a file does not say, so it
    must be given. beta: softplus(a) = log(1 + e^(beta a)) / beta (None: the run folder's
    runconf.conf, else :data:`DEFAULT_BETA`). softplus_beta(a) = softplus(beta a) / beta, so
    scaling W_0 and every hidden bias by beta and the last weight by 1 / beta gives the same u
    with ncf_fast's softplus (beta 1), exactly. Skip connections, other modules, wrong shapes:
    ValueError.
    """
    if "model_state_dict" not in obj:
        raise ValueError(f"{path}: an optimizer state of the research code (OptimizerParameters/); "
                         "pass its model's file, ModelParameters/<epoch>.pth")
    state = obj["model_state_dict"]
    if (not isinstance(state, dict) or not state
            or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"{path}: model_state_dict holds no tensors; not a checkpoint of a network")
    layers: dict[int, dict] = {}
    for key, value in state.items():
        match = _LIN.fullmatch(str(key))
        if match is None:
            raise ValueError(f"{path}: parameter {key!r} is not one of a plain MLP lin0 ... linK; "
                             "ncf_fast reads only such a potential u(x, t)")
        layers.setdefault(int(match[1]), {})[match[2]] = value.detach().to(torch.float64)
    count = len(layers)
    if sorted(layers) != list(range(count)) or count < 2:
        raise ValueError(f"{path}: layers {sorted(layers)}; a potential needs lin0 ... linK with "
                         "K >= 1 (at least one hidden layer)")
    params = [_linear(layers[k], k, path) for k in range(count)]
    d_in = params[0][0].shape[1]
    for k in range(1, count):
        have, want = params[k][0].shape[1], params[k - 1][0].shape[0]
        if have != want:
            what = (f"a skip connection re-injecting the input at lin{k}" if have == want + d_in
                    else f"lin{k} takes {have} inputs but lin{k - 1} gives {want}")
            raise ValueError(f"{path}: {what}; ncf_fast reads plain MLPs only (retrain without "
                             "skip_in, or with ncf-fast train)")
    if params[-1][0].shape[0] != 1:
        raise ValueError(f"{path}: lin{count - 1} gives {params[-1][0].shape[0]} outputs; the "
                         "potential u(x, t) is a scalar")
    if d_in < 2:
        raise ValueError(f"{path}: the network takes {d_in} input; u(x, t) takes d + 1 >= 2")
    if time_axis not in ("last", "first"):
        raise ValueError(f"{path}: a checkpoint of the research code does not say where its network "
                         "takes t; give time_axis last (input [x, t]) or first ([t, x]) "
                         "(NCF.load(path, time_axis=...) or --time_axis)")
    beta = _beta(path) if beta is None else float(beta)
    if not 0 < beta < float("inf"):
        raise ValueError(f"{path}: softplus beta must be a positive number, got {beta!r}")
    weights = [w.clone() for w, _ in params]
    biases = [b * beta for _, b in params[:-1]] + [params[-1][1].clone()]
    if time_axis == "first":
        weights[0] = torch.cat((weights[0][:, 1:], weights[0][:, :1]), dim=1)
    weights[0] *= beta
    weights[-1] /= beta
    dtype = next(iter(state.values())).dtype
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    sd = {f"layers.{k}.{n}": t.to(dtype) for k in range(count)
          for n, t in (("weight", weights[k]), ("bias", biases[k]))}
    return {"config": {"dim": d_in - 1, "hidden": [int(w.shape[0]) for w in weights[:-1]],
                       "activation": "softplus", "cost": "quadratic", "t_final": 1.0,
                       "dtype": str(dtype).replace("torch.", ""), "seed": 0, "backend": "auto"},
            "state_dict": sd, "shift": torch.zeros(d_in - 1, dtype=torch.float64), "scale": 1.0,
            "lineage": {"epoch": obj.get("epoch"), "beta": beta, "time_axis": time_axis}}


def _linear(p: dict, k: int, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of lin{k}; a weight-normed layer's W = g v / |v| (one norm per output row)."""
    if "weight_g" in p or "weight_v" in p:
        if "weight_g" not in p or "weight_v" not in p:
            raise ValueError(f"{path}: lin{k} has only half of a weight-normed weight "
                             "(weight_g, weight_v)")
        v = p["weight_v"]
        w = p["weight_g"].reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)
    else:
        w = p.get("weight")
    b = p.get("bias")
    if w is None or b is None or w.dim() != 2 or tuple(b.shape) != (w.shape[0],):
        shapes = {n: tuple(t.shape) for n, t in p.items()}
        raise ValueError(f"{path}: lin{k} is not a linear layer (weight (out, in) and bias (out,)): "
                         f"{shapes}")
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise ValueError(f"{path}: lin{k} holds NaN or Inf weights")
    return w, b


def _beta(path: str) -> float:
    """network.inputs.beta of the run's runconf.conf (the lineage copies its setup.conf there:
    RUN/checkpoints/ModelParameters/<epoch>.pth -> RUN/runconf.conf), else DEFAULT_BETA."""
    run = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    conf = os.path.join(run, "runconf.conf")
    if not os.path.isfile(conf):
        return DEFAULT_BETA
    try:
        from pyhocon import ConfigFactory
        value = ConfigFactory.parse_file(conf).get("network.inputs.beta", DEFAULT_BETA)
    except Exception as exc:  # pyhocon's parse errors, a missing pyhocon: say which file
        detail = " ".join(str(exc).split())[:120]
        raise ValueError(f"{conf}: cannot read network.inputs.beta ({detail}); pass beta explicitly") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{conf}: network.inputs.beta must be a number, got {value!r}")
    return float(value)
