"""The training step itself: class segments computed once per fit (no host synchronisation in a
labelled step), the same class-conditional loss as the label-based path, tqdm only with a
progress bar, and the large-batch GPU defaults beside the unchanged CPU ones."""
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ncf_fast import NCF, TrainConfig, energy
from ncf_fast.trainer import dimension_defaults

# aten ops whose CUDA kernels copy a value to the host (their output size or a Python value
# depends on the data): the operations a CUDA-graph-capturable step must not run
_SYNCING_ATEN = {"nonzero", "_local_scalar_dense", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "masked_select", "bincount", "equal", "is_nonzero",
                 "histc", "argwhere"}
_SYNCING_METHODS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy",
                    "cpu", "nonzero", "unique"}


class _HostSyncs(TorchDispatchMode):
    """Records every op that would synchronise a CUDA device with the host (on the CPU too)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in _SYNCING_ATEN:
            self.calls.append(str(func))
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in args[1] if i is not None):  # boolean masks: a nonzero inside
            self.calls.append(f"{func} with a boolean mask")
        elif str(func) == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.calls.append(str(func))
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    """Records Tensor methods that read values back to Python (tolist, item, bool(...), ...)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCING_METHODS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_the_ops_it_must():
    x = torch.arange(6)
    with _HostSyncs() as syncs, _HostReads() as reads:
        torch.nonzero(x > 2)
        torch.unique(x)
        x[x > 2]
        torch.repeat_interleave(x, x)
        x.tolist()
        float(x.sum())
        torch.repeat_interleave(x, x, output_size=15)  # sized: no sync
        torch.repeat_interleave(x, 2)
        torch.searchsorted(x, x)
    assert syncs.calls == ["aten.nonzero.default", "aten._unique2.default",
                           "aten.index.Tensor with a boolean mask", "aten.repeat_interleave.Tensor",
                           "aten._local_scalar_dense.default"]
    assert {"tolist", "__float__"} <= set(reads.calls), reads.calls


def _labelled_trainer(mmd_active, backend="torch", backward_weight=1.0, **sizes):
    rng = np.random.default_rng(0)
    n = 400
    lab_s, lab_t = rng.integers(0, 3, n), rng.integers(0, 3, n)
    lab_t[:3] = [0, 1, 2]
    src = rng.normal(size=(n, 3)) + lab_s[:, None]
    tgt = rng.normal(size=(n, 3)) * 0.5 + 2 * lab_t[:, None]
    ncf = NCF(3, hidden=(16, 16), seed=0, device="cpu", backend=backend,
              energy_backend=backend)
    # odd sizes: 3 classes do not divide 10 active, 50 passive in age 2 (25 a batch), 40 targets
    cfg = TrainConfig(steps=10, batch_size=32, mmd_active=mmd_active, mmd_batch_size=50,
                      passive_age=2, holdout=0, backward_weight=backward_weight, **sizes)
    return ncf.make_trainer(src, tgt, cfg, source_labels=lab_s, target_labels=lab_t)


@pytest.mark.parametrize("mmd_active", [10, 0])
def test_labelled_step_makes_no_host_sync(mmd_active):
    trainer = _labelled_trainer(mmd_active)
    trainer.step()  # the first step locates the classes once (one host copy per layout)
    with _HostSyncs() as syncs, _HostReads() as reads:
        trainer.step()
        trainer.step()
    assert syncs.ops > 100  # the step ran under the detector
    assert syncs.calls == [] and reads.calls == [], (syncs.calls, reads.calls)
    # the label-based path the step replaced would have been seen
    xa, la = trainer.source.draw(12, trainer.generator)
    with _HostSyncs() as syncs:
        energy.class_conditional_energy_distance(xa, xa, la, la)
    assert "aten.nonzero.default" in syncs.calls


def test_the_backward_term_has_its_own_set_sizes():
    """backward_active / backward_batch_size size the backward term's draws and passive queue
    (odd sizes that 3 classes do not divide), with no host sync once the layouts are known."""
    trainer = _labelled_trainer(10, backward_active=7, backward_batch_size=26)
    drawn = []
    for side in (trainer.source, trainer.target):
        real = side.draw
        side.draw = lambda n, g, _real=real, _side=side: drawn.append((_side, n)) or _real(n, g)
    trainer.step()
    # age 2: the first step fills the queues with two batches, 26 = 2 x 13 and 50 = 2 x 25 asked
    # for (a stratified draw rounds up to a multiple of the 3 classes)
    assert drawn.count((trainer.target, 13)) == 2 and drawn.count((trainer.source, 25)) == 2
    assert [p.shape[0] for p, _ in trainer.passive_back] == [15, 15]
    assert [p.shape[0] for p, _ in trainer.passive] == [27, 27]
    drawn.clear()
    with _HostSyncs() as syncs:
        trainer.step()
    assert syncs.calls == []
    assert (trainer.target, 7) in drawn and (trainer.target, 13) in drawn
    assert (trainer.source, 26) in drawn and (trainer.source, 10) in drawn
    for bad in ({"backward_active": 0}, {"backward_batch_size": 1}, {"backward_active": 2.5}):
        with pytest.raises((ValueError, TypeError), match="backward_"):
            TrainConfig(**bad)


@pytest.mark.parametrize("mmd_active", [10, 0])
def test_labelled_loss_equals_the_label_based_path(mmd_active, monkeypatch):
    """The step's class-conditional L_MMD and its gradient are those of the public label-based
    functions (bit for bit: the same segments), on the step's own samples, over three steps."""
    # the forward term alone, so the draws below are the forward term's (the backward term
    # takes the same segmented path with the roles swapped)
    trainer = _labelled_trainer(mmd_active, backward_weight=0.0)
    drawn, pushed = [], []  # every (samples, labels) drawn, in order; the differentiable pushes
    for side in (trainer.source, trainer.target):
        monkeypatch.setattr(side, "draw", lambda n, g, _real=side.draw: drawn.append(
            _real(n, g)) or drawn[-1])
    push = trainer.ncf._push
    monkeypatch.setattr(trainer.ncf, "_push", lambda x, create_graph=False: (
        pushed.append(push(x, create_graph)) or pushed[-1]) if create_graph else push(x))
    for _ in range(3):
        drawn.clear()
        _, l_mmd, _ = trainer.losses()
        (g_fast,) = torch.autograd.grad(l_mmd, pushed[-1])
        active = pushed[-1].detach().requires_grad_()
        (_, la), (yt, lt) = drawn[0], drawn[-1]  # the source batch first, the targets last
        if mmd_active:
            passive = torch.cat([p for p, _ in trainer.passive])
            lp = torch.cat([lab for _, lab in trainer.passive])
            ref = energy.class_conditional_witness_energy_distance(
                active, passive, yt, la, lp, lt, within_rows=256, backend="torch")
        else:
            ref = energy.class_conditional_energy_distance(active, yt, la, lt, backend="torch")
        (g_ref,) = torch.autograd.grad(ref, active)
        torch.testing.assert_close(l_mmd, ref, rtol=0, atol=0)
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=0)


def test_progress_false_never_imports_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # any import of tqdm now raises
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    rng = np.random.default_rng(0)
    model = NCF(2, hidden=(8,), seed=0, device="cpu")
    model.fit(rng.normal(size=(100, 2)), rng.normal(size=(100, 2)), steps=3, batch_size=16,
              mmd_batch_size=16, mmd_active=8, holdout=0, progress=False)
    assert len(model.history["hj"]) == 3
    with pytest.raises(ImportError):
        model.fit(rng.normal(size=(100, 2)), rng.normal(size=(100, 2)), steps=1, progress=True)


def test_gpu_defaults_are_large_batch_and_the_cpu_ones_unchanged():
    # the CPU presets exactly as measured (README, "Accuracy"): any change here changes CPU runs
    low = {"steps": 3000, "lr": 5e-3, "mmd_weight": 10.0, "batch_size": 512, "mmd_active": 512,
           "mmd_batch_size": 2048, "passive_age": 1, "backward_weight": 1.0,
           "collocation": {"source": 0.25, "target": 0.25, "characteristic": 0.4, "box": 0.1}}
    high = dict(low, lr=2e-3, mmd_weight=30.0, mmd_active=256,
                collocation={"source": 0.25, "target": 0.25, "interpolant": 0.4, "box": 0.1})
    large = dict(high, steps=6000)  # from d = 32 (LARGE_DIM_MIN)
    for dim, want in ((1, low), (2, low), (3, high), (8, high), (31, high), (32, large),
                      (200, large)):
        assert dimension_defaults(dim) == want == dimension_defaults(dim, "cpu")
        assert TrainConfig().resolve(dim).steps == want["steps"]
        cfg = TrainConfig().resolve(dim, torch.device("cpu"))
        assert (cfg.batch_size, cfg.mmd_active, cfg.mmd_batch_size) == (
            512, want["mmd_active"], 2048)
    for dim in (2, 8, 64):
        gpu = TrainConfig().resolve(dim, "cuda:1")
        assert gpu.batch_size >= 16384 and gpu.mmd_batch_size >= 8192 and gpu.mmd_active >= 2048
        assert (gpu.backward_active, gpu.backward_batch_size) == (gpu.mmd_active, gpu.mmd_batch_size)
        assert gpu.lr == dimension_defaults(dim)["lr"]  # only the batch sizes change
    assert TrainConfig(batch_size=64).resolve(8, "cuda").batch_size == 64  # given values stay
    assert TrainConfig(steps=40).resolve(64).steps == 40
    # the backward term's sizes follow the forward term's unless given
    cfg = TrainConfig(mmd_active=40, mmd_batch_size=300).resolve(8)
    assert (cfg.backward_active, cfg.backward_batch_size) == (40, 300)
    cfg = TrainConfig(mmd_active=0, backward_batch_size=100).resolve(2)
    assert (cfg.backward_active, cfg.backward_batch_size) == (None, 100)
    assert TrainConfig().backward_active is None
    assert TrainConfig().batch_size is None
