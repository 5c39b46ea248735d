"""Training batches: samples of the source and target, and collocation points (x, t) ~ rho x U[0, t_f].

rho (*ours*, configurable by weights) mixes
  - source samples and target samples (where the forward and backward maps are read),
  - straight-line interpolants (1 - s) x + s y of random source/target pairs, s ~ U[0, 1]
    ("interpolant", at an independent time t) or s = t / t_f ("path": the point sits where a
    straight path from x to y is at time t, so rho covers space-time along the transport),
  - "characteristic": points x + (t / t_f)(T(x) - x) on the current model's own forward
    characteristics at their time t, from source samples x and their pushes T(x) (which the
    trainer has already computed, without gradient, for the energy distance); L_HJ there ties
    u(., t) to u(., 0) exactly along the lines the maps follow, up to t_f where the backward map
    is read. With the backward marginal term on, the lines from pulled targets T^-1(y) to y are
    drawn from too, which covers t near t_f on the target side. Without pushes (the U-statistic
    estimator) these points fall back to "path".
  - a small share uniform in the data's bounding box widened by a margin.
The backward map is tied to the target only through L_HJ, so rho must cover the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SampleSet", "Collocation", "COLLOCATION_KINDS"]

COLLOCATION_KINDS = ("source", "target", "interpolant", "path", "characteristic", "box")


class SampleSet:
    """Samples of one measure in standardised coordinates: a tensor (with optional labels) or a
    sampler ``n -> (n, d)`` in data units (standardised on the fly by ``standardize``)."""

    def __init__(self, data=None, labels=None, sampler=None, standardize=None):
        self.data, self.labels, self.sampler, self.standardize = data, labels, sampler, standardize
        self.classes = None
        if labels is not None:
            self.classes = torch.unique(labels)
            self._members = [torch.nonzero(labels == k).squeeze(1) for k in self.classes]

    def draw(self, n: int, generator: torch.Generator):
        """(x (n', d), labels (n',) or None); with labels, n' = K ceil(n / K) stratified by class.

        ``generator`` lives on the data's device, so drawing costs no host-device transfer."""
        if self.sampler is not None:
            return self.standardize(self.sampler(n)), None
        if self.labels is None:
            idx = torch.randint(0, self.data.shape[0], (n,), generator=generator,
                                device=generator.device)
            return self.data[idx], None
        per_class = -(-n // len(self._members))
        idx = torch.cat([m[torch.randint(0, m.numel(), (per_class,), generator=generator,
                                         device=generator.device)] for m in self._members])
        return self.data[idx], self.labels[idx]


@dataclass
class Collocation:
    """Draws collocation points from rho with the given mixture weights (normalised)."""

    weights: dict
    lo: torch.Tensor
    hi: torch.Tensor
    t_final: float = 1.0

    def __post_init__(self):
        unknown = set(self.weights) - set(COLLOCATION_KINDS)
        if unknown:
            raise ValueError(f"unknown collocation kind(s) {sorted(unknown)}; use {COLLOCATION_KINDS}")
        if any(float(v) < 0 for v in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"collocation weights must be >= 0 with a positive sum, got {self.weights}")

    def counts(self, n: int) -> dict:
        total = sum(self.weights.values())
        out, used = {}, 0
        kinds = [k for k in COLLOCATION_KINDS if self.weights.get(k, 0) > 0]
        for k in kinds[:-1]:
            out[k] = int(round(n * self.weights[k] / total))
            used += out[k]
        out[kinds[-1]] = max(n - used, 0)
        return out

    def draw(self, n: int, source: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
             pushes: tuple | None = None):
        """(x (n, d), t (n, 1)) from the current source and target batches; ``pushes`` = (x, T(x))
        for the "characteristic" kind."""
        dev, dt = source.device, source.dtype

        def rand(*shape):
            return torch.rand(*shape, generator=generator, dtype=dt, device=dev)

        def pick(x, k):
            return x[torch.randint(0, x.shape[0], (k,), generator=generator, device=dev)]

        xs, ts = [], []
        for kind, k in self.counts(n).items():
            if k == 0:
                continue
            t = self.t_final * rand(k, 1)
            if kind == "source":
                x = pick(source, k)
            elif kind == "target":
                x = pick(target, k)
            elif kind == "characteristic" and pushes is not None:
                idx = torch.randint(0, pushes[0].shape[0], (k,), generator=generator, device=dev)
                x = torch.lerp(pushes[0][idx], pushes[1][idx], t / self.t_final)
            elif kind in ("interpolant", "path", "characteristic"):
                s = rand(k, 1) if kind == "interpolant" else t / self.t_final
                x = (1 - s) * pick(source, k) + s * pick(target, k)
            else:
                x = self.lo + (self.hi - self.lo) * rand(k, source.shape[1])
            xs.append(x)
            ts.append(t)
        x, t = torch.cat(xs), torch.cat(ts)
        return x, t
