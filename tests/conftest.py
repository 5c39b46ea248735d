"""Test configuration: Triton runs interpreted on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# what ncf_fast/threads.py does when it is imported before torch; here torch comes first, and
# libgomp reads the policy once, at load: with spinning idle threads the --quick class-conditional
# run took 575 s instead of ~60 s beside other busy processes (a 5-step fit 42.7 s, passive 4.1 s)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
# A fixed thread count for this process and the CLI processes the tests start: the library would
# otherwise follow the machine's load (ncf_fast/threads.py), and the count changes the order of
# floating-point sums, which the resume and reproducibility tests compare bit for bit.
os.environ.setdefault("NCF_FAST_THREADS", str(torch.get_num_threads()))


@pytest.fixture
def rng():
    """A fresh, seeded numpy Generator per test (seed printed by pytest on failure via the id)."""
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(0)
