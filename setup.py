"""ncf_fast: Neural Characteristic Flows for optimal transport, with fused Triton kernels."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "ncf_fast" / "__init__.py").read_text()).group(1)

setup(
    name="ncf_fast",
    version=VERSION,
    description="Optimal transport with Neural Characteristic Flows: closed-form forward and "
                "backward maps, fused Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the kernels live in kernels/ at the top of the repository but install as ncf_fast.kernels
    # (a top-level module named "kernels" collides with an unrelated PyPI package)
    packages=["ncf_fast", "ncf_fast.cli", "ncf_fast.kernels"],
    package_dir={"ncf_fast": "ncf_fast", "ncf_fast.kernels": "kernels"},
    # the C sources of the CPU kernels (pair sums, MLP elementwise passes), compiled on first
    # use (ncf_fast/native.py)
    package_data={"ncf_fast": ["cpu_pairs.c", "cpu_mlp.c"]},
    install_requires=[
        # any torch >= 2.1 works; a torch already installed is kept (pip does not upgrade it)
        "torch>=2.1",
        "numpy>=1.23",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
        "matplotlib>=3.5",
        "pyhocon>=0.3.59",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "scipy>=1.9"],
        # examples/: bundled photographs and digits, and POT's baseline (never installed by default)
        "examples": ["scikit-image>=0.19", "scikit-learn>=1.0", "POT>=0.9"],
        # benchmarks/peers.py and peers_energy.py: the other OT tools, pinned to the versions
        # measured (benchmarks/RESULTS.md), CPU jax. torchcfm is NOT listed: its dependencies
        # (torchdyn -> torchvision, lightning) pin a newer torch, so pip would replace the
        # installed one; install it without them: pip install --no-deps torchcfm==1.0.7
        # (peers.py only uses its flow matcher and MLP, which need torch, numpy and POT).
        "peers": ["ott-jax==0.6.0", "jax[cpu]==0.10.2", "flax==0.12.8", "optax==0.2.8",
                  "diffrax==0.7.2", "POT>=0.9.7,<0.9.8", "geomloss==0.3.1", "torchdiffeq==0.2.5",
                  "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["ncf-fast = ncf_fast.cli:main"]},
)
