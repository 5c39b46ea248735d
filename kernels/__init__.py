"""Triton kernels for ncf_fast, installed as ``ncf_fast.kernels``.

Importing this package never imports triton; the kernel modules do, on first use.
"""
from __future__ import annotations

import functools

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True
