"""The ``ncf-fast`` flags, :func:`main` and the mapping from errors to exit statuses: a user
mistake (CLIError, or a library ValueError/TypeError) is one line on stderr and status 2, Ctrl-C
130, a failing rank under torchrun 1, anything else one line and 1."""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys

from .. import __version__, backends, distributed, lineage
from ..checkpoints import DISK_FULL
from .applying import cmd_evaluate, cmd_transport
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, CLIError, first_line
from .run_folder import disk_full_message
from .training import DEMO_PROBLEM, DEMO_SAMPLES, cmd_demo, cmd_train

__all__ = ["build_parser", "main", "SUBCOMMANDS"]

SUBCOMMANDS = ("train", "transport", "demo", "evaluate")


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
                   help=f"gaussian:d=D[:seed=S] (a Gaussian pair with a known map), convex:d=D[:seed=S] "
                        f"(a known non-linear map with a translation), toy:TGT "
                        f"(source N(0, I)) or toy:SRC:TGT (2-D toys: circles, moons, 8gaussians, "
                        f"...), or a .npz with Sigma0, Sigma1; the short forms gaussian:D[:S], TGT "
                        f"and SRC:TGT also work (default: {DEMO_PROBLEM})")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="train.steps (default: the config's train.steps; null: 3000, 6000 from d = 32)")
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
    p.add_argument("--problem", metavar="P", help="gaussian:d=D[:seed=S], convex:d=D[:seed=S], a .npz with Sigma0, "
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
            from ..threads import set_threads
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
        print(f"ncf-fast: error: {distributed.rank_prefix()}{first_line(exc)}", file=sys.stderr)
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
            print(f"ncf-fast: error: {disk_full_message(exc.filename or '?')}", file=sys.stderr)
            return EXIT_USAGE
        print(f"ncf-fast: error: {distributed.rank_prefix()}{type(exc).__name__}: "
              f"{first_line(exc)} (set NCF_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
