"""Known answer for class-conditional OT (``fit(source_labels=, target_labels=)``).

Two classes, each a Gaussian pair with its own closed-form map T*_k, stacked so that the
conditional maps are two upward moves, x = -1 -> -1 and x = +1 -> +1. The classes' proportions
are swapped between the sides (source 2:1, target 1:2), so unconditional OT has to carry a third
of class 0's mass across to class 1's target: a fit without labels cannot get T*_k right.
"""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from ncf_fast import NCF
from ncf_fast.metrics import l2_uvp
from ncf_fast.problems import GaussianOT

SPREAD = 0.3  # class covariances scaled to std ~0.2-0.4: the classes stay 2 apart, well separated
SOURCE_MEANS, TARGET_MEANS = [(-1.0, 0.0), (1.0, 0.0)], [(-1.0, 3.0), (1.0, 3.0)]
SOURCE_SIZES, TARGET_SIZES = (3000, 1500), (1500, 3000)


def class_pairs(sampler_seed: int = 200):
    """The two classes' Gaussian pairs (same laws for any sampler_seed; it seeds the draws)."""
    pairs = []
    for k in range(2):
        shape = GaussianOT(2, seed=100 + k)  # random covariances with eigenvalues in [1/2, 2]
        pairs.append(GaussianOT(2, seed=sampler_seed + 10 * k, sigma0=shape.sigma0 * SPREAD ** 2,
                                sigma1=shape.sigma1 * SPREAD ** 2, m0=SOURCE_MEANS[k],
                                m1=TARGET_MEANS[k]))
    return pairs


def labelled(pairs, sizes, side):
    draw = [p.sample_source(n) if side == 0 else p.sample_target(n) for p, n in zip(pairs, sizes)]
    return np.concatenate(draw), np.repeat(np.arange(len(sizes)), sizes)


def test_unconditional_ot_crosses_classes():
    """The premise: exact OT between the unlabelled sets (a 1/50 subsample) mixes the classes."""
    pairs = class_pairs()
    x, lx = labelled(pairs, [n // 50 for n in SOURCE_SIZES], 0)
    y, ly = labelled(pairs, [n // 50 for n in TARGET_SIZES], 1)
    rows, cols = linear_sum_assignment(cdist(x, y, "sqeuclidean"))
    crossed = np.mean(lx[rows] != ly[cols])
    assert crossed == pytest.approx(1 / 3, abs=0.02)  # the third of class 0 that must move over


def fit(steps: int, conditional: bool) -> NCF:
    """NCF fitted on the two classes' samples, with or without their labels."""
    pairs = class_pairs()
    x, lx = labelled(pairs, SOURCE_SIZES, 0)
    y, ly = labelled(pairs, TARGET_SIZES, 1)
    labels = {"source_labels": lx, "target_labels": ly} if conditional else {}
    return NCF(2, seed=0, device="cpu").fit(x, y, steps=steps, progress=False, **labels)


def per_class_errors(model, n: int = 2000):
    """[(forward, backward L2-UVP %, fresh points moved, class means they should be near)] per class."""
    out = []
    for k, pair in enumerate(class_pairs(sampler_seed=300)):  # fresh points, not the training draws
        xk, yk = pair.sample_source(n), pair.sample_target(n)
        forward = l2_uvp(model.transport(xk), pair.forward_map(xk), yk)
        backward = l2_uvp(model.inverse(yk), pair.inverse_map(yk), xk)
        out.append((forward, backward, ((model.transport(xk), TARGET_MEANS),
                                         (model.inverse(yk), SOURCE_MEANS))))
    return out


@pytest.mark.slow  # trains 500 steps on 9000 points: tens of seconds or more
def test_class_conditional_fit_recovers_each_class_map():
    for k, (forward, backward, moved) in enumerate(per_class_errors(fit(500, conditional=True))):
        print(f"class {k}: forward {forward:.2f} %, backward {backward:.2f} %")
        # per-class variance is small (~0.2), so this is strict; without labels the forward
        # error is in the hundreds of percent (README "Examples")
        assert forward < 10.0
        # each point lands by its own class, both ways (500 steps leave the backward map's
        # error at ~100 % of the small per-class variance, yet within its class: 2 apart)
        for points, means in moved:
            own = np.linalg.norm(points - means[k], axis=1)
            other = np.linalg.norm(points - means[1 - k], axis=1)
            assert np.mean(own < other) > 0.99


if __name__ == "__main__":  # the README's table: python tests/test_class_conditional.py [STEPS]
    import sys
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    for conditional in (True, False):
        errors = per_class_errors(fit(steps, conditional))
        print(f"{'conditional' if conditional else 'unconditional'}, {steps} steps: " + "; ".join(
            f"class {k} forward {f:.2f} % backward {b:.2f} %" for k, (f, b, _) in enumerate(errors)))
