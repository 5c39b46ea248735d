"""``python -m ncf_fast``: the ``ncf-fast`` command line (see :mod:`ncf_fast.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
