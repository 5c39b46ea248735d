"""Training on K processes launched by torchrun: DDP semantics, one gradient all-reduce per step.

``torchrun --nproc_per_node=K [--nnodes ...] -m ncf_fast train ...`` (or a script calling
:meth:`ncf_fast.NCF.fit`): ``fit`` / ``make_trainer`` join the process group that torchrun's
environment describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), initialising it
if needed (:func:`setup`): NCCL when the model is on CUDA (each rank on cuda:LOCAL_RANK), gloo on
the CPU. WORLD_SIZE unset or 1 means one process, and nothing here runs: single-process training
is bit-for-bit what it was.

One step on K ranks equals one single-process step on the union of the K batches (up to float
rounding; tests/test_distributed.py checks the gradients to 1e-5):

* Batch sizes are per rank. Every rank draws its batches from the whole training set with its
  own random stream: rank 0 keeps the single-process stream, rank r > 0 reseeds from (seed, r)
  after the held-out split, which every rank makes identically. Draws are with replacement, so
  the union of the K batches is distributed exactly as one K times larger batch (no sharding of
  the arrays; every rank holds them). The learning rate is not rescaled with K.
* L_HJ: each rank's mean over its points; the mean over ranks is the mean over the union.
* L_MMD, witness estimator (mmd_active = N > 0): the passive pushed samples and the targets carry
  no gradient, so one plain all-gather gives every rank the union's sets, P (K x its queue) and Y
  (K x mmd_batch_size) (:meth:`DistContext.gather_rows`). Rank r evaluates its own N active
  samples against them: its value 2/(N|Y|) sum_{i in r, j} |a_i - y_j| - ... averages over ranks
  to the union's value, and its gradient with respect to its a_i is K times the union's
  (2/(N|Y|) instead of 2/(KN|Y|)); the mean of the parameter gradients over ranks is therefore
  the union's gradient. Class-conditional: the same per class (draws are stratified, so every
  rank has the same count per class).
* L_MMD, U-statistic (mmd_active = 0): rank r evaluates its rows of the union's U-statistic
  against the gathered pushed samples and targets, scaled by K (:func:`ncf_fast.energy.rows_energy_distance`).
  This is what a differentiable all-gather would compute, without its backward communication:
  the gradient a column a_k receives from another rank's rows, sum_i u(a_k - a_i), equals a row
  gradient by the symmetry of |a - a'|, so each rank takes the factor 2 on its own rows.
* Gradients: one all-reduce of one flat buffer per step, divided by K (:meth:`average_gradients`).
  The buffer also carries the two loss values (every rank logs the union's losses) and a stop
  flag (a Ctrl-C on any rank stops every rank after the same step).

Why not torch's DistributedDataParallel: the fused backends evaluate u, grad u and the residual
from the parameter list (``model.params``), not through ``model.forward``, so DDP's forward hooks
(which arm its reducer every iteration) would not run; and their backward produces every
parameter gradient at once at the end, so DDP's bucketed overlap of communication with the
backward pass has nothing to overlap. One explicit all-reduce gives the same gradients.

Standardisation and the collocation box: rank 0's shift and scale are broadcast, the box is the
union of the ranks' boxes, the model's parameters and the seed are broadcast from rank 0.

Cost per rank, with N active, P passive, M targets, B collocation points per rank, d dimensions
and W weights: the MLP work (B + N + P/4 rows, fused second derivatives) does not change with K;
the energy pairs grow linearly, N x K(P + M) (U-statistic: M x K(2M)); memory grows by the
gathered sets, K(P + M)d floats. Communication per step: an all-gather of (P + M)(d + labels)
values per rank (each rank receives K times that) and an all-reduce of W + 3 values (ring:
~2W per rank, independent of K). See the README for the numbers.

Failures: every collective raises :class:`DistributedError` naming the rank and the operation
after at most NCF_DIST_TIMEOUT seconds (default 600, the torch default for NCCL) when a peer
stops answering; a peer that exits is seen at once on gloo, and torchrun ends the other ranks
when one fails. On NCCL a timed-out collective is ended by NCCL's watchdog, which aborts the
process with its own message.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .energy import rows_energy_distance

__all__ = ["DistContext", "DistributedError", "setup", "shutdown", "launched", "is_main",
           "rank_prefix", "default_device", "TIMEOUT_ENV"]

TIMEOUT_ENV = "NCF_DIST_TIMEOUT"
# seconds a collective waits for the other ranks (torch's NCCL default): long enough for a first
# step that JIT-compiles Triton kernels on every rank, short enough that a hung job ends
_DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank crashed, was killed or hangs."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer "
                         "(torchrun sets it)") from None


def launched() -> bool:
    """True when this process is one of several: an initialised group of size > 1, or
    torchrun's WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _env_int("WORLD_SIZE", 1) > 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one rank that writes files and prints."""
    return _rank() == 0


def rank_prefix() -> str:
    """"rank R/K: " under a launch of K > 1 processes, else ""; for error messages."""
    if not launched():
        return ""
    size = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    return f"rank {_rank()}/{size}: "


def default_device() -> str | None:
    """cuda:LOCAL_RANK under a multi-process launch on a CUDA machine, else None."""
    if launched() and torch.cuda.is_available():
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return None


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text.strip() else _DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds (> 0)")
    return value


def setup(device: torch.device) -> "DistContext | None":
    """Join the process group of a multi-process launch (initialising it if needed); None when
    this is a single process.

    device: the model's device; CUDA means NCCL (the device becomes the current CUDA device),
    the CPU means gloo. An already initialised group is used as it is (with its own timeout).
    """
    if not launched():
        return None
    timeout = _timeout()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"rank {_rank()}: cannot join the process group ({_first_line(exc)}); launch with "
                "torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
            ) from exc
    return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), device,
                       timeout)


def shutdown():
    """Leave the process group if one was joined (at the end of a successful run).

    Every rank first waits for the others (rank 0 writes the outputs after training): a rank that
    tore down its gloo group while rank 0 still held its end aborted now and then in CI
    ("terminate called without an active exception", SIGABRT, after the end-of-training
    barrier), so the ranks leave together."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a rank already gone: leave anyway
            pass
        dist.destroy_process_group()


def _first_line(exc) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:240]


@dataclass
class DistContext:
    """This rank's place in the group and the collectives the trainer uses.

    stop_requested: set locally (the CLI's signal handler); it travels with the next gradient
    all-reduce, after which ``stop_agreed`` is the same on every rank.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout: float
    stop_requested: bool = False
    stop_agreed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn, *args, **kwargs):
        """Run one collective; any failure becomes a DistributedError that says what to look at."""
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed ({_first_line(exc)}). Another "
                f"rank probably crashed, was killed or hangs (a collective waits at most "
                f"{self.timeout:g} s, set by {TIMEOUT_ENV}): see the other ranks' messages"
            ) from exc

    def broadcast_object(self, obj=None):
        """Rank 0's ``obj`` on every rank (pickled: only for our own small objects)."""
        box = [obj]
        self._call("broadcast", dist.broadcast_object_list, box, src=0)
        return box[0]

    def run_on_main(self, fn):
        """fn() on rank 0, its result on every rank; if it raises, every rank raises that error
        (so a mistake rank 0 finds, e.g. an unwritable folder, ends every rank the same way)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def barrier(self, what: str):
        """Wait until every rank is here. Used before a rank may leave the group: gloo tearing
        down a pair while the peer's last message is still in flight aborted a rank at exit
        (seen once in CI), and after a barrier nothing is in flight."""
        self._call(what, dist.barrier)

    def gather_objects(self, obj):
        """[obj of rank 0, ..., obj of rank K-1] on rank 0, None elsewhere (CPU tensors only)."""
        out = [None] * self.world_size if self.is_main else None
        self._call("gather", dist.gather_object, obj, out, dst=0)
        return out

    # --------------------------------------------------------------------------- setup
    def broadcast_parameters(self, module: torch.nn.Module):
        """Every rank starts from rank 0's parameters."""
        with torch.no_grad():
            for p in module.parameters():
                self._call("parameter broadcast", dist.broadcast, p.data, src=0)

    def sync_standardization(self, ncf):
        """Rank 0's shifts and scale on every rank (the model's coordinates must be one)."""
        buf = torch.cat([ncf.shift.double(), ncf.target_shift.double(),
                         torch.tensor([ncf.scale], dtype=torch.float64)])
        buf = buf.to(self.device)
        self._call("standardisation broadcast", dist.broadcast, buf, src=0)
        buf = buf.cpu()
        ncf.shift, ncf.target_shift = buf[:ncf.dim].clone(), buf[ncf.dim:-1].clone()
        ncf.scale = float(buf[-1])

    def union_box(self, lo: torch.Tensor, hi: torch.Tensor):
        """The smallest box holding every rank's [lo, hi] (identical ranks: unchanged)."""
        lo, hi = lo.clone(), hi.clone()
        self._call("box all-reduce", dist.all_reduce, lo, op=dist.ReduceOp.MIN)
        self._call("box all-reduce", dist.all_reduce, hi, op=dist.ReduceOp.MAX)
        return lo, hi

    def seed_rank_stream(self, generator: torch.Generator, seed: int, step: int = 0):
        """Give rank r > 0 its own stream, a function of (seed, rank, step); rank 0 keeps the
        single-process stream."""
        if self.rank > 0:
            generator.manual_seed(rank_seed(seed, self.rank, step))

    # ----------------------------------------------------------------- per-step collectives
    def gather_rows(self, *tensors):
        """Each tensor (rows, ...) concatenated over ranks in rank order (None stays None).

        One all-gather for all of them: integer tensors (labels) travel bit-for-bit as floats of
        the first floating tensor's dtype (a copy, no arithmetic). Shapes must be the same on
        every rank, which the trainer's draws guarantee (sizes follow from the config).
        """
        present = [t for t in tensors if t is not None]
        dtype = next(t.dtype for t in present if t.dtype.is_floating_point)
        parts = [t.detach().reshape(-1) if t.dtype.is_floating_point
                 else t.detach().to(torch.int64).reshape(-1).view(dtype) for t in present]
        sizes = [p.numel() for p in parts]
        buf = torch.cat(parts)
        out = buf.new_empty(self.world_size * buf.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._call("all-gather of the energy-distance samples", gather, out, buf)
        out = out.view(self.world_size, -1)
        result, start = [], 0
        for t in tensors:
            if t is None:
                result.append(None)
                continue
            size = sizes.pop(0)
            block = out[:, start:start + size]
            start += size
            if not t.dtype.is_floating_point:  # clone: a fresh, aligned buffer for the view
                block = block.clone().view(torch.int64).to(t.dtype)
            result.append(block.reshape(self.world_size * t.shape[0], *t.shape[1:]))
        return result

    def average_gradients(self, model: torch.nn.Module, l_hj: torch.Tensor, l_mmd: torch.Tensor):
        """Replace every parameter gradient by its mean over ranks; returns the mean (L_HJ, L_MMD)
        and sets ``stop_agreed``. One all-reduce of one flat buffer."""
        params = list(model.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.stack([l_hj.detach().to(grads[0].dtype), l_mmd.detach().to(grads[0].dtype),
                             torch.tensor(float(self.stop_requested), dtype=grads[0].dtype,
                                          device=grads[0].device)])
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra])
        self._call("gradient all-reduce", dist.all_reduce, flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n
        self.stop_agreed = bool(flat[-1] > 0)
        return flat[-3].to(l_hj.dtype), flat[-2].to(l_mmd.dtype)

    def energy_distance(self, pushed, target, labels_pushed=None, labels_target=None,
                        backend: str = "auto"):
        """This rank's share of the union's U-statistic (class-conditional with labels); the mean
        over ranks of the values and of the parameter gradients is the union's."""
        all_p, all_t, all_lp, all_lt = self.gather_rows(pushed, target, labels_pushed,
                                                        labels_target)
        return rows_energy_distance(pushed, all_p, target, all_t, self.world_size,
                                    labels_pushed, all_lp, labels_target, all_lt, backend)

    # ------------------------------------------------------------------------- resuming
    def rank_trainer_state(self, state: dict, seed: int) -> dict:
        """The trainer state this rank resumes from.

        A checkpoint written by the CLI holds every rank's stream and passive queues (``ranks``):
        rank r takes entry r, so a resume with the same K continues exactly. A rank with no
        entry (more ranks than before, or a checkpoint of rank 0 alone) starts a fresh stream
        seeded from (seed, rank, step) and refills its queue; rank 0 falls back to the main one.
        """
        ranks = state.get("ranks") or []
        if self.rank < len(ranks):
            return {**state, "generator": ranks[self.rank]["generator"],
                    "passive": ranks[self.rank]["passive"],
                    "passive_backward": ranks[self.rank].get("passive_backward", [])}
        if self.rank == 0:
            return state
        gen = torch.Generator(device=self.device)
        gen.manual_seed(rank_seed(seed, self.rank, int(state["step"])))
        return {**state, "generator": gen.get_state(), "passive": [], "passive_backward": []}


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 64-bit seed for rank's stream (SeedSequence: no overlap with seed + 1, seed + 2, ...)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(
        1, np.uint64)[0])
