"""A fix to Triton's CPU interpreter (TRITON_INTERPRET=1, the tests' way to run kernels without
a GPU), applied by the kernel modules that need it with :func:`patch_if_interpreted`.

The interpreter holds every scalar as a 1-element array and turns it into a Python int with
int(array), which numpy 2.3+ rejects for 1-d arrays ("only 0-dimensional arrays can be
converted"), so ``for k in range(0, d)`` fails for any runtime d. The patch gives interpreted
tensors an ``__index__`` that reads the element with the same result. Compiled kernels (a GPU)
are not affected.
"""
from __future__ import annotations

import os

__all__ = ["patch_if_interpreted"]


def patch_if_interpreted() -> None:
    """Install the ``__index__`` fix once, if TRITON_INTERPRET=1; a no-op otherwise."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_ncf_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ncf_index_fix = True
    interpreter._patch_lang_tensor = patched
