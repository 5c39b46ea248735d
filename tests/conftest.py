"""Test configuration: Triton runs interpreted on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    """A fresh, seeded numpy Generator per test (seed printed by pytest on failure via the id)."""
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(0)
