"""Host side of the fused MLP kernels (mlp_potential, mlp_residual): check the inputs, lay the
parameters out in the kernels' padded buffers, size the launches and their workspace, and reduce
the gradient copies. No Triton here; the device sweeps are in mlp_sweeps.

The padded layout (why 16/32-column tiles, H_PAD, D_PAD, the workspace, the register budget) is
explained in mlp_sweeps' docstring; :func:`launch_config` has the launch arithmetic.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch

__all__ = ["ACTIVATION_CODES", "MLPLayout", "mlp_layout", "pack_params", "unpack_grads",
           "launch_config", "grad_buffers", "reduce_grads", "device_guard", "block_constexprs",
           "unit_feature_stride", "set_dot_precision", "dot_precision", "MAX_WIDTH", "MAX_INPUT",
           "PROGRAMS_PER_SM", "THREE_PER_SM_REGISTERS", "LAUNCH_OPTIONS", "BATCH_ARGS",
           "BACKWARD_TILE", "fallback", "check_precision"]

ACTIVATION_CODES = {"softplus": 0, "tanh": 1, "silu": 2}

# Widths above this need a workspace of (programs, slots, 64, width) fp32 tiles large enough
# (> 100 MB at 512 for a 3-layer backward) that the torch backend's cuBLAS GEMMs are the better tool.
MAX_WIDTH = 512
# d + 1 <= 128: [x, t] is one (BLOCK_M, D_PAD) register tile; 256 would spill.
MAX_INPUT = 128

# Integer kernel arguments whose value can change with the batch: @triton.jit(do_not_specialize=
# ...) so that Triton does not compile a kernel per value class (== 1, divisible by 16), which
# made a batch above 16,896 rows compile each kernel twice. (grad_pstride is fixed per model and
# padded to a multiple of 16, so its specialisation is kept: it makes the deterministic mode's
# gradient adds 128-bit vector atomics.)
BATCH_ARGS = ("N", "block_start", "stride_tn")

_PRECISIONS = ("tf32x3", "tf32")
_precision = os.environ.get("NCF_FAST_DOT_PRECISION", "tf32x3")


def set_dot_precision(precision: str) -> None:
    """Choose the tl.dot input precision of the MLP kernels: "tf32x3" (default) or "tf32".

    "tf32x3": about fp32 accuracy, the same tolerance rule as the float32 reference.
    "tf32":   one TF32 product per tile, ~2-3x faster GEMMs; 10-bit mantissas give relative
              errors up to ~1e-3 of max|value| on u, grad_x u and r, and ~5e-3 on gradients.
    The interpreter (TRITON_INTERPRET=1) computes in fp32 whatever is chosen.
    """
    global _precision
    _precision = check_precision(precision)


def dot_precision() -> str:
    """The default tl.dot input precision (:func:`set_dot_precision`)."""
    return _precision


def check_precision(precision: str | None) -> str:
    """``precision`` if it is a dot precision the kernels take, the default for None."""
    if precision is None:
        return _precision
    if precision not in _PRECISIONS:
        raise ValueError(f"dot precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    return precision



class MLPLayout(NamedTuple):
    """How a PotentialMLP's parameters map onto the kernels' padded buffers."""

    dim: int                  # d
    widths: tuple             # hidden widths (h_1, ..., h_L)
    n_hidden: int             # L
    h_pad: int                # hidden widths padded to a multiple of block_h
    d_pad: int                # d + 1 padded to a power of two >= 16
    block_h: int              # tile width of the forward kernels' hidden-layer GEMMs
    block_d: int              # tile width over the input columns [x, t]
    slot_w: int               # row length of a workspace slot: max(h_pad, d_pad)
    act: int                  # ACTIVATION_CODES value


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fallback(reason: str) -> ValueError:
    """A ValueError for a case the kernels do not take, naming the torch backend instead."""
    return ValueError(f"{reason}; use backend='torch' (the same fused algorithm in torch ops) "
                      "for this model")


def _on_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mlp_layout(params, act: str, x: torch.Tensor, t: torch.Tensor) -> MLPLayout:
    """Check params (W_1, b_1, ..., W_{L+1}, b_{L+1}), x (N, d), t (N, 1); return the layout.

    Raises ValueError naming the torch backend for anything the kernels do not support.
    """
    if act not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATION_CODES)}, got {act!r}")
    if len(params) < 4 or len(params) % 2:
        raise ValueError(f"params must be (W_1, b_1, ..., W_{{L+1}}, b_{{L+1}}) with at least one "
                         f"hidden layer, got {len(params)} tensors")
    if x.dim() != 2 or t.dim() != 2 or t.shape != (x.shape[0], 1):
        raise ValueError(f"x must be (N, d) and t (N, 1), got {tuple(x.shape)} and {tuple(t.shape)}")
    for tensor in (x, t, *params):
        if tensor.dtype != torch.float32:
            raise fallback(f"the triton kernels compute in float32, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, got one on {tensor.device}")
    if x.device.type != "cuda" and not _on_interpreter():
        raise fallback(f"the triton backend needs CUDA tensors (got {x.device}; on CPU only "
                        "under TRITON_INTERPRET=1)")
    d = x.shape[1]
    widths = tuple(params[2 * k].shape[0] for k in range(len(params) // 2 - 1))
    fan_in = (d + 1,) + widths
    for k, (w, b) in enumerate(zip(params[0::2], params[1::2])):
        out = widths[k] if k < len(widths) else 1
        if w.shape != (out, fan_in[k]) or b.shape != (out,):
            raise ValueError(f"layer {k + 1}: expected weight {(out, fan_in[k])} and bias "
                             f"{(out,)}, got {tuple(w.shape)} and {tuple(b.shape)}")
    if d + 1 > MAX_INPUT:
        raise fallback(f"the triton kernels support d + 1 <= {MAX_INPUT}, got d = {d}")
    if max(widths) > MAX_WIDTH:
        raise fallback(f"the triton kernels support hidden widths <= {MAX_WIDTH}, "
                        f"got {max(widths)}")
    # 32-column tiles for the forward kernels: with tf32x3 every dot operand is split into
    # hi/lo halves in registers, and 64-column tiles spilled on sm_90a
    # (tests/test_sm90_compile.py); networks of width <= 16 use 16 (the minimum tl.dot
    # dimension), and so do the backward kernels (BACKWARD_TILE)
    block_h = 16 if max(widths) <= 16 else 32
    h_pad = -(-max(widths) // block_h) * block_h
    d_pad = max(16, _next_pow2(d + 1))
    return MLPLayout(d, widths, len(widths), h_pad, d_pad, block_h, min(d_pad, 32),
                     max(h_pad, d_pad), ACTIVATION_CODES[act])


def pack_params(params, layout: MLPLayout):
    """(w1 (H_PAD, D_PAD), wh (max(L-1, 1), H_PAD, H_PAD), b (L, H_PAD), wo (H_PAD,), c (1,)),
    zero-padded fp32 copies of the parameters."""
    h, dp, L = layout.h_pad, layout.d_pad, layout.n_hidden
    ref = params[0]
    w1 = ref.new_zeros(h, dp)
    wh = ref.new_zeros(max(L - 1, 1), h, h)
    b = ref.new_zeros(L, h)
    wo = ref.new_zeros(h)
    with torch.no_grad():
        w1[:layout.widths[0], :layout.dim + 1] = params[0]
        for k in range(L):
            b[k, :layout.widths[k]] = params[2 * k + 1]
            if k > 0:
                wh[k - 1, :layout.widths[k], :layout.widths[k - 1]] = params[2 * k]
        wo[:layout.widths[-1]] = params[-2][0]
        c = params[-1].detach().reshape(1).contiguous()
    return w1, wh, b, wo, c


def unpack_grads(grads, layout: MLPLayout):
    """Slice the padded gradient buffers back to the parameters' shapes (the inverse of pack)."""
    gw1, gwh, gb, gwo, gc = grads
    L, widths = layout.n_hidden, layout.widths
    out = []
    for k in range(L):
        if k == 0:
            out.append(gw1[:widths[0], :layout.dim + 1])
        else:
            out.append(gwh[k - 1, :widths[k], :widths[k - 1]])
        out.append(gb[k, :widths[k]])
    out.append(gwo[:widths[-1]].unsqueeze(0))
    out.append(gc)
    return out


BACKWARD_TILE = 16  # BLOCK_H and BLOCK_D of the backward kernels: 8 elements per thread per
                    # (64, 16) tile (why: the module docstring's register budget)


def block_constexprs(block_m: int, layout: MLPLayout, backward: bool = False) -> dict:
    """The tile-shape constexprs every MLP kernel takes (BLOCK_H = BLOCK_D = BACKWARD_TILE for
    the backward kernels; h_pad and d_pad are multiples of it)."""
    block_h = BACKWARD_TILE if backward else layout.block_h
    block_d = BACKWARD_TILE if backward else layout.block_d
    assert layout.h_pad % block_h == 0 and layout.d_pad % block_d == 0
    return dict(BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_D=block_d,
                H_PAD=layout.h_pad, D_PAD=layout.d_pad, SLOT_W=layout.slot_w,
                N_HIDDEN=layout.n_hidden, ACT=layout.act)


def grad_buffers(packed, programs: int, deterministic: bool):
    """Zeroed fp32 gradient buffers shaped like ``packed`` -> (views, flat, per-program stride).

    Shared (default): one buffer every program adds into (stride 0). Deterministic: one private
    copy per program of a launch (stride = the packed size), reduced by :func:`reduce_grads`.
    """
    sizes = [p.numel() for p in packed]
    total = -(-sum(sizes) // 16) * 16  # copies start 64-byte aligned (every size but c's is
    copies = programs if deterministic else 1  # a multiple of 16 too)
    flat = torch.zeros(copies, total, dtype=torch.float32, device=packed[0].device)
    return _views(flat[0], packed, sizes), flat, total if deterministic else 0


def _views(row, packed, sizes):
    return tuple(v.view(p.shape) for v, p in zip(torch.split(row[:sum(sizes)], sizes), packed))


def reduce_grads(packed, flat):
    """The packed gradients from the buffers of :func:`grad_buffers`: copy 0 when shared, else
    the sum over the programs' copies. torch.sum over dim 0 reduces in an order fixed by the
    shape (no atomics), so the deterministic mode gives bitwise-identical results run to run."""
    row = flat[0] if flat.shape[0] == 1 else flat.sum(0)
    return _views(row, packed, [p.numel() for p in packed])


def unit_feature_stride(x: torch.Tensor) -> torch.Tensor:
    """x with stride(1) == 1 (a copy only for column-strided views such as a transpose): the
    kernels then specialise the feature stride to 1, and no batch-sized stride reaches them."""
    if x.stride(1) == 1:
        return x
    if x.shape[1] == 1:  # contiguous() keeps the stride of a size-1 dimension: set it
        return x.as_strided(x.shape, (x.stride(0), 1))
    return x.contiguous()


def device_guard(x: torch.Tensor):
    """Launch inside x's CUDA device (Triton launches on the current device: without this a
    cuda:1 tensor would be read by a kernel running on device 0); a no-op on CPU."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


_SM_COUNT: dict = {}

# Row blocks per streaming multiprocessor per launch: 3 programs of 4 warps at <= 168 registers
# per thread fit one SM's 64 K registers (3 x 128 x 168 = 64,512). The sm_90a check
# (tests/test_sm90_compile.py) reports 103-168 registers for every configuration but one
# (residual backward with tanh and the power cost: 170, so 2 fit and the scheduler starts
# the third as one ends). Capping with maxnreg=168 was tried: it made ptxas spill (the
# width-256 tf32 residual backward: 142 registers uncapped, 12 bytes of spills capped).
PROGRAMS_PER_SM = 3
THREE_PER_SM_REGISTERS = 168
LAUNCH_OPTIONS = dict(num_warps=4, num_stages=1)
# the grid under the interpreter: 2 programs per launch still exercises several launches
# sharing one workspace (and several per-program gradient copies)
_INTERPRETER_PROGRAMS = 2


def launch_config(n_rows: int, layout: MLPLayout, n_slots: int, device: torch.device):
    """(BLOCK_M, chunks, launch options, workspace) for one kernel call; ``n_slots`` is the
    kernel's count of (BLOCK_M, slot_w) workspace tiles per program, ``chunks`` the launches as
    (first row block, number of programs) pairs, the options LAUNCH_OPTIONS.

    BLOCK_M = 64: the M of one Hopper warpgroup MMA (wgmma m64nNk8) and >= 16 as the K of the
    weight-gradient dots; one 4-warp program (one warpgroup) per row block. Each launch runs up
    to PROGRAMS_PER_SM x SMs programs, i.e. whole waves that are resident at once (registers
    allow 3 programs per SM; shared memory, 8-12 KB each, is no limit), and the launcher loops
    over launches, the last one taking the remainder. That loop replaces a persistent in-kernel
    loop, across which the compiler hoisted every workspace pointer tile and spilled. On an
    H100/H200 (132 SMs, so 396 programs per launch):

        rows      row blocks   launches x programs        programs per SM (waves)
        512            8       1 x 8                      0.06  (GPU idle: use large batches)
        8192         128       1 x 128                    0.97  (4 warps per SM)
        16384        256       1 x 256                    1.94
        32768        512       396 + 116                  3 + 0.9
        65536       1024       396 + 396 + 232            3 + 3 + 1.8 = 8 program-times per
                                                          SM, = ceil(1024 / 132): no wave lost

    A row block cannot be split across programs (the layers are sequential), so batches below
    ~8192 rows leave SMs idle whatever the launch plan: the GPU path is for large batches.
    The workspace is sized by the launch, not by N: programs x n_slots x 64 x slot_w x 4 B, e.g.
    the residual backward (3L + 8 slots) at width 256, L = 3: 1.11 MB per program, 441 MB for
    396 programs; width 128: 220 MB; width 64 (d <= 63): 110 MB. That is far more than the
    50 MB L2, so the workspace lives in HBM: L2 holds only the tiles a layer phase is working
    on (396 programs x ~3 slots x 64 x slot_w x 4 B: 19 MB at width 64, 78 MB at 256), and
    wide networks stream their workspace through HBM: a backward row block at width 256, d = 64
    moves an estimated ~4 x 1.1 MB (every slot written once, read ~3 times) for ~170 MFLOP of
    GEMMs, ~38 FLOP per byte, about the H100/H200 balance point in tf32x3 (165 TFLOP/s over
    3.4-4.3 TB/s: 38-49) and below it in the tf32 fast mode (115-150): not measured.
    No autotuning: the backward kernels accumulate into their outputs with atomics, which
    autotune's repeated launches would double-count.
    """
    block_m = 64
    n_blocks = max(1, -(-n_rows // block_m))
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        cap = PROGRAMS_PER_SM * _SM_COUNT[device]
    else:
        cap = _INTERPRETER_PROGRAMS
    programs = min(n_blocks, cap)
    workspace = torch.empty(programs * n_slots * block_m * layout.slot_w, dtype=torch.float32,
                            device=device)
    chunks = [(start, min(programs, n_blocks - start)) for start in range(0, n_blocks, programs)]
    return block_m, chunks, LAUNCH_OPTIONS, workspace
