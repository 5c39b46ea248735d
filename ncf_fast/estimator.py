"""``NCF``: the estimator users start from (fit, maps in closed form, save/load)."""
from __future__ import annotations

import math
import secrets
from dataclasses import replace

import numpy as np
import torch

from . import backends
from . import costs as costs_mod
from . import distributed
from .checkpoints import FORMAT, read_checkpoint, save_atomic
from .data import check_labels, check_samples
from .potential import PotentialMLP
from .sampling import Collocation, SampleSet
from .trainer import TrainConfig, Trainer, new_history

__all__ = ["NCF", "FORMAT"]

_STANDARDIZE_DRAW = 10_000  # sampler draws used to estimate the shift and scale


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (or their names), got {dtype!r}")
    return dtype


def _device(device) -> torch.device:
    if device is None or (str(device) == "cuda" and distributed.default_device()):
        # under torchrun with K > 1 processes: rank r's GPU is cuda:LOCAL_RANK
        device = distributed.default_device() or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device ('cpu', 'cuda', 'cuda:1')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here; use device='cpu'")
    return device


def default_hidden(dim: int) -> tuple[int, ...]:
    """Three hidden layers: 128 wide up to d = 8, then 256 (measured on Gaussian pairs: width 64
    leaves the t-dependence under-resolved, which shows in the backward map)."""
    width = 128 if dim <= 8 else 256
    return (width, width, width)


def default_activation(dim: int) -> str:
    """SiLU in every dimension: in 2-D softplus networks can prune their last hidden layer until
    the map is a translation, which SiLU avoids; above, SiLU resolved non-linear maps that softplus
    smoothed over and was level on Gaussian pairs up to d = 16 and far ahead at d = 32 (README,
    Accuracy). ``dim`` stays an argument so that a measured per-dimension choice can return."""
    return "silu"


class NCF:
    """Neural characteristic flow between two sample sets: one potential u(x, t), closed-form maps.

        forward   T(x)   = x + t_f grad h(grad_x u(x, 0))
        backward  T^-1(y) = y - t_f grad h(grad_x u(y, t_f))
        path      x(t)   = x + t grad h(grad_x u(x, 0))

    Args:
        dim: dimension d of the samples.
        hidden: hidden widths of the potential's MLP (default: :func:`default_hidden`).
        activation: "softplus", "tanh" or "silu" (default: :func:`default_activation`, SiLU).
        cost: "quadratic", "power:q" (1 < q <= 2) or a :class:`ncf_fast.costs.Cost`.
        t_final: horizon t_f of the cost c(x, y) = t_f l((y - x) / t_f).
        device: torch device (default: CUDA if available, else CPU).
        dtype: torch.float32 or torch.float64.
        seed: seeds the initialisation and the training stream; None draws one (kept in ``seed``).
        backend: the MLP's backend, "auto", "reference", "torch" or "triton" (see
            :class:`ncf_fast.PotentialMLP` and :mod:`ncf_fast.backends`).
        energy_backend: the energy distance's backend in the training loss and the held-out
            check, the same names (see :func:`ncf_fast.energy.energy_distance`); a fit's
            ``TrainConfig.energy_backend`` overrides it.

    An explicit "triton" backend that cannot run the model (float64, d >= 128, widths > 512, a
    cost other than Quadratic/Power; energy: float64 or d > 64) raises ValueError naming the
    limit; "auto" picks torch for such models.

    The maps (transport, inverse, interpolate, potential) raise ValueError until :meth:`fit` or
    :meth:`make_trainer` has run or the model came from :meth:`load` (``fitted`` says which).
    """

    def __init__(self, dim: int, hidden=None, activation: str | None = None, cost="quadratic",
                 t_final: float = 1.0, device=None, dtype=torch.float32, seed: int | None = None,
                 backend: str = "auto", energy_backend: str = "auto"):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        dim = int(dim)
        if isinstance(t_final, bool) or not isinstance(t_final, (int, float)) or not t_final > 0:
            raise ValueError(f"t_final must be a positive number, got {t_final!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.cost = costs_mod.get(cost)
        self.t_final = float(t_final)
        self.device = _device(device)
        self.dtype = _dtype(dtype)
        self.seed = int(seed) if seed is not None else secrets.randbits(31)
        hidden = default_hidden(dim) if hidden is None else hidden
        activation = default_activation(dim) if activation is None else activation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = PotentialMLP(dim, hidden, activation, backend)
            # u starts constant: T = identity, residual 0; the first steps grow it from there.
            # Unless grad h is flat at p = 0 (power costs with q < 2: grad^2 h(0) = 0): then a
            # constant u gets no gradient from the marginal term at all, so u starts small instead.
            if self._flat_at_zero(self.cost, dim):
                torch.nn.init.normal_(self.model.layers[-1].weight, std=0.1 / hidden[-1] ** 0.5)
            else:
                torch.nn.init.zeros_(self.model.layers[-1].weight)
        self.model.to(self.device, self.dtype)
        # an explicit "triton" that cannot run this model fails here, not at the first step
        # (the device is checked when an op runs: a model may move between devices)
        self.energy_backend = backends.check(energy_backend, "energy", self.dtype, dim,
                                             what="energy_backend")
        backends.check(backend, "mlp", self.dtype, dim, self.model.hidden, self.cost)
        self.dim = dim
        self.shift = torch.zeros(dim, dtype=torch.float64)  # removed from the source side (t = 0)
        self.target_shift = self.shift.clone()  # removed from the target side (t = t_f)
        self.scale = 1.0
        self.history = new_history()
        self.train_config: TrainConfig | None = None
        self.trainer: Trainer | None = None
        # True once fit/make_trainer set the standardisation or a checkpoint was loaded: the
        # maps of an untrained model would silently be the identity
        self.fitted = False

    # ----------------------------------------------------------------------------- config
    @property
    def config(self) -> dict:
        """What rebuilds this estimator: the constructor's arguments."""
        return {"dim": self.dim, "hidden": list(self.model.hidden), "activation": self.model.activation,
                "cost": self.cost.spec, "t_final": self.t_final,
                "dtype": str(self.dtype).replace("torch.", ""), "seed": self.seed,
                "backend": self.model.backend, "energy_backend": self.energy_backend}

    def __repr__(self) -> str:
        c = self.config
        return (f"NCF(dim={c['dim']}, hidden={tuple(c['hidden'])}, activation={c['activation']!r}, "
                f"cost={c['cost']!r}, t_final={c['t_final']:g}, device={str(self.device)!r}, "
                f"backend={c['backend']!r}, energy_backend={c['energy_backend']!r})")

    # ------------------------------------------------------------------- coordinates
    @property
    def translation(self) -> torch.Tensor:
        """m = target_shift - shift: the part of the map removed before fitting, (d,) float64."""
        return self.target_shift - self.shift

    def _shift_at(self, t) -> torch.Tensor:
        """The shift removed at time t (a number): shift + (t / t_f) m, moving with the translation."""
        return self.shift + (float(t) / self.t_final) * self.translation

    def _standardize(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """Data units -> the model's coordinates (x - shift(t)) / scale at time t (0: source side,
        t_f: target side), on the model's device."""
        shift = self._shift_at(t).to(self.device, self.dtype)
        return (x.to(self.device, self.dtype) - shift) / self.scale

    @staticmethod
    def centres_each_set(cost) -> bool:
        """True for the quadratic cost: there the OT map between measures translated by a and b is
        the map between the untranslated ones plus the shifts, T(x) = T_0(x - a) + b (the cost's
        cross term -2 x.y changes by a linear term whose integral no coupling can change). For
        another translation-invariant cost only a common shift a = b is exact."""
        return isinstance(cost, costs_mod.Quadratic) or (
            isinstance(cost, costs_mod.Power) and cost.degree == 2.0)

    def _set_standardization(self, source: np.ndarray, target: np.ndarray):
        """Shifts and ONE isotropic scale for both sets.

        Quadratic cost: each set is centred on its own mean (exact, see :meth:`centres_each_set`)
        and the translation m between the means is added back to the maps. Other costs: one
        shared shift, the midpoint of the means. scale^2 = (E|x - a|^2 + E|y - b|^2) / (2d) around
        the shifts a, b removed. A per-axis scale would change the cost and hence the map; costs
        that are not homogeneous (degree None) are only shifted.
        """
        mean_s, mean_t = source.mean(0), target.mean(0)
        if not self.centres_each_set(self.cost):
            mean_s = mean_t = 0.5 * (mean_s + mean_t)
        self.shift = torch.as_tensor(mean_s, dtype=torch.float64)
        self.target_shift = torch.as_tensor(mean_t, dtype=torch.float64)
        if self.cost.degree is None:
            self.scale = 1.0
            return
        spread = (((source - mean_s) ** 2).sum(1).mean() + ((target - mean_t) ** 2).sum(1).mean())
        scale = float(np.sqrt(spread / (2 * self.dim)))
        self.scale = scale if scale > 0 else 1.0

    def _push(self, x_std: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Forward map in standardised coordinates (source side -> target side)."""
        _, p = self.model.value_and_grad(x_std, 0.0, create_graph=create_graph)
        return x_std + self.t_final * self.cost.grad_h(p)

    def _pull(self, y_std: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Backward map in standardised coordinates (target side -> source side)."""
        _, p = self.model.value_and_grad(y_std, self.t_final, create_graph=create_graph)
        return y_std - self.t_final * self.cost.grad_h(p)

    # ------------------------------------------------------------------------ fitting
    def _sample_set(self, data, labels, name):
        """-> (SampleSet, numpy preview for standardisation, holdout tensors or None, labels)."""
        if callable(data) and not isinstance(data, (np.ndarray, torch.Tensor)):
            if labels is not None:
                raise ValueError(f"{name}_labels cannot be used with a sampler; pass arrays instead")

            def sampler(n, _f=data):
                draw = _f(n)
                check_samples(draw, f"{name} sampler output", self.dim)
                if draw.shape[0] != n:
                    raise ValueError(f"{name} sampler returned {draw.shape[0]} rows for n={n}")
                return draw
            preview = sampler(_STANDARDIZE_DRAW)
            return sampler, _as_numpy(preview), None
        check_samples(data, name, self.dim)
        lab = check_labels(labels, data.shape[0], f"{name}_labels") if labels is not None else None
        return data, _as_numpy(data), lab

    def fit(self, source, target, *, steps: int | None = None, batch_size: int | None = None,
            lr: float | None = None, mmd_weight: float | None = None, source_labels=None,
            target_labels=None, progress: bool = True, callback=None, **options) -> "NCF":
        """Train the potential so that T pushes ``source`` onto ``target`` optimally.

        Args:
            source, target: arrays (N, d) / (M, d) (numpy or torch; sizes may differ) or samplers
                ``n -> (n, d)`` in data units.
            steps, batch_size, lr, mmd_weight: see :class:`ncf_fast.trainer.TrainConfig`
                (its other fields, e.g. ``mmd_batch_size``, ``lr_final``, ``collocation``, are
                accepted as keywords too).
            source_labels, target_labels: integer class labels (N,), (M,) for class-conditional
                OT: L_MMD becomes the mean of per-class energy distances.
            progress: show a tqdm bar with the loss terms.
            callback: ``callback(step, logs) -> bool``; True stops early.
        Returns:
            self, with ``history`` (per-step "hj", "mmd", "lr"; held-out checks in "heldout").

        Under ``torchrun --nproc_per_node=K`` (K > 1) every rank calls fit with the same
        arguments; the ranks train one model on the union of their per-rank batches (see
        :mod:`ncf_fast.distributed`) and ``history`` holds the union's losses on every rank.
        Save from rank 0 only (``ncf_fast.distributed.is_main()``).
        """
        given = {"steps": steps, "batch_size": batch_size, "lr": lr, "mmd_weight": mmd_weight}
        given = {k: v for k, v in given.items() if v is not None}
        valid = {f for f in TrainConfig.__dataclass_fields__}
        unknown = set(options) - valid
        if unknown:
            import difflib
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, sorted(valid), n=1)
            raise TypeError(f"fit() got an unknown option {name!r}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        config = TrainConfig(**{**given, **options})
        self.make_trainer(source, target, config, source_labels=source_labels,
                          target_labels=target_labels)
        self.trainer.run(progress=progress, callback=callback, history=self.history)
        return self

    def make_trainer(self, source, target, config: TrainConfig | None = None, *, source_labels=None,
                     target_labels=None) -> Trainer:
        """Build, without running, the :class:`~ncf_fast.trainer.Trainer` that :meth:`fit` runs.

        Same arguments as :meth:`fit` (``config`` defaults to ``TrainConfig()``); validates the
        data, sets the standardisation and the held-out split (deterministic given ``seed``) and
        stores the trainer in ``self.trainer``. To resume an interrupted fit from a checkpoint
        written with ``to_checkpoint(include_trainer=True)``::

            ncf = NCF.from_checkpoint(ckpt)
            trainer = ncf.make_trainer(source, target, config)
            trainer.load_state_dict(ckpt["trainer"])   # step, optimizer, random stream
            trainer.run(history=ncf.history)
        """
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config = config.resolve(self.dim, self.device)  # defaults for the fields left at None
        if config.energy_backend is None:
            config = replace(config, energy_backend=self.energy_backend)
        else:
            backends.check(config.energy_backend, "energy", self.dtype, self.dim,
                           what="energy_backend")
        if (source_labels is None) != (target_labels is None):
            raise ValueError("class-conditional OT needs both source_labels and target_labels")
        self.trainer = self._make_trainer(source, target, source_labels, target_labels, config)
        return self.trainer

    def _make_trainer(self, source, target, source_labels, target_labels, config: TrainConfig):
        src, src_np, src_lab = self._sample_set(source, source_labels, "source")
        tgt, tgt_np, tgt_lab = self._sample_set(target, target_labels, "target")
        if src_lab is not None:
            only_s = sorted(set(np.unique(src_lab).tolist()) - set(np.unique(tgt_lab).tolist()))
            only_t = sorted(set(np.unique(tgt_lab).tolist()) - set(np.unique(src_lab).tolist()))
            if only_s or only_t:
                raise ValueError(f"every class must appear in both source and target labels: "
                                 f"only in source {only_s}, only in target {only_t}")
        self._set_standardization(src_np, tgt_np)
        self.fitted = True
        ctx = distributed.setup(self.device)  # None unless launched as K > 1 processes
        if ctx is not None:  # one seed, one standardisation on every rank: rank 0's
            self.seed = ctx.broadcast_object(self.seed)
            ctx.sync_standardization(self)
        self.train_config = config
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)

        def std_source(x):
            return self._standardize(torch.as_tensor(x))

        def std_target(x):
            return self._standardize(torch.as_tensor(x), self.t_final)

        sets, held = [], []
        for data, lab, std in ((src, src_lab, std_source), (tgt, tgt_lab, std_target)):
            if callable(data) and not isinstance(data, (np.ndarray, torch.Tensor)):
                sets.append(SampleSet(sampler=data, standardize=std))
                held.append((std(data(config.holdout or 1024)), None))
                continue
            x = std(data)
            labels = torch.as_tensor(lab, device=self.device) if lab is not None else None
            n = x.shape[0]
            perm = torch.randperm(n, generator=generator, device=self.device)
            keep, out = perm[config.holdout:], perm[:config.holdout]
            if config.holdout and n >= 4 * config.holdout and (
                    labels is None or torch.unique(labels[out]).numel() == torch.unique(labels).numel()):
                held.append((x[out], labels[out] if labels is not None else None))
                x, labels = x[keep], (labels[keep] if labels is not None else None)
            else:  # too few samples to spare (or a class would be missing): check on training samples
                held.append((x, labels))
            sets.append(SampleSet(data=x, labels=labels))
        both = torch.cat([std_source(src_np), std_target(tgt_np)])
        lo, hi = both.min(0).values, both.max(0).values
        if ctx is not None:  # the held-out split above is the same on every rank; the draws not
            ctx.seed_rank_stream(generator, self.seed)
            lo, hi = ctx.union_box(lo, hi)
        margin = config.box_margin * (hi - lo)
        collocation = Collocation(dict(config.collocation), lo - margin, hi + margin, self.t_final)
        holdout = (held[0][0], held[1][0], held[0][1], held[1][1])
        trainer = Trainer(self, sets[0], sets[1], holdout, config, collocation, generator)
        if ctx is not None:
            ctx.broadcast_parameters(self.model)
            trainer.dist = ctx
        return trainer

    @staticmethod
    def _flat_at_zero(cost, dim: int) -> bool:
        """True when grad^2 h(0) = 0, i.e. T = x + grad h(grad u) does not move to first order
        in u around u = const (checked numerically, so a user's Cost subclass is covered)."""
        p = torch.zeros(1, dim, dtype=torch.float64)
        v = torch.ones(1, dim, dtype=torch.float64)
        return float(cost.hess_h_vec(p, v).abs().max()) == 0.0

    # --------------------------------------------------------------------------- maps
    def _chunk_rows(self) -> int:
        # the fused sweep keeps ~4 (rows x width) tensors per layer: bound that to ~32 MB
        return max(256, (1 << 23) // (4 * sum(self.model.hidden)))

    def _apply(self, x, name, fn):
        """Evaluate fn(x_std (n, d), rows) -> tensor in chunks; numpy in/out or torch on x's device."""
        if not self.fitted:
            raise ValueError("this NCF is not fitted: call fit(source, target) first, or load a "
                             "trained model with NCF.load(path) (an untrained model is no map)")
        is_numpy = not isinstance(x, torch.Tensor)
        if is_numpy and not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array or torch tensor of shape (N, {self.dim}), "
                            f"got {type(x).__name__}")
        check_samples(x, name, self.dim, min_samples=0)
        xt = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x.detach()
        rows = self._chunk_rows()
        outs = []
        with torch.no_grad():
            for start in range(0, max(xt.shape[0], 1), rows):
                chunk = xt[start:start + rows]
                outs.append(fn(chunk, slice(start, start + chunk.shape[0])).to(
                    device=xt.device, dtype=xt.dtype))
        out = torch.cat(outs) if xt.shape[0] else outs[0]
        return out.numpy() if is_numpy else out

    def _displacement(self, x_chunk, t):
        """The displacement T(x) - x of the characteristic through (x, t), in data units:
        scale * t_f grad h(p) + m, p = grad_x u(x', t) at the model's coordinates x' of time t."""
        _, p = self.model.value_and_grad(self._standardize(x_chunk, t), t)
        return (self.scale * self.t_final * self.cost.grad_h(p).double()
                + self.translation.to(p.device))

    def transport(self, x):
        """Forward map T(x) = x + t_f grad h(grad_x u(x, 0)): (N, d) -> (N, d)."""
        return self._apply(x, "x", lambda c, _: c.to(self.device, torch.float64)
                           + self._displacement(c, 0.0))

    def inverse(self, y):
        """Backward map T^-1(y) = y - t_f grad h(grad_x u(y, t_f)): (N, d) -> (N, d)."""
        return self._apply(y, "y", lambda c, _: c.to(self.device, torch.float64)
                           - self._displacement(c, self.t_final))

    def interpolate(self, x, t):
        """Points x(t) = x + t grad h(grad_x u(x, 0)) on the straight characteristics.

        t: a number in [0, t_f] or one time per row, shape (N,). x(0) = x, x(t_f) = T(x).
        """
        n = x.shape[0] if hasattr(x, "shape") else 0
        tt = torch.as_tensor(_as_numpy(t) if not isinstance(t, torch.Tensor) else t.detach().cpu(),
                             dtype=torch.float64)
        if tt.dim() > 1 or (tt.dim() == 1 and tt.shape[0] != n):
            raise ValueError(f"t must be a number or have shape ({n},), got {tuple(tt.shape)}")
        if bool(((tt < 0) | (tt > self.t_final)).any()):
            raise ValueError(f"t must lie in [0, t_final={self.t_final:g}]")
        tt = tt.to(self.device)

        def fn(c, rows):
            tc = tt if tt.dim() == 0 else tt[rows]
            step = self._displacement(c, 0.0) / self.t_final
            return c.to(self.device, torch.float64) + tc.reshape(-1, 1) * step
        return self._apply(x, "x", fn)

    def potential(self, x, t=0.0):
        """u(x, t) in data units, shape (N,): scale^degree * u_model((x - shift(t)) / scale, t),
        plus, when a translation m was removed (quadratic cost), v.(x - shift) - t |v|^2 / 2
        with v = m / t_f: the solution of the same HJ equation whose characteristics move by m more.
        """
        factor = self.scale ** (self.cost.degree or 0.0)
        velocity = (self.translation / self.t_final).to(self.device)

        def fn(c, rows):
            tc = torch.as_tensor(t, dtype=torch.float64)
            tc = (tc[rows] if tc.dim() == 1 else tc.expand(c.shape[0])).to(self.device).reshape(-1, 1)
            xc = c.to(self.device, torch.float64)
            z = (xc - self.shift.to(self.device) - tc * self.t_final * velocity) / self.scale
            u = factor * self.model(z.to(self.dtype), tc.to(self.dtype)).double()
            # measured from the source's mean, so a shifted copy of the data gets the same u
            return u + (xc - self.shift.to(self.device)) @ velocity - 0.5 * tc.squeeze(1) * (velocity @ velocity)
        return self._apply(x, "x", fn)

    # ---------------------------------------------------------------------- save/load
    def to_checkpoint(self, include_trainer: bool = False) -> dict:
        """The dict :meth:`save` writes (tensors and plain data only; :meth:`from_checkpoint` reads it).

        include_trainer: also store ``"trainer"``, the state of the last :meth:`fit` /
        :meth:`make_trainer` (step, optimizer, random stream, TrainConfig) so training can resume.
        """
        from . import __version__
        ckpt = {"format": FORMAT, "version": __version__, "config": self.config,
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "shift": self.shift.clone(), "target_shift": self.target_shift.clone(),
                "scale": float(self.scale),
                "history": {k: (list(v) if isinstance(v, list) else v) for k, v in self.history.items()}}
        if include_trainer:
            if self.trainer is None:
                raise ValueError("include_trainer=True needs a trainer: call fit() or make_trainer() first")
            ckpt["trainer"] = self.trainer.state_dict()
        return ckpt

    def save(self, path, include_trainer: bool = False) -> None:
        """Write config, weights, standardisation and library version to one file, atomically.

        include_trainer: also write the trainer state, to resume training (see :meth:`make_trainer`).
        """
        save_atomic(self.to_checkpoint(include_trainer), path)

    @classmethod
    def load(cls, path, device=None, time_axis: str | None = None, beta: float | None = None) -> "NCF":
        """Load a model saved by :meth:`save` (or a CLI checkpoint). Never executes code from the file.

        Also reads the research code's ``{"epoch", "model_state_dict"}`` of a plain MLP potential;
        time_axis ("last": input [x, t], "first": [t, x]) and beta are for those (see
        :func:`ncf_fast.lineage.checkpoint_from_lineage`)."""
        return cls.from_checkpoint(read_checkpoint(path, time_axis, beta), device=device, path=path)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device=None, path="checkpoint") -> "NCF":
        try:
            cfg = dict(ckpt["config"])
            hidden = tuple(int(h) for h in cfg["hidden"])
            ncf = cls(int(cfg["dim"]), hidden=hidden, activation=cfg["activation"], cost=cfg["cost"],
                      t_final=float(cfg["t_final"]), device=device, dtype=cfg["dtype"],
                      seed=int(cfg["seed"]), backend=cfg.get("backend", "auto"),
                      energy_backend=cfg.get("energy_backend", "auto"))
            ncf.model.load_state_dict(ckpt["state_dict"])
            bad = [k for k, v in ncf.model.state_dict().items() if not bool(v.isfinite().all())]
            if bad:
                raise ValueError(f"weight {bad[0]} holds NaN or Inf values")
            ncf.shift = torch.as_tensor(ckpt["shift"], dtype=torch.float64).reshape(ncf.dim)
            # checkpoints from before per-set centring have one shift for both sides
            ncf.target_shift = torch.as_tensor(ckpt.get("target_shift", ncf.shift),
                                               dtype=torch.float64).reshape(ncf.dim)
            ncf.scale = float(ckpt["scale"])
            if not (math.isfinite(ncf.scale) and ncf.scale > 0 and bool(ncf.shift.isfinite().all())):
                raise ValueError(f"standardisation shift {ncf.shift.tolist()}, scale {ncf.scale!r}: "
                                 "the shift must be finite and the scale positive")
            ncf.fitted = True
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            detail = " ".join(str(exc).split())  # load_state_dict puts the shapes on line 2
            raise ValueError(f"{path}: not a valid ncf_fast checkpoint ({type(exc).__name__}: "
                             f"{detail[:300]})") from exc
        history = ckpt.get("history")
        if isinstance(history, dict):
            ncf.history.update(history)
        return ncf


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
