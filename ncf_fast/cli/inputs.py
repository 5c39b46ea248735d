"""What the flags name, read and checked before anything is written: the device, the config, the
sample and label files, checkpoints and built-in problems. Every mistake is a CLIError."""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import backends, distributed, lineage, problems
from .. import config as config_mod
from .. import data as data_mod
from ..checkpoints import read_checkpoint
from ..estimator import NCF
from .errors import CLIError, usage_errors

__all__ = ["resolve_device", "check_backends", "resolve_path", "flag_overrides", "run_config",
           "samples_file", "labels_file", "load_data", "checkpoint_file", "load_checkpoint",
           "load_model", "named_problem"]


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


def check_backends(model_kwargs: dict, device: torch.device):
    """--backend / --energy_backend triton on a machine without CUDA: refused before any file is
    written (the model's own limits are checked when NCF is built)."""
    for name in ("backend", "energy_backend"):
        if model_kwargs.get(name) == backends.TRITON and device.type != "cuda" and (
                os.environ.get("TRITON_INTERPRET") != "1"):
            raise CLIError(f"{name} triton needs a CUDA device; use --{name} torch (or auto) on "
                           "the CPU")


def resolve_path(data_dir: str | None, name: str | None) -> str | None:
    """--input NAME relative to --data_dir D (absolute)."""
    if name is None:
        return None
    return os.path.abspath(os.path.join(data_dir, name) if data_dir else name)


def flag_overrides(args) -> dict:
    """The flags that override setup.conf keys, as {key: value}."""
    out = {}
    for flag, key in (("steps", "train.steps"), ("seed", "train.seed"), ("expname", "run.expname"),
                      ("backend", "model.backend"), ("energy_backend", "model.energy_backend"),
                      ("time_limit", "train.time_limit")):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    out.update(lineage.overrides(args))  # --points_batch
    return out


def run_config(args, base=None) -> dict:
    """--conf with the flags on top (``base``: defaults under the file), as flat keys."""
    with usage_errors(config_mod.ConfigError):
        return config_mod.load_config(args.conf, flag_overrides(args), base=base)


def samples_file(path: str, what: str) -> np.ndarray:
    """:func:`ncf_fast.data.load_array` with its errors as CLIError."""
    with usage_errors():
        return data_mod.load_array(path, what)


def labels_file(path: str, n: int, what: str) -> np.ndarray:
    """:func:`ncf_fast.data.load_labels` with its errors as CLIError."""
    with usage_errors():
        return data_mod.load_labels(path, n, what)


def load_data(paths: dict) -> dict:
    """{"input", "output", "input_labels", "output_labels"} paths -> arrays, checked together."""
    if paths.get("input") is None or paths.get("output") is None:
        raise CLIError("train needs --input and --output: .npy files of source and target samples, "
                       "shape (N, d) (or run `ncf-fast demo`)")
    if (paths.get("input_labels") is None) != (paths.get("output_labels") is None):
        raise CLIError("--input_labels and --output_labels go together (class-conditional OT); "
                       "give both or neither")
    src = samples_file(paths["input"], "--input (source samples)")
    tgt = samples_file(paths["output"], "--output (target samples)")
    if src.shape[1] != tgt.shape[1]:
        raise CLIError(f"{paths['input']} has dimension {src.shape[1]} but {paths['output']} has "
                       f"dimension {tgt.shape[1]}; source and target samples must have the same d")
    data = {"input": src, "output": tgt, "input_labels": None, "output_labels": None}
    if paths.get("input_labels") is not None:
        data["input_labels"] = labels_file(paths["input_labels"], src.shape[0], "--input_labels")
        data["output_labels"] = labels_file(paths["output_labels"], tgt.shape[0], "--output_labels")
    return data


def checkpoint_file(path: str) -> str:
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


def load_checkpoint(path: str, time_axis=None) -> dict:
    """The checkpoint's dict (a research-code checkpoint converted, ``time_axis`` its input order)."""
    with usage_errors(ValueError, FileNotFoundError):
        return read_checkpoint(path, time_axis)


def load_model(path: str, device, time_axis=None) -> NCF:
    """The fitted NCF a checkpoint holds, on ``device``."""
    ckpt = load_checkpoint(path, time_axis)
    with usage_errors(ValueError, TypeError):
        return NCF.from_checkpoint(ckpt, device=device, path=path)



def named_problem(spec: str) -> problems.NamedProblem:
    """--problem SPEC -> :func:`ncf_fast.problems.parse_problem`, errors as CLIError."""
    with usage_errors(ValueError, FileNotFoundError):
        return problems.parse_problem(spec)
