"""The backend vocabulary and resolver (ncf_fast.backends), and the energy_backend setting."""
import sys

import numpy as np
import pytest
import torch

from ncf_fast import NCF, PotentialMLP, TrainConfig, backends, config, costs, energy, pair_sums
from ncf_fast.estimator import FORMAT

F32, F64 = torch.float32, torch.float64
WIDE = (128, 128, 128)


class _Custom(costs.Quadratic):
    """A Cost the kernels do not implement (an exact-class check: a subclass may change h)."""
    name = "custom_for_tests"


def test_the_issue_examples():
    assert backends.resolve("mlp", "cuda", F64, 2, WIDE, "quadratic") == "torch"
    assert backends.resolve("mlp", "cuda", F32, 2, WIDE, "quadratic") == "triton"
    assert backends.resolve("mlp", "cuda", F32, 200, WIDE, "quadratic") == "torch"
    assert backends.resolve("energy", "cuda", F64, 16) == "torch"
    for op in backends.OPS:
        for dtype in (F32, F64):
            for device in ("cpu", torch.device("cpu")):
                assert backends.resolve(op, device, dtype, 2, WIDE, "quadratic") == "torch"


def test_resolve_at_the_kernel_limits():
    def mlp(**kw):
        case = dict(dim=2, hidden=WIDE, cost="quadratic") | kw
        return backends.resolve("mlp", torch.device("cuda", 1), F32, **case)

    assert mlp(dim=127) == "triton" and mlp(dim=128) == "torch"
    assert mlp(hidden=(512, 3, 17)) == "triton" and mlp(hidden=(64, 513)) == "torch"
    assert mlp(hidden=600) == "torch"
    assert mlp(cost="power:1.5") == "triton" and mlp(cost=costs.Power(1.2)) == "triton"
    assert mlp(cost=costs.Quadratic()) == "triton" and mlp(cost=_Custom()) == "torch"
    assert mlp(cost=None, hidden=None, dim=None) == "triton"  # unknown parts are not checked
    assert backends.resolve("energy", "cuda", F32, 64) == "triton"
    assert backends.resolve("energy", "cuda", F32, 65) == "torch"
    assert backends.resolve("energy", "cuda", torch.float16, 3) == "torch"
    with pytest.raises(ValueError, match="op must be one of"):
        backends.resolve("residual", "cuda", F32)


def test_resolve_probes_neither_cuda_nor_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("resolve probed the machine")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    monkeypatch.setattr(torch.cuda, "device_count", boom)
    monkeypatch.setattr("ncf_fast.kernels.triton_available", boom)
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of triton would raise
    assert backends.resolve("mlp", "cuda:0", F32, 3, (64,), "quadratic") == "triton"
    assert backends.resolve("energy", "cpu", F32, 3) == "torch"


def test_the_limits_are_the_kernels():
    pytest.importorskip("triton")
    from ncf_fast.kernels import energy_distance, mlp_launch
    assert backends.MLP_MAX_INPUT == mlp_launch.MAX_INPUT
    assert backends.MLP_MAX_WIDTH == mlp_launch.MAX_WIDTH
    assert backends.ENERGY_MAX_D == energy_distance.MAX_D


@pytest.mark.parametrize("case,limit", [
    (("mlp", F64, 2, WIDE, "quadratic"), "compute in float32, got torch.float64"),
    (("mlp", F32, 200, WIDE, "quadratic"), r"d <= 127, got d = 200"),
    (("mlp", F32, 2, (64, 1024), "quadratic"), "widths <= 512, got 1024"),
    (("mlp", F32, 2, WIDE, _Custom()), "Quadratic and Power costs only"),
    (("energy", F32, 65, None, None), r"d <= 64, got d = 65"),
])
def test_explicit_triton_outside_the_limits_names_the_limit_and_the_fallback(case, limit):
    op, dtype, dim, hidden, cost = case
    for call in (lambda: backends.check("triton", op, dtype, dim, hidden, cost),
                 lambda: backends.select("triton", op, "cuda", dtype, dim, hidden, cost)):
        with pytest.raises(ValueError, match=limit) as err:
            call()
        assert "backend='torch'" in str(err.value) and "'auto'" in str(err.value)


def test_select(monkeypatch):
    assert backends.select("Torch", "mlp", "cuda", F64) == "torch"
    assert backends.select("reference", "energy", "cuda", F32, 3) == "reference"
    assert backends.select("auto", "mlp", "cpu", F32, 2, WIDE) == "torch"
    with pytest.raises(ValueError, match="backend must be one of auto, reference, torch, triton"):
        backends.select("cuda", "mlp", "cpu", F32)
    monkeypatch.setattr("ncf_fast.backends._triton_installed", lambda: False)
    assert backends.select("auto", "mlp", "cuda", F32, 2, WIDE) == "torch"  # no triton: torch
    with pytest.raises(ValueError, match="needs the triton package"):
        backends.select("triton", "mlp", "cuda", F32, 2, WIDE)
    monkeypatch.setattr("ncf_fast.backends._triton_installed", lambda: True)
    assert backends.select("auto", "mlp", "cuda", F32, 2, WIDE) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        backends.select("triton", "energy", "cpu", F32, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tests' interpreter: triton on request
    assert backends.select("triton", "energy", "cpu", F32, 3) == "triton"


def test_explicit_triton_energy_on_float64_warns_and_auto_keeps_float64():
    pytest.importorskip("triton")
    a, b = torch.randn(20, 3, dtype=F64), torch.randn(15, 3, dtype=F64)
    with pytest.warns(UserWarning, match="in float32"):
        energy.energy_distance(a, b, backend="triton")
    assert pair_sums.resolve_backend("auto", a) == "torch"
    ref = energy.energy_distance(a, b, backend="reference")
    torch.testing.assert_close(energy.energy_distance(a, b), ref, rtol=1e-12, atol=1e-14)


def test_models_refuse_explicit_triton_they_cannot_run():
    """NCF(2, dtype=float64) and d >= 128 train on "auto"; asked for triton, they fail at once."""
    NCF(2, dtype=F64, seed=0, device="cpu")  # auto: fine
    with pytest.raises(ValueError, match="backend='triton' cannot run this case: .*float32"):
        NCF(2, dtype=F64, seed=0, device="cpu", backend="triton")
    with pytest.raises(ValueError, match=r"d <= 127, got d = 200"):
        NCF(200, seed=0, device="cpu", backend="triton")
    with pytest.raises(ValueError, match="widths <= 512"):
        NCF(2, hidden=(1024,), seed=0, device="cpu", backend="triton")
    with pytest.raises(ValueError, match=r"energy_backend='triton' cannot run .*d <= 64"):
        NCF(65, seed=0, device="cpu", energy_backend="triton")
    with pytest.raises(ValueError, match="energy_backend must be one of"):
        NCF(2, seed=0, device="cpu", energy_backend="gpu")
    pytest.importorskip("triton")  # under the interpreter the ops accept triton on CPU tensors
    model = PotentialMLP(2, (16,), backend="triton").double()
    with pytest.raises(ValueError, match="compute in float32"):
        model.value_and_grad(torch.randn(4, 2, dtype=F64), 0.5)


def test_auto_runs_float64_and_wide_models_on_the_cpu():
    rng = np.random.default_rng(0)
    src, tgt = rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 1.0
    model = NCF(2, hidden=(16, 16), dtype=F64, seed=0, device="cpu")
    model.fit(src, tgt, steps=2, batch_size=32, mmd_batch_size=64, mmd_active=16, holdout=0,
              progress=False)
    assert np.all(np.isfinite(model.history["hj"]))


def test_energy_backend_reaches_the_loss_and_the_holdout_check(monkeypatch):
    import ncf_fast.trainer as trainer_mod
    seen = []
    for name in ("witness_energy_distance", "energy_distance"):
        real = getattr(trainer_mod, name)
        monkeypatch.setattr(trainer_mod, name, lambda *a, _real=real, _name=name, **kw: (
            seen.append((_name, kw.get("backend", a[-1] if isinstance(a[-1], str) else None))),
            _real(*a, **kw))[1])
    rng = np.random.default_rng(0)
    src, tgt = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 1.0
    kw = dict(steps=2, batch_size=16, mmd_batch_size=32, mmd_active=8, holdout=40,
              eval_every=2, progress=False)
    NCF(2, hidden=(8,), seed=0, device="cpu", energy_backend="reference").fit(src, tgt, **kw)
    # two steps of the forward and backward witness terms, then both held-out checks
    assert seen == [("witness_energy_distance", "reference")] * 4 + [
        ("energy_distance", "reference")] * 2
    seen.clear()  # a fit's TrainConfig.energy_backend overrides the estimator's
    NCF(2, hidden=(8,), seed=0, device="cpu", energy_backend="reference").fit(
        src, tgt, energy_backend="torch", **kw)
    assert {b for _, b in seen} == {"torch"}
    assert TrainConfig(energy_backend="TORCH").energy_backend == "torch"
    with pytest.raises(ValueError, match="energy_backend must be one of"):
        TrainConfig(energy_backend="cuda")


def test_energy_backend_round_trips_through_checkpoints_and_setup_conf(tmp_path):
    model = NCF(2, hidden=(8,), seed=0, device="cpu", backend="torch", energy_backend="torch")
    assert "energy_backend='torch'" in repr(model)
    ckpt = model.to_checkpoint()
    assert ckpt["config"]["energy_backend"] == "torch"
    assert NCF.from_checkpoint(ckpt).energy_backend == "torch"
    old = dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "energy_backend"})
    assert old["format"] == FORMAT and NCF.from_checkpoint(old).energy_backend == "auto"
    flat = config.parse_config({"model": {"energy_backend": "Torch"}})
    assert flat["model.energy_backend"] == "torch"
    assert config.parse_config({})["model.energy_backend"] == "auto"  # old files: the default
    assert NCF(2, device="cpu", **config.model_kwargs(flat)).energy_backend == "torch"
    with pytest.raises(config.ConfigError, match="model.energy_backend must be one of"):
        config.parse_config({"model": {"energy_backend": "gpu"}})
    pytest.importorskip("pyhocon")
    path = tmp_path / "setup.conf"
    path.write_text(config.to_hocon(flat))
    assert config.load_config(str(path)) == flat


def test_cli_flags_beside_backend():
    from ncf_fast import cli
    from ncf_fast.cli import inputs
    parser = cli.build_parser()
    for command in ("train", "demo"):
        args = parser.parse_args([command, "--backend", "torch", "--energy_backend", "reference"])
        assert inputs.flag_overrides(args)["model.energy_backend"] == "reference"
        assert inputs.flag_overrides(args)["model.backend"] == "torch"
