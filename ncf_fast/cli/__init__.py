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
convex:d=D[:seed=S] (a known non-linear map with a translation; short form convex:D[:S]),
toy:TGT or toy:SRC:TGT (2-D toys; short forms TGT, SRC:TGT), or a .npz with Sigma0 and Sigma1.

``python -m ncf_fast`` with the original research code's flags and no sub-command means ``train``.
A run writes one folder ``H/exps/NAME/<timestamp>/`` (see
:func:`ncf_fast.cli.run_folder.create_run_dir`) and prints its absolute path as the last line of
stdout. User mistakes print one line on stderr and exit with
status 2 without writing anything (a full disk too, keeping the last checkpoint); set
NCF_FAST_DEBUG=1 to see tracebacks.

The package, one module a concept: ``parser`` (the flags, :func:`main` and the error -> exit
status mapping), ``training`` (train, demo, resume, Ctrl-C), ``applying`` (transport, evaluate),
``run_folder`` (the run folder and its atomic files), ``inputs`` (what the flags name: device,
config, data files, checkpoints, problems) and ``errors`` (:class:`CLIError`).
"""
from .errors import CLIError
from .parser import build_parser, main

__all__ = ["main", "build_parser", "CLIError"]
