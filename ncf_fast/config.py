"""``setup.conf``: the HOCON run configuration of the command-line tool.

The file has three sections; every key has a default, so an empty file is valid::

    model { hidden = null, activation = null, cost = quadratic, t_final = 1.0, ... }
    train { steps = null, batch_size = null, lr = null, seed = 0, collocation { ... }, ... }
    run   { expname = ncf, checkpoint_every = 500, plot_points = 1500 }

:data:`KEYS` lists every key with its default, type and meaning (the README's table is
:func:`keys_markdown`). Precedence: defaults < the file < command-line flags. An unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key and the closest valid one.
pyhocon is imported only when a file is actually read, so ``import ncf_fast`` does not need it.

What a file may do (checked before pyhocon sees the text): at most :data:`MAX_BYTES`; no
``include`` of any kind (a setup.conf is self-contained, like the copy in each run folder, and
never opens another file or a URL); substitutions ``${key}`` / ``${?VAR}`` are resolved from the
file, then the environment, and the resolved values are checked like any other (``run.expname =
${HOME}`` is refused: an expname is a relative folder inside HOME/exps).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass

from .data import check_regular_file
from .backends import BACKENDS
from .sampling import COLLOCATION_KINDS
from .trainer import LARGE_DIM_MIN, LOW_DIM_MAX, LR_SCHEDULES, TrainConfig, dimension_defaults

__all__ = ["ConfigError", "KEYS", "MAX_BYTES", "defaults", "load_config", "parse_config",
           "to_hocon", "keys_markdown", "model_kwargs", "train_config"]

# the documented setup.conf with every key is ~3 KB; pyhocon is slow (superlinear in long lists)
# on big files: refuse them unread
MAX_BYTES = 16 * 1024
# bracket nesting a setup.conf may use; the documented one nests 3 deep
MAX_DEPTH = 16


class ConfigError(ValueError):
    """A bad setup.conf (or override): the message names the key and what to write instead."""


@dataclass(frozen=True)
class Key:
    name: str            # dotted name, e.g. "train.steps"
    default: object
    kind: str            # int, float, str, choice, widths
    doc: str
    choices: tuple = ()
    minimum: float | None = None   # inclusive lower bound for numbers
    positive: bool = False         # strictly > 0
    nullable: bool = False         # null allowed (numbers): the dimension's default


_TC = TrainConfig()  # the training defaults live in one place: TrainConfig


def _by_dim(name: str, kind: str | None = None) -> str:
    """'a (d <= 2), b (d >= 3)': a dimension-dependent default, for the key descriptions."""
    starts = (1, LOW_DIM_MAX + 1, LARGE_DIM_MIN)  # where a preset may change
    ranges = []  # [first d, value], equal neighbours merged
    for dim in starts:
        value = dimension_defaults(dim)[name]
        value = value.get(kind, 0.0) if kind is not None else value
        if not ranges or ranges[-1][1] != value:
            ranges.append([dim, value])
    if len(ranges) == 1:
        return f"{ranges[0][1]:g}"
    parts = []
    for k, (lo, value) in enumerate(ranges):
        hi = ranges[k + 1][0] - 1 if k + 1 < len(ranges) else None
        where = f"d <= {hi}" if lo == 1 else f"d >= {lo}" if hi is None else f"{lo} <= d <= {hi}"
        parts.append(f"{value:g} ({where})")
    return ", ".join(parts)


def _on_gpu(name: str) -> str:
    """'; N on a GPU': the large-batch GPU default (the same in every dimension)."""
    return f", {dimension_defaults(LOW_DIM_MAX + 1, 'cuda')[name]:g} on a GPU"
_COLLOCATION = COLLOCATION_KINDS

KEYS: tuple[Key, ...] = (
    Key("model.hidden", None, "widths",
        "hidden widths of u's MLP, e.g. [128, 128, 128]; null = 3 layers of 128 (d <= 8), 256 above"),
    Key("model.activation", None, "choice", "smooth activation; null: silu",
        ("softplus", "tanh", "silu"), nullable=True),
    Key("model.cost", "quadratic", "str", "transport cost: quadratic or power:q (1 < q <= 2)"),
    Key("model.t_final", 1.0, "float", "horizon t_f of the cost t_f l((y - x) / t_f)", positive=True),
    Key("model.dtype", "float32", "choice", "parameter precision", ("float32", "float64")),
    Key("model.backend", "auto", "choice",
        "the MLP's backend; auto = triton on CUDA where the kernels support the model, else torch",
        BACKENDS),
    Key("model.energy_backend", "auto", "choice",
        "the energy distance's backend in the loss; auto = triton on CUDA for float32, d <= 64",
        BACKENDS),
    Key("train.steps", _TC.steps, "int", f"Adam steps; null: {_by_dim('steps')}", positive=True,
        nullable=True),
    Key("train.batch_size", _TC.batch_size, "int",
        f"collocation points per step (L_HJ); null: {_by_dim('batch_size')}{_on_gpu('batch_size')}",
        positive=True, nullable=True),
    Key("train.mmd_batch_size", _TC.mmd_batch_size, "int",
        f"target samples per step (L_MMD); null: {_by_dim('mmd_batch_size')}"
        f"{_on_gpu('mmd_batch_size')}", minimum=2, nullable=True),
    Key("train.mmd_active", _TC.mmd_active, "int",
        f"pushed samples carrying L_MMD's gradient (0 = all); null: {_by_dim('mmd_active')}"
        f"{_on_gpu('mmd_active')}", minimum=0, nullable=True),
    Key("train.passive_age", _TC.passive_age, "int",
        f"steps a passive pushed sample is reused (the passive set is refreshed by "
        f"mmd_batch_size / passive_age rows a step); null: {_by_dim('passive_age')}", positive=True,
        nullable=True),
    Key("train.lr", _TC.lr, "float", f"peak learning rate; null: {_by_dim('lr')}", positive=True,
        nullable=True),
    Key("train.lr_final", _TC.lr_final, "float", "learning rate at the end of the cosine decay", minimum=0),
    Key("train.warmup", _TC.warmup, "int", "linear warm-up steps", minimum=0),
    Key("train.lr_schedule", _TC.lr_schedule, "choice", "after the warm-up: cosine decay to lr_final, "
        "or step: lr x lr_factor every lr_interval steps (the research code's Step)", LR_SCHEDULES),
    Key("train.lr_interval", _TC.lr_interval, "int", "steps between the step schedule's decays",
        positive=True),
    Key("train.lr_factor", _TC.lr_factor, "float", "the step schedule's factor per interval",
        positive=True),
    Key("train.weight_decay", _TC.weight_decay, "float", "Adam's L2 weight decay", minimum=0),
    Key("train.mmd_weight", _TC.mmd_weight, "float",
        f"lambda in L = L_HJ + lambda L_MMD; null: {_by_dim('mmd_weight')}", minimum=0,
        nullable=True),
    Key("train.backward_weight", _TC.backward_weight, "float",
        f"weight of the backward map's term ED(T^-1#nu, mu) beside L_MMD; null: "
        f"{_by_dim('backward_weight')}", minimum=0, nullable=True),
    Key("train.backward_active", _TC.backward_active, "int",
        "pulled targets with the backward term's gradient per step; null: mmd_active's value",
        positive=True, nullable=True),
    Key("train.backward_batch_size", _TC.backward_batch_size, "int",
        "the backward term's passive pulled targets and source samples per step; null: "
        "mmd_batch_size's value", positive=True, nullable=True),
    *(Key(f"train.collocation.{k}", None, "float",
          f"weight of {k} points in the collocation mixture; null: {_by_dim('collocation', k)}",
          minimum=0, nullable=True) for k in _COLLOCATION),
    Key("train.box_margin", _TC.box_margin, "float", "box widening, fraction of the data range", minimum=0),
    Key("train.eval_every", _TC.eval_every, "int", "steps between held-out checks", positive=True),
    Key("train.holdout", _TC.holdout, "int", "samples per side held out for the check", minimum=0),
    Key("train.time_limit", _TC.time_limit, "float",
        "wall-clock seconds for the fit; training stops after the step that crosses it (null: no "
        "limit)", positive=True, nullable=True),
    Key("train.seed", 0, "int", "seeds the initialisation, the held-out split and the batches", minimum=0),
    Key("run.expname", "ncf", "str", "experiment name: runs go to HOME/exps/EXPNAME/<timestamp>/"),
    Key("run.checkpoint_every", 500, "int", "steps between checkpoints (one is also written at the end)",
        positive=True),
    Key("run.plot_points", 1500, "int", "points drawn in the scatter plots", positive=True),
)
_BY_NAME = {k.name: k for k in KEYS}
_SECTIONS = {"model", "train", "run", "train.collocation"}


def defaults() -> dict:
    """{dotted key: default} for every key."""
    return {k.name: k.default for k in KEYS}


def _closest(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [k for k in _BY_NAME if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(name, list(_BY_NAME) + sorted(_SECTIONS), n=1, cutoff=0.6)
    if close:
        return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in _BY_NAME}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[close[0]] if close else None


def _unknown(name: str, source: str) -> ConfigError:
    near = _closest(name)
    hint = f"; did you mean {near!r}?" if near else "; see the README for the list of keys"
    return ConfigError(f"{source}: unknown key {name!r}{hint}")


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, dict):
        return "a section { ... }"
    if isinstance(value, list):
        return f"{value!r} (a list)"
    return repr(value)


def _check_expname(name: str, where: str):
    """An expname names a folder inside HOME/exps: relative, no '..', no control characters (a
    newline would also break the 'run folder is the last line of stdout' contract)."""
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{where} contains the control character {bad!r}; use letters, digits, "
                          "'-', '_' and '/' for subfolders")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith("~") or ".." in parts or not any(
            p not in ("", ".") for p in parts):
        raise ConfigError(f"{where} must be a relative folder name inside HOME/exps (such as ncf or "
                          f"group/run1, no '..'), got {name!r}")
    if any(len(p.encode("utf-8")) > 255 for p in parts):
        raise ConfigError(f"{where}: a folder name is longer than 255 bytes in {name!r}")


def _check_value(key: Key, value, source: str):
    """The value converted to the key's type, or a ConfigError naming the key."""
    where = f"{source}: {key.name}"
    if value is None and key.nullable:
        return None
    if key.kind == "widths":
        if value is None:
            return None
        if (not isinstance(value, list) or not value or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
            raise ConfigError(f"{where} must be a list of positive integers such as [64, 64, 64] "
                              f"(or null for the default), got {_describe(value)}")
        return [int(v) for v in value]
    if key.kind in ("str", "choice"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a string, got {_describe(value)}")
        if key.kind == "choice" and value.lower() not in key.choices:
            near = difflib.get_close_matches(value.lower(), key.choices, n=1)
            raise ConfigError(f"{where} must be one of {', '.join(key.choices)}, got {value!r}"
                              + (f"; did you mean {near[0]!r}?" if near else ""))
        if key.name == "run.expname":
            _check_expname(value, where)
        if key.name == "model.cost":
            from . import costs
            try:
                costs.get(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return value.lower() if key.kind == "choice" else value
    # numbers
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        noun = "an integer" if key.kind == "int" else "a number"
        raise ConfigError(f"{where} must be {noun}, got {_describe(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    if key.kind == "int":
        if not float(value).is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if key.positive and not value > 0:
        raise ConfigError(f"{where} must be positive, got {value!r}")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{where} must be >= {key.minimum:g}, got {value!r}")
    return value


def _flatten(tree, prefix: str, out: dict, source: str):
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            if name in _BY_NAME:  # a leaf written as a section
                _check_value(_BY_NAME[name], dict(v), source)
            if name not in _SECTIONS:
                if not v:
                    raise _unknown(name, source)
                _flatten(v, name + ".", out, source)  # report the first unknown leaf inside
                continue
            _flatten(v, name + ".", out, source)
        else:
            if name in _SECTIONS:
                raise ConfigError(f"{source}: {name} must be a section {{ ... }}, got {_describe(v)}")
            if name not in _BY_NAME:
                raise _unknown(name, source)
            out[name] = v


def parse_config(tree: dict, source: str = "setup.conf", overrides: dict | None = None,
                 base: dict | None = None) -> dict:
    """Validate a nested dict (a parsed file) plus {dotted key: value} overrides -> full flat dict.

    Precedence: :data:`KEYS` defaults < ``base`` (e.g. the demo's lighter defaults) < ``tree`` <
    ``overrides`` (command-line flags). Returns {dotted key: value} for every key."""
    from . import lineage  # the research code's setup.conf schema, mapped onto these keys
    tree, flat = lineage.translate(tree, source)
    _flatten(tree, "", flat, source)
    out = defaults()
    for name, value in (base or {}).items():
        if name not in _BY_NAME:
            raise _unknown(name, "base")
        out[name] = value
    for name, value in flat.items():  # the file must be valid on its own, whatever the flags
        out[name] = _check_value(_BY_NAME[name], value, source)
    for name, value in (overrides or {}).items():
        if name not in _BY_NAME:
            raise _unknown(name, "override")
        out[name] = _check_value(_BY_NAME[name], value, "command line")
    weights = [out[f"train.collocation.{k}"] for k in _COLLOCATION]
    if None not in weights and sum(weights) <= 0:
        raise ConfigError(f"{source}: train.collocation weights are all 0; give at least one "
                          f"kind ({', '.join(_COLLOCATION)}) a positive weight")
    train_config(out)  # TrainConfig's own checks, once, with the file named
    return out


def load_config(path: str | None = None, overrides: dict | None = None,
                base: dict | None = None) -> dict:
    """Read a HOCON setup.conf (None = defaults only) -> full flat {dotted key: value}.

    ``overrides`` (command-line values) win over the file; ``base`` sits below it."""
    if path is None:
        return parse_config({}, "defaults", overrides, base)
    path = os.fspath(path)
    try:
        check_regular_file(path, "config file", MAX_BYTES)
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # the file may have grown since the check
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than the {MAX_BYTES // 1024} KiB limit for a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise ConfigError(f"{path}: not a text file; --conf takes a HOCON file such as setup.conf")
    deep = _too_deep(text)
    if deep is not None:
        raise ConfigError(f"{path}: line {deep}: brackets nested more than {MAX_DEPTH} levels deep "
                          "(a setup.conf needs 2-3)")
    include = _find_include(text)
    if include is not None:
        raise ConfigError(f"{path}: line {include}: 'include' is not allowed; a setup.conf must be "
                          "self-contained (copy the included keys into it): ncf-fast never opens "
                          "other files or URLs from a config")
    try:
        from pyhocon import ConfigFactory
    except ImportError:
        raise ConfigError("reading a setup.conf needs pyhocon: pip install pyhocon") from None
    try:
        # basedir None: with no include left nothing is looked up relative to it anyway
        tree = ConfigFactory.parse_string(text)
    except RecursionError:
        raise ConfigError(f"{path}: not valid HOCON: nested too deeply") from None
    except Exception as exc:  # pyparsing / pyhocon exceptions: all mean "bad syntax"
        raise ConfigError(f"{path}: {_syntax_error(exc)}") from None
    if not isinstance(tree, dict):  # a file holding a bare list: [1, 2]
        raise ConfigError(f"{path}: not valid HOCON for a setup.conf: expected `key = value` lines "
                          "and `section { ... }` blocks")
    return parse_config(_plain(tree), path, overrides, base)


# what pyhocon's grammar accepts as the include keyword: case-insensitive, delimited by characters
# outside pyparsing's identifier set (letters, digits, '_', '$')
_INCLUDE = re.compile(r"(?<![A-Za-z0-9_$])include(?![A-Za-z0-9_$])", re.IGNORECASE)
# quoted strings, '#' comments, '//' comments after a blank (x//y is an unquoted string), escapes
_STRING = re.compile(r'"""[\s\S]*?"""+|"(?:[^"\\\n]|\\[^\n])*"?|#[^\n]*'
                     r'|(?:(?<=[ \t\n])|(?<![\s\S]))//[^\n]*|\\.', re.DOTALL)


def _blank_strings(text: str) -> str:
    """``text`` with quoted strings and comments blanked out (newlines kept, so line numbers hold)."""
    return _STRING.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def _too_deep(text: str) -> int | None:
    """The line where ``[``/``{`` nesting (outside strings and comments) passes MAX_DEPTH, or None:
    pyhocon's parser takes time exponential in the depth (3000 ``[`` in a 16 KiB file hang it)."""
    depth, line = 0, 1
    for ch in _blank_strings(text):
        if ch == "\n":
            line += 1
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return None


def _find_include(text: str) -> int | None:
    """The line of the first ``include`` outside quoted strings and '#' comments, or None.

    Deliberately broader than pyhocon's grammar (a '//' glued to a token is not taken for a
    comment, an unterminated string ends at its line), so that anything pyhocon could treat as an
    include is refused before pyhocon reads the text: its parse actions open includes while
    parsing, even in a file that turns out to be malformed further down."""
    blanked = _blank_strings(text)
    match = _INCLUDE.search(blanked)
    return None if match is None else blanked.count("\n", 0, match.start()) + 1


def _syntax_error(exc) -> str:
    """A pyparsing / pyhocon exception as 'not valid HOCON at line L, column C: ...' (pyparsing's
    own message can be a dump of the grammar)."""
    line, col = getattr(exc, "lineno", None), getattr(exc, "col", None)
    text = " ".join(str(getattr(exc, "msg", None) or exc).split()) or type(exc).__name__
    if line is None:
        found = re.search(r"\(line: ?(\d+), col: ?(\d+)\)", text)
        line, col = (int(found.group(1)), int(found.group(2))) if found else (None, None)
        text = re.sub(r"\s*\(line: ?\d+, col: ?\d+\)", "", text)
    if len(text) > 80 or "Suppress" in text or "{" in text:
        text = "expected `key = value`, `key { ... }` or a comment"
    where = f" at line {line}, column {col}" if line is not None else ""
    return f"not valid HOCON{where}: {text}"


def _plain(tree):
    """pyhocon ConfigTree -> plain nested dicts/lists (pyhocon's null becomes None)."""
    if isinstance(tree, dict):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    if type(tree).__name__ == "NoneValue":
        return None
    return tree


def nested(flat: dict) -> dict:
    """{dotted key: value} -> nested dicts."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def to_hocon(flat: dict) -> str:
    """The resolved config as a setup.conf that :func:`load_config` reads back to the same dict."""
    lines = ["# resolved configuration of this run (ncf-fast train --conf accepts this file)"]

    def emit(node, indent):
        for k, v in node.items():
            pad = "  " * indent
            if isinstance(v, dict):
                lines.append(f"{pad}{k} {{")
                emit(v, indent + 1)
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{k} = {json.dumps(v)}")
    emit(nested(flat), 0)
    return "\n".join(lines) + "\n"


def train_config(flat: dict) -> TrainConfig:
    """The :class:`TrainConfig` of a resolved config."""
    fields = {n.split(".", 1)[1]: v for n, v in flat.items()
              if n.startswith("train.") and not n.startswith("train.collocation.") and n != "train.seed"}
    coll = {k: flat[f"train.collocation.{k}"] for k in _COLLOCATION}  # None: the dimension's
    coll = None if all(w is None for w in coll.values()) else coll
    try:
        return TrainConfig(**fields, collocation=coll)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"train: {exc}") from None


def model_kwargs(flat: dict) -> dict:
    """Keyword arguments of :class:`ncf_fast.NCF` (all but dim and device) from a resolved config."""
    m = {n.split(".", 1)[1]: v for n, v in flat.items() if n.startswith("model.")}
    hidden = tuple(m.pop("hidden")) if m["hidden"] is not None else None
    return {**m, "hidden": hidden, "seed": flat["train.seed"]}


def keys_markdown() -> str:
    """The README's table: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for k in KEYS:
        default = "null" if k.default is None else json.dumps(k.default)
        doc = k.doc + (f" ({' / '.join(k.choices)})" if k.choices and k.kind == "choice" else "")
        rows.append(f"| `{k.name}` | `{default}` | {doc} |")
    return "\n".join(rows)
