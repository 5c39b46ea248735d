"""ncf_fast: optimal transport with Neural Characteristic Flows, with fused GPU kernels.

One scalar network u(x, t) trained on the Hamilton-Jacobi characteristic residual plus an
energy-distance marginal term gives closed-form forward and backward transport maps.
"""
__version__ = "0.1.0"

# first, before torch loads its OpenMP runtime: the CPU wait policy (see ncf_fast/threads.py)
from . import threads  # noqa: E402,I001
from . import costs, losses, metrics, problems  # noqa: E402
from .estimator import NCF  # noqa: E402
from .potential import PotentialMLP  # noqa: E402
from .trainer import TrainConfig  # noqa: E402
from .threads import set_threads  # noqa: E402

threads.apply_default()

__all__ = ["NCF", "PotentialMLP", "TrainConfig", "costs", "losses", "metrics", "problems",
           "set_threads", "threads", "__version__"]
