#!/bin/sh
# Install ncf_fast (editable) into the current Python environment.
#   ./install.sh        the package
#   ./install.sh dev    the package plus test/benchmark tools (pytest, pytest-benchmark, scipy)
# A torch that is already installed is kept. Without one, a machine with no NVIDIA GPU gets the
# CPU build of torch (never a multi-GB CUDA build); a machine with a GPU gets PyPI's CUDA build.
set -e
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${NCF_TORCH_VERSION:-2.13.0}
TRITON_VERSION=${NCF_TRITON_VERSION:-3.6.0}

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PYTHON" -m pip install "torch==$TORCH_VERSION"
    else
        # the CPU index is an extra source: a local CPU wheel or PyPI still work when it is offline
        "$PYTHON" -m pip install "torch==$TORCH_VERSION" --timeout 10 --retries 1 \
            --extra-index-url https://download.pytorch.org/whl/cpu
    fi
fi
if [ "$(uname -s)" = "Linux" ] && ! "$PYTHON" -c "import triton" >/dev/null 2>&1; then
    "$PYTHON" -m pip install "triton==$TRITON_VERSION"
fi
if [ "$1" = "dev" ]; then
    "$PYTHON" -m pip install -e ".[dev]"
else
    "$PYTHON" -m pip install -e .
fi
