"""The training loop: Adam on L = L_HJ + lambda L_MMD with a warm-up + cosine (or step) learning-rate schedule."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

from . import backends
from .energy import (ClassSegments, class_conditional_energy_distance,
                     class_conditional_witness_energy_distance, class_segments,
                     energy_distance, segmented_energy_distance,
                     segmented_witness_energy_distance, witness_energy_distance)
from . import threads
from .losses import hj_residual
from .sampling import Collocation, SampleSet

__all__ = ["TrainConfig", "Trainer", "lr_at", "dimension_defaults", "LR_SCHEDULES",
           "progress_fields"]

LR_SCHEDULES = ("cosine", "step")

# Rows of the target batch for the (constant) within-target term of the logged L_MMD.
_WITHIN_ROWS = 256


# Defaults that depend on the dimension (TrainConfig fields left at None), each chosen by
# measurement over seed lists (README, "How it trains" and "Accuracy" have the numbers). In d <= 2
# a larger learning rate, a stronger L_HJ, more active samples and collocation along the model's
# own characteristics fixed the contracting pairs' backward maps; above d = 2 each made the map
# worse, so the earlier settings stay there.
LOW_DIM_MAX = 2
_LOW_DIM = {"steps": 3000, "lr": 5e-3, "mmd_weight": 10.0, "batch_size": 512, "mmd_active": 512,
            "mmd_batch_size": 2048, "passive_age": 1, "backward_weight": 1.0,
            "collocation": {"source": 0.25, "target": 0.25, "characteristic": 0.4, "box": 0.1}}
_HIGH_DIM = {"steps": 3000, "lr": 2e-3, "mmd_weight": 30.0, "batch_size": 512, "mmd_active": 256,
             "mmd_batch_size": 2048, "passive_age": 1, "backward_weight": 1.0,
             "collocation": {"source": 0.25, "target": 0.25, "interpolant": 0.4, "box": 0.1}}
# From d = 32 the maps were still improving well past 3000 steps (README "Accuracy"); twice as
# many keeps a default CPU fit there within about ten minutes.
LARGE_DIM_MIN = 32
_LARGE_DIM = {"steps": 6000}
_BY_DIMENSION = tuple(_LOW_DIM)
# the backward term's set sizes: None takes the forward term's (resolved) sizes
_FOLLOWERS = ("backward_active", "backward_batch_size")
# backward_weight 1: the backward map gets its own marginal term, as strong as the forward one's;
# tied to the data only through L_HJ it lagged on non-linear maps. passive_age 1: every passive
# sample pushed by the current parameters; a stale queue cost accuracy for the time it saved.


# On a GPU (device.type == "cuda") the step is large-batch in every dimension: ncf_fast is for
# large-batch training, and a GPU needs many rows to fill its SMs (README, "GPU defaults").
_GPU = {"batch_size": 16384, "mmd_active": 2048, "mmd_batch_size": 8192}


def dimension_defaults(dim: int, device=None) -> dict:
    """The values TrainConfig's dimension-dependent fields (None) take for data in ``dim``-D
    on ``device`` (a CUDA device takes the large-batch sizes of ``_GPU``; the CPU's are the
    measured ones)."""
    preset = _LOW_DIM if dim <= LOW_DIM_MAX else _HIGH_DIM
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in preset.items()}
    if dim >= LARGE_DIM_MIN:
        out.update(_LARGE_DIM)
    if device is not None and torch.device(device).type == "cuda":
        out.update(_GPU)
    return out


@dataclass
class TrainConfig:
    """Hyper-parameters of :meth:`ncf_fast.NCF.fit` (all have working defaults).

    Fields left at None (steps, lr, mmd_weight, batch_size, mmd_active, mmd_batch_size, passive_age,
    collocation, or single collocation weights) take the default for the dimension and device
    (:func:`dimension_defaults`) when the trainer is built (:meth:`resolve`).

    steps: optimizer steps (None: 3000, 6000 from d = 32). batch_size: collocation points per step (L_HJ).
    mmd_batch_size: target samples per step for the energy distance (L_MMD), and as many
    "passive" pushed source samples. mmd_active: pushed samples that carry L_MMD's gradient
    (see :func:`ncf_fast.energy.witness_energy_distance`); 0 means the plain U-statistic over
    mmd_batch_size pushed samples, all active. passive_age: steps a passive pushed sample is
    reused (the passive set is refreshed by mmd_batch_size / passive_age rows a step).
    lr: peak Adam learning rate; lr_final: the cosine schedule's end value; warmup: linear
    warm-up steps. lr_schedule: "cosine" (decay to lr_final) or "step" (lr * lr_factor every
    lr_interval steps, the research code's Step schedule). weight_decay: Adam's L2 penalty.
    mmd_weight: lambda. backward_weight: weight of the backward map's marginal
    term ED(T^-1#nu, mu) relative to the forward one's (0: the backward map is tied to the data
    only through L_HJ). backward_active, backward_batch_size: the backward term's active pulled
    targets, and its passive pulled targets and source samples per step (None: mmd_active's and
    mmd_batch_size's values; with mmd_active 0 both terms use mmd_batch_size). collocation: mixture weights of rho
    (source, target, interpolant, path, characteristic, box); box_margin: the box's widening, as a fraction of the
    data's range. eval_every: steps between held-out checks; holdout: samples per side kept
    out of training for that check (arrays of at least 4x that size only).
    energy_backend: the energy distance's backend in the loss and the held-out check
    (:mod:`ncf_fast.backends` names); None: the estimator's (``NCF(energy_backend=...)``).
    time_limit: wall-clock seconds for one :meth:`Trainer.run` (None: no limit); training stops
    after the step that crosses it, with a held-out check there, and the history records
    ``stopped_early`` = {"reason": "time_limit", "step", "seconds"}. The cosine decay follows
    whichever is further along, the steps or the time (:func:`lr_at`), so a fit cut by the
    limit has still decayed to lr_final; with a limit the run is no longer reproducible bit for bit.
    """

    steps: int | None = None
    # rows per step
    batch_size: int | None = None
    mmd_batch_size: int | None = None
    mmd_active: int | None = None
    passive_age: int | None = None
    # the optimizer and its learning-rate schedule
    lr: float | None = None
    lr_final: float = 2e-5
    warmup: int = 100
    lr_schedule: str = "cosine"
    lr_interval: int = 2000
    lr_factor: float = 0.5
    weight_decay: float = 0.0
    # the loss's terms
    mmd_weight: float | None = None
    backward_weight: float | None = None
    backward_active: int | None = None
    backward_batch_size: int | None = None
    collocation: dict | None = None
    box_margin: float = 0.1
    eval_every: int = 250
    holdout: int = 2048
    energy_backend: str | None = None
    time_limit: float | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _BY_DIMENSION + _FOLLOWERS + ("time_limit",):
                continue  # the dimension's default, filled in by resolve(); or no time limit
            if f.name == "energy_backend":
                if value is not None:
                    self.energy_backend = backends.check_name(value, "energy_backend")
                continue
            if f.name == "collocation":
                if not isinstance(value, dict):
                    raise TypeError(f"collocation must be a dict of weights, got {type(value).__name__}")
                continue
            if f.name == "lr_schedule":
                if value not in LR_SCHEDULES:
                    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {value!r}")
                continue
            kind = int if f.type in ("int", int, "int | None") else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and not float(value).is_integer()):
                raise TypeError(f"{f.name} must be {'an integer' if kind is int else 'a number'}, "
                                f"got {value!r}")
            setattr(self, f.name, kind(value))
        def given(name):
            return getattr(self, name) is not None

        if given("mmd_active") and self.mmd_active < 0:
            raise ValueError(f"mmd_active must be >= 0, got {self.mmd_active}")
        if given("backward_active") and self.backward_active < 1:
            raise ValueError(f"backward_active must be positive, got {self.backward_active}")
        for name in ("steps", "batch_size", "mmd_batch_size", "passive_age", "lr", "eval_every"):
            if given(name) and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr_final", "warmup", "mmd_weight", "backward_weight", "box_margin", "holdout"):
            if given(name) and (getattr(self, name) < 0 or not math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_interval < 1 or not 0 < self.lr_factor < math.inf:
            raise ValueError(f"the step schedule needs lr_interval >= 1 and a finite lr_factor > 0, "
                             f"got {self.lr_interval} and {self.lr_factor}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if given("time_limit") and not 0 < self.time_limit < math.inf:
            raise ValueError(f"time_limit must be a positive finite number of seconds (or None for "
                             f"no limit), got {self.time_limit}")
        for name in ("mmd_batch_size", "backward_batch_size"):
            if given(name) and getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")

    def resolve(self, dim: int, device=None) -> "TrainConfig":
        """A copy with every None (field or collocation weight) set to the default for ``dim``
        (and ``device``: see :func:`dimension_defaults`).

        A collocation dict is the whole mixture: kinds it leaves out weigh 0, kinds it maps to
        None take the dimension's weight (that is how setup.conf overrides single weights).
        """
        preset = dimension_defaults(dim, device)
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in preset.items()
                  if k != "collocation"}
        for follower, leader in zip(_FOLLOWERS, ("mmd_active", "mmd_batch_size")):
            if getattr(self, follower) is None:
                values[follower] = values[leader] or None  # mmd_active 0: no active set
        if self.collocation is None:
            values["collocation"] = preset["collocation"]
        else:
            values["collocation"] = {k: preset["collocation"].get(k, 0.0) if w is None else w
                                     for k, w in self.collocation.items()}
        return replace(self, **values)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(config: TrainConfig, step: int, elapsed: float | None = None) -> float:
    """Learning rate at ``step``: linear warm-up to lr, then cosine decay to lr_final (or, with
    lr_schedule "step", lr * lr_factor ** (step // lr_interval)). With config.time_limit and the
    run's ``elapsed`` seconds, the decay's progress is the larger of the step's and
    elapsed / time_limit: a budget that ends before ``steps`` still ends at lr_final."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "step":
        return config.lr * config.lr_factor ** (step // config.lr_interval)
    span = max(config.steps - config.warmup, 1)
    frac = (step - config.warmup) / span
    if config.time_limit is not None and elapsed is not None:
        frac = max(frac, elapsed / config.time_limit)
    frac = min(frac, 1.0)
    return config.lr_final + 0.5 * (config.lr - config.lr_final) * (1 + math.cos(math.pi * frac))


class Trainer:
    """Owns the optimizer, the random stream and the step counter of one fit (resumable).

    ``ncf`` is the :class:`ncf_fast.NCF` being trained; ``source``/``target`` are
    :class:`~ncf_fast.sampling.SampleSet` in standardised coordinates; ``holdout`` is
    (source, target, source_labels, target_labels) tensors for the held-out check.
    """

    def __init__(self, ncf, source: SampleSet, target: SampleSet, holdout, config: TrainConfig,
                 collocation: Collocation, generator: torch.Generator):
        self.ncf, self.source, self.target, self.holdout = ncf, source, target, holdout
        self.config, self.collocation, self.generator = config, collocation, generator
        self.model = ncf.model
        # fused=True: one kernel for all parameters (CPU and CUDA), measurably cheaper per step
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay,
                                          fused=self.model.layers[0].weight.dtype in
                                          (torch.float32, torch.float64))
        self.step_count = 0
        self.labelled = source.labels is not None
        self._segment_cache: dict = {}  # see _segments
        self.passive: list = []  # queue of (pushed samples, labels or None), newest last
        self.passive_back: list = []  # the same for the backward term: (pulled targets, labels)
        self.elapsed = None  # seconds into the current run() (the time-limited schedule's clock)
        self.dist = None  # a DistContext under a multi-process launch (see ncf_fast.distributed)

    def losses(self):
        """(L_HJ, L_MMD, L_MMD of the backward map or None) on a fresh batch, differentiable in
        the parameters. The backward term ED(T^-1#nu, mu) (config.backward_weight > 0) mirrors
        the forward one: pulled target samples against source samples, its own passive queue."""
        cfg, ncf, gen = self.config, self.ncf, self.generator
        back = cfg.backward_weight > 0
        if cfg.mmd_active == 0:  # plain U-statistic: every pushed sample carries the gradient
            xs, ls = self.source.draw(cfg.mmd_batch_size, gen)
            yt, lt = self.target.draw(cfg.mmd_batch_size, gen)
            l_hj = self._hj_loss(xs, yt)
            l_mmd = self._energy(ncf._push(xs, create_graph=True), yt, ls, lt)
            l_back = self._energy(ncf._pull(yt, create_graph=True), xs, lt, ls) if back else None
            return l_hj, l_mmd, l_back
        xa, la = self.source.draw(cfg.mmd_active, gen)
        fresh, pushed = self._refresh_passive(self.passive, self.source, ncf._push,
                                              cfg.mmd_batch_size)
        yt, lt = self.target.draw(cfg.mmd_batch_size, gen)
        lines = (fresh, pushed)  # characteristics (start at t = 0, end at t_f) for rho
        if back:
            ya, lya = self.target.draw(cfg.backward_active, gen)
            fresh_t, pulled = self._refresh_passive(self.passive_back, self.target, ncf._pull,
                                                    cfg.backward_batch_size)
            xs, ls = self.source.draw(cfg.backward_batch_size, gen)
            lines = (torch.cat((fresh, pulled)), torch.cat((pushed, fresh_t)))
        l_hj = self._hj_loss(torch.cat((xa, fresh)), yt, lines)
        l_mmd = self._witness(ncf._push(xa, create_graph=True), la, self.passive, yt, lt,
                              cfg.mmd_active, cfg.mmd_batch_size)
        l_back = (self._witness(ncf._pull(ya, create_graph=True), lya, self.passive_back, xs, ls,
                                cfg.backward_active, cfg.backward_batch_size) if back else None)
        return l_hj, l_mmd, l_back

    def _energy_backend(self) -> str:
        return self.config.energy_backend or self.ncf.energy_backend

    def _energy(self, moved, other, labels_moved, labels_other):
        """Energy distance of mapped samples (all carrying the gradient) to the other side's."""
        backend, rows = self._energy_backend(), self.config.mmd_batch_size
        if self.dist is not None:  # this rank's rows of the union's U-statistic
            return self.dist.energy_distance(moved, other, labels_moved, labels_other, backend)
        if self.labelled:
            return segmented_energy_distance(moved, other, self._segments(labels_moved, rows),
                                             self._segments(labels_other, rows), backend)
        return energy_distance(moved, other, backend)

    def _witness(self, active, labels_active, queue, other, labels_other, n_active, n_batch):
        """Witness energy distance of active mapped samples, with the passive ``queue``
        (``n_active``, ``n_batch``: the term's set sizes, which fix the class layout)."""
        cfg, backend = self.config, self._energy_backend()
        passive = torch.cat([p for p, _ in queue])
        lp = torch.cat([lab for _, lab in queue]) if self.labelled else None
        if self.dist is not None:  # every rank's passive samples and targets (no gradient)
            passive, other, lp, labels_other = self.dist.gather_rows(passive, other, lp, labels_other)
            if self.labelled:
                return class_conditional_witness_energy_distance(
                    active, passive, other, labels_active, lp, labels_other,
                    within_rows=_WITHIN_ROWS, backend=backend)
        if self.labelled:
            per_batch = -(-n_batch // cfg.passive_age)
            segs = (self._segments(labels_active, n_active),
                    self._segments(lp, per_batch, len(queue)),
                    self._segments(labels_other, n_batch))
            return segmented_witness_energy_distance(
                active, passive, other, *segs, within_rows=_WITHIN_ROWS, backend=backend)
        return witness_energy_distance(active, passive, other, within_rows=_WITHIN_ROWS,
                                       backend=backend)

    def _segments(self, labels: torch.Tensor, drawn: int, batches: int = 1) -> ClassSegments:
        """Where each class sits in ``batches`` concatenated stratified draws of ``drawn`` rows
        (:meth:`SampleSet.draw`: class by class, the same count of each), computed once per fit
        so that a step copies nothing to the host (a CUDA graph could capture it). The first use
        of a layout checks it against the labels (one host copy per layout and fit); labels in
        another layout (a passive queue of other sizes, restored from a checkpoint) are located
        from the labels, at one host copy per call."""
        classes = self.source.classes
        per_class = -(-drawn // len(classes))
        key = (per_class, batches, labels.shape[0])
        seg = self._segment_cache.get(key)
        if seg is None:
            found = class_segments(labels, classes, "class-conditional loss")
            seg = ClassSegments.blocks(len(classes), per_class, batches, labels.device)
            if labels.shape[0] != len(seg.order) or seg.bounds != found.bounds or not torch.equal(
                    seg.order, found.order):
                return found
            self._segment_cache[key] = seg
        return seg

    def _hj_loss(self, source, target, pushes=None):
        xc, tc = self.collocation.draw(self.config.batch_size, source, target, self.generator,
                                       pushes)
        r = hj_residual(self.model, xc, tc, self.ncf.cost, self.ncf.t_final)
        return (r * r).mean()

    def _refresh_passive(self, queue: list, samples: SampleSet, mapping, size: int) -> tuple:
        """Map one fresh batch of ``samples`` (no gradient) into the passive ``queue`` of ``size``
        rows (filling it on the first step); return the fresh samples and their images (for the
        collocation points)."""
        age = self.config.passive_age
        per_batch = -(-size // age)
        fills = age if not queue else 1
        drawn = []
        for _ in range(fills):
            x, lab = samples.draw(per_batch, self.generator)
            with torch.no_grad():
                queue.append((mapping(x), lab))
            drawn.append(x)
        del queue[:-age]
        return torch.cat(drawn), torch.cat([p for p, _ in queue[-fills:]])

    def step(self):
        """One Adam step; returns detached (L_HJ, L_MMD, lr)."""
        lr = lr_at(self.config, self.step_count, self.elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        l_hj, l_mmd, l_back = self.losses()
        marginal = l_mmd if l_back is None else l_mmd + self.config.backward_weight * l_back
        (l_hj + self.config.mmd_weight * marginal).backward()
        if self.dist is not None:  # DDP semantics: the mean gradient (and losses) over ranks
            l_hj, l_mmd = self.dist.average_gradients(self.model, l_hj, l_mmd)
        self.optimizer.step()
        self.step_count += 1
        return l_hj.detach(), l_mmd.detach(), lr

    @torch.no_grad()
    def heldout_distance(self, backward: bool = False) -> float:
        """Energy distance between T(held-out source) and the held-out target (``backward``:
        between T^-1(held-out target) and the held-out source), in data units."""
        xs, yt, ls, lt = self.holdout
        if backward:
            xs, yt, ls, lt = yt, xs, lt, ls
        moved = self.ncf._pull(xs) if backward else self.ncf._push(xs)
        backend = self._energy_backend()
        if ls is not None:
            value = class_conditional_energy_distance(moved, yt, ls, lt, backend)
        else:
            value = energy_distance(moved, yt, backend)
        return float(value) * self.ncf.scale

    def run(self, progress: bool = True, callback=None, history=None) -> dict:
        """Train until ``config.steps`` (or ``config.time_limit`` seconds, counted from this
        call); returns the history dict (appended to if given).

        callback(step, logs) is called after every step with logs = {"step", "hj", "mmd", "lr"}
        (plus "heldout" at check steps); returning True stops training early.
        """
        cfg = self.config
        history = history if history is not None else new_history()
        pending = []
        flush_every = 50  # read losses back in groups: a .item() per step would sync a GPU
        bar = _progress_bar(cfg.steps, self.step_count) if progress else _NoBar()
        start = time.perf_counter()
        # saturated sigmoids make denormal floats, which slow CPU arithmetic ~30% (measured at
        # d = 2); flushing them to zero changes nothing above 1e-38
        on_cpu = self.model.layers[0].weight.device.type == "cpu"
        flush = on_cpu and torch.set_flush_denormal(True)
        # threads: fewer when other processes keep the CPUs busy (ncf_fast/threads.py)
        load = threads.LoadFollower() if on_cpu else None
        try:
            while self.step_count < cfg.steps:
                self.elapsed = time.perf_counter() - start
                l_hj, l_mmd, lr = self.step()
                pending.append((self.step_count, l_hj, l_mmd, lr))
                out_of_time = (cfg.time_limit is not None and self.step_count < cfg.steps
                               and time.perf_counter() - start >= cfg.time_limit)
                at_check = (self.step_count % cfg.eval_every == 0 or self.step_count == cfg.steps
                            or out_of_time)  # a cut fit ends with a held-out check too
                logs = None
                if len(pending) >= flush_every or at_check or callback is not None:
                    values = torch.stack([torch.stack((h, m)) for _, h, m, _ in pending]).tolist()
                    for (step, _, _, lr_k), (h, m) in zip(pending, values):
                        history["step"].append(step)
                        history["hj"].append(h)
                        history["mmd"].append(m)
                        history["lr"].append(lr_k)
                    pending.clear()
                    logs = {"step": self.step_count, "hj": history["hj"][-1],
                            "mmd": history["mmd"][-1], "lr": lr}
                if at_check:
                    logs["heldout"] = self.heldout_distance()
                    logs["heldout_backward"] = self.heldout_distance(backward=True)
                    history["heldout_step"].append(self.step_count)
                    history["heldout"].append(logs["heldout"])
                    history.setdefault("heldout_backward", []).append(logs["heldout_backward"])
                if logs is not None:  # the last held-out value stays on the bar until the next
                    last = {"heldout": history["heldout"][-1]} if history["heldout"] else {}
                    bar.set_postfix(progress_fields({**last, **logs}), refresh=False)
                bar.update(1)
                if load is not None:
                    load.step()
                if callback is not None and callback(self.step_count, logs):
                    break
                if out_of_time:
                    history["stopped_early"] = {"reason": "time_limit", "step": self.step_count,
                                                "seconds": time.perf_counter() - start}
                    break
        finally:
            self.elapsed = None
            bar.close()
            if load is not None:
                load.close()
            if flush:
                torch.set_flush_denormal(False)
        history["seconds"] = history.get("seconds", 0.0) + time.perf_counter() - start
        return history

    def state_dict(self) -> dict:
        return {"step": self.step_count, "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "config": self.config.to_dict(),
                "passive": [(p.detach().cpu(), None if lab is None else lab.cpu())
                            for p, lab in self.passive],
                "passive_backward": [(p.detach().cpu(), None if lab is None else lab.cpu())
                                     for p, lab in self.passive_back]}

    def load_state_dict(self, state: dict):
        if self.dist is not None:  # this rank's own stream and queue, if the checkpoint has them
            state = self.dist.rank_trainer_state(state, self.ncf.seed)
        self.step_count = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        device = self.model.layers[0].weight.device
        self.passive, self.passive_back = (
            [(p.to(device), None if lab is None else lab.to(device)) for p, lab in state.get(key, [])]
            for key in ("passive", "passive_backward"))


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm  # imported only when a bar is shown

    return tqdm(total=total, initial=initial, desc="NCF", dynamic_ncols=True, leave=False)


class _NoBar:
    """What run() calls on a bar, doing nothing (progress=False: tqdm is not imported)."""

    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, n: int = 1):
        pass

    def close(self):
        pass


def progress_fields(logs: dict) -> dict:
    """The progress bar's fields, in the names the CLI and the Python API share: L_HJ, L_MMD (the
    step's training estimate, standardised units), ED_heldout (held-out energy distance, data
    units; an unbiased estimate, so it can dip below 0 near a perfect fit) and lr."""
    out = {"L_HJ": f"{logs['hj']:.2e}", "L_MMD": f"{logs['mmd']:.2e}"}
    if "heldout" in logs:
        out["ED_heldout"] = f"{logs['heldout']:.2e}"
    out["lr"] = f"{logs['lr']:.1e}"
    return out


def new_history() -> dict:
    return {"step": [], "hj": [], "mmd": [], "lr": [], "heldout_step": [], "heldout": [],
            "heldout_backward": [], "seconds": 0.0}
