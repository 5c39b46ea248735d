"""What the command line does with a mistake: :class:`CLIError` (one line on stderr, exit status
2) and the exit statuses; :func:`usage_errors` turns the library's ValueError/TypeError into it."""
from __future__ import annotations

import contextlib
import sys

from .. import distributed
from ..data import first_line

__all__ = ["CLIError", "EXIT_USAGE", "EXIT_INTERRUPTED", "usage_errors", "info", "first_line"]

EXIT_USAGE = 2          # bad input: one line on stderr, nothing written
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: checkpoint saved, resume later (128 + SIGINT)


class CLIError(Exception):
    """A user mistake: printed as one line on stderr, exit status 2."""


@contextlib.contextmanager
def usage_errors(*kinds):
    """Inside: the library's ValueError, TypeError and FileNotFoundError (or ``kinds``) become a
    CLIError with the same message (the library's checks name the problem and the remedy)."""
    try:
        yield
    except (kinds or (ValueError, TypeError, FileNotFoundError)) as exc:
        raise CLIError(str(exc)) from None


def info(args, msg: str):
    """A progress line on stderr, unless --quiet; under torchrun only rank 0 speaks."""
    if not getattr(args, "quiet", False) and distributed.is_main():
        print(msg, file=sys.stderr, flush=True)
