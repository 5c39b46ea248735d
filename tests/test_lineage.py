"""The research code's conventions (ncf_fast.lineage): its setup.conf schema, its run.py flags,
its checkpoints. Every conf and checkpoint here is written by the test itself, in the format the
lineage (PINC / IGR) uses: HOCON sections train / network / plot, {"epoch", "model_state_dict"}
of an MLP lin0 ... linK with softplus(beta) between the layers.
"""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import _train, bad, data, last_line, log_rows  # noqa: F401 (fixtures)
from tolerance import assert_close_to_ref

from ncf_fast import NCF, cli, lineage
from ncf_fast.cli import inputs
from ncf_fast import config as config_mod
from ncf_fast.estimator import read_checkpoint
from ncf_fast.trainer import TrainConfig, lr_at

# a setup.conf as the lineage writes it, plus three ncf_fast keys that keep the run small
LINEAGE_CONF = """
train {
    d_in = 2
    plot_frequency = 20
    checkpoint_frequency = 20
    status_frequency = 20
    weight_decay = 0
    network_class = model.network.ImplicitNet
    input_path = data/input_data.npy
    learning_rate_schedule = [{ Type = Step, Initial = 0.004, Interval = 25, Factor = 0.5 }]
    mmd_batch_size = 64
    mmd_active = 16
    holdout = 32
}
plot { resolution = 100, mc_value = 0.0, verbose = false }
network {
    inputs { dims = [24, 40], skip_in = [], geometric_init = true, radius_init = 1, beta = 100 }
    sampler { sampler_type = NormalPerPoint, properties { global_sigma = 1.8 } }
    loss { lambda = 0.1, normals_lambda = 1 }
}
"""
IGNORED = ("network.inputs.geometric_init", "network.sampler.properties.global_sigma",
           "network.loss.normals_lambda", "plot.mc_value", "train.d_in", "train.plot_frequency",
           "train.network_class", "train.input_path")


def _conf(tmp_path, text, name="setup.conf"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ setup.conf
def test_step_schedule():
    cfg = TrainConfig(lr=0.01, lr_schedule="step", lr_interval=3, lr_factor=0.5, warmup=0)
    assert [lr_at(cfg, s) for s in range(8)] == [0.01] * 3 + [0.005] * 3 + [0.0025] * 2
    warm = TrainConfig(lr=0.01, lr_schedule="step", lr_interval=3, lr_factor=0.5, warmup=2)
    assert [lr_at(warm, s) for s in range(5)] == [0.005, 0.01, 0.01, 0.005, 0.005]
    for bad_field in ({"lr_schedule": "linear"}, {"lr_interval": 0}, {"lr_factor": 0.0},
                      {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad_field)).split("_")[-1]):
            TrainConfig(**bad_field)


def test_weight_decay_reaches_adam_and_the_readme_has_the_mapping_table():
    x = np.random.default_rng(0).standard_normal((64, 2))
    trainer = NCF(2, device="cpu", seed=0).make_trainer(x, x + 1, TrainConfig(weight_decay=0.01))
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        assert lineage.mapping_markdown() in f.read()


def test_lineage_conf_maps_onto_the_keys_and_names_what_it_ignores(tmp_path):
    path = _conf(tmp_path, LINEAGE_CONF)
    cfg = config_mod.load_config(path)
    changed = {k: v for k, v in cfg.items() if v != config_mod.defaults()[k]}
    assert changed == {"model.hidden": [24, 40], "model.activation": "softplus", "train.lr": 0.004,
                       "train.lr_schedule": "step", "train.lr_interval": 25, "train.warmup": 0,
                       "train.eval_every": 20, "run.checkpoint_every": 20, "train.mmd_batch_size": 64,
                       "train.mmd_active": 16, "train.holdout": 32}
    line = lineage.take_ignored(str(path))
    for name in IGNORED:
        assert name in line
    assert "skip_in" not in line  # [] is what ncf_fast does anyway
    assert lineage.take_ignored(str(path)) is None  # once
    # the resolved config a run stores reads back to the same values, with ncf_fast's keys only
    (tmp_path / "resolved.conf").write_text(config_mod.to_hocon(cfg))
    assert config_mod.load_config(tmp_path / "resolved.conf") == cfg
    constant = "train { learning_rate_schedule = [{ Type = Constant, Value = 0.003 }] }"
    cfg = config_mod.load_config(_conf(tmp_path, constant, "constant.conf"))
    assert [lr_at(config_mod.train_config(cfg).resolve(2), s) for s in (0, 5000)] == [0.003] * 2


@pytest.mark.parametrize("text, needles", [
    ("network { inputs { dimz = [4] } }", ["'network.inputs.dimz'", "did you mean 'network.inputs.dims'"]),
    ("network { sampling { a = 1 } }", ["'network.sampling'", "did you mean 'network.sampler'"]),
    ("network { inputs { dims = [4, 0] } }", ["network.inputs.dims", "positive integers"]),
    ("train { checkpoint_frequency = 2.5 }", ["train.checkpoint_frequency", "positive integer"]),
    ("train { learning_rate_schedule = [{ Type = Warmup, Initial = 0, Final = 1, Length = 9 }] }",
     ["Type 'Warmup'", "Step", "Constant"]),
    ("train { learning_rate_schedule = [{ Type = Step, Initial = 0.1, Intreval = 5, Factor = 0.5 }] }",
     ["'Intreval'", "did you mean 'Interval'"]),
    ("train { learning_rate_schedule = [{ Type = Step, Initial = 0.1, Factor = 0.5 }] }", ["needs Interval"]),
    ("train { learning_rate_schedule = [{ Type = Step, Initial = -1, Interval = 5, Factor = 0.5 }] }",
     ["Initial", "positive number", "-1"]),
    ("train { learning_rate_schedule = 0.1 }", ["list of schedules"]),
    ("model { hidden = [8] }\nnetwork { inputs { dims = [16] } }", ["model.hidden", "network.inputs.dims"]),
    ("train { lr = 0.1, learning_rate_schedule = [{ Type = Step, Initial = 0.2, Interval = 5, Factor = 1 }] }",
     ["train.lr", "learning_rate_schedule"]),
    ("train { stpes = 3, checkpoint_frequency = 5 }", ["'train.stpes'", "did you mean 'train.steps'"]),
])
def test_bad_lineage_conf_is_one_line_naming_the_key(bad, data, tmp_path_factory, text, needles):
    conf = _conf(tmp_path_factory.mktemp("conf"), text)
    bad(_train(bad, data, conf=conf), str(conf), *needles)


def test_bad_input_with_a_lineage_conf_is_still_one_line(bad, data, tmp_path_factory):
    """The ignored keys are reported when a run starts; a run that never starts says one thing."""
    conf = _conf(tmp_path_factory.mktemp("conf"), LINEAGE_CONF)
    bad(_train(bad, data, conf=conf, inp=data / "nope.npy"), "nope.npy", "no such")
    lineage.take_ignored(str(conf))


# ----------------------------------------------------------------------------------- flags
def test_research_code_flags_are_checked_like_the_others(bad, data, tmp_path_factory):
    bad(_train(bad, data, extra=["--nepoch", "0"]), "--nepoch", "positive integer")
    bad(_train(bad, data, extra=["--points_batch", "many"]), "--points_batch", "positive integer")
    bad(_train(bad, data, extra=["--checkpoint", "best"]), "--checkpoint", "latest or a step number")
    bad(_train(bad, data, extra=["--is_continue", "--timestamp", "../x"]), "--timestamp",
        "run folder name")
    bad(_train(bad, data, extra=["--timestamp", "2026"]), "--timestamp", "add --is_continue or --eval")
    bad(_train(bad, data, extra=["--checkpoint", "20"]), "--checkpoint", "add --is_continue or --eval")
    bad(_train(bad, data, extra=["--is_continue", "--eval"]), "choose one")
    bad(_train(bad, data, extra=["--is_continue", "--resume", bad.dir]), "--resume", "use one")
    bad(_train(bad, data, extra=["--is_continue"]), "no run of 'ncf' to continue", "start one")
    bad(_train(bad, data, extra=["--gpu", "fast"]), "--gpu", "auto")
    bad(_train(bad, data, extra=["--is_contine"]), "did you mean --is_continue")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_auto_without_cuda_is_the_cpu():
    assert inputs.resolve_device("auto") == torch.device("cpu")
    assert lineage.least_loaded_gpu() == "cpu"


@pytest.mark.slow
def test_lineage_conf_trains_continues_and_evaluates(data, tmp_path, capfd):
    """--nepoch/--points_batch with a lineage setup.conf: widths, Step schedule and checkpoint
    frequency honoured; --is_continue --checkpoint 40 continues the latest run from step 40, on
    the same trajectory (its step 60 is the first run's) and past its end; --eval --timestamp
    evaluates a named run and writes nothing. In-process (cli.main): interpreter start-ups would
    cost more than the training."""
    conf = _conf(tmp_path, LINEAGE_CONF)
    args = ["--home_dir", tmp_path / "home", "--conf", conf, "--data_dir", data, "--input",
            "input_data.npy", "--output", "output_data.npy", "--gpu", "cpu", "--points_batch", "64",
            "--quiet"]

    def train(*extra):
        code = cli.main([str(a) for a in args + list(extra)])
        out, err = capfd.readouterr()
        assert code == 0, err
        return last_line(out), err

    run_dir, err = train("--nepoch", "60")
    assert err.count("ignored: ") == 1 and "network.loss.lambda" in err
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts == ["latest.pt", "step_000020.pt", "step_000040.pt", "step_000060.pt"]
    ckpt = read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert ckpt["config"]["hidden"] == [24, 40] and ckpt["config"]["activation"] == "softplus"
    assert ckpt["trainer"]["config"]["batch_size"] == 64
    rows = log_rows(run_dir)
    assert [float(r["lr"]) for r in rows] == [0.004 * 0.5 ** ((s - 1) // 25) for s in range(1, 61)]
    reference = tmp_path / "step60.pt"
    shutil.copy(os.path.join(run_dir, "checkpoints", "step_000060.pt"), reference)

    assert train("--nepoch", "80", "--is_continue", "--checkpoint", "40")[0] == run_dir
    assert [int(r["step"]) for r in log_rows(run_dir)] == list(range(1, 81))
    ours = read_checkpoint(os.path.join(run_dir, "checkpoints", "step_000060.pt"))["state_dict"]
    for k, v in read_checkpoint(reference)["state_dict"].items():
        torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert read_checkpoint(os.path.join(run_dir, "checkpoints", "latest.pt"))["trainer"]["step"] == 80

    before = sorted(os.listdir(run_dir))
    assert cli.main([str(a) for a in args + ["--eval", "--timestamp", os.path.basename(run_dir),
                                             "--checkpoint", "40"]]) == 0
    out = capfd.readouterr().out
    assert "step_000040.pt" in out and "energy_distance_forward" in out
    assert sorted(os.listdir(run_dir)) == before


# ------------------------------------------------------------------------------ checkpoints
class LineageMLP(torch.nn.Module):
    """The lineage's network as its papers describe it: lin0 ... linK on the input z, softplus
    with beta between the layers, none after the last; layers in skip_in see [h, z] / sqrt(2)."""

    def __init__(self, d_in, dims, beta=100.0, skip_in=(), d_out=1):
        super().__init__()
        widths = [d_in, *dims, d_out]
        self.skip_in, self.beta, self.count = tuple(skip_in), beta, len(widths) - 1
        for k in range(self.count):
            out = widths[k + 1] - d_in if k + 1 in self.skip_in else widths[k + 1]
            setattr(self, f"lin{k}", torch.nn.Linear(widths[k], out))
            torch.nn.init.normal_(getattr(self, f"lin{k}").weight, std=1.5 / widths[k] ** 0.5)
            torch.nn.init.normal_(getattr(self, f"lin{k}").bias, std=0.3)

    def forward(self, z):
        h = z
        for k in range(self.count):
            if k in self.skip_in:
                h = torch.cat((h, z), -1) / 2 ** 0.5
            h = getattr(self, f"lin{k}")(h)
            if k < self.count - 1:
                h = F.softplus(h, beta=self.beta)
        return h.squeeze(-1)


def _maps(net, x, y, time_axis, dtype):
    """T(x) = x + grad_x u(x, 0), T^-1(y) = y - grad_x u(y, 1) of the lineage network, by autograd."""
    net = net.to(dtype)

    def grad(points, t):
        points = torch.as_tensor(points, dtype=dtype).requires_grad_()
        col = torch.full((points.shape[0], 1), float(t), dtype=dtype)
        z = torch.cat((points, col) if time_axis == "last" else (col, points), 1)
        return torch.autograd.grad(net(z).sum(), points)[0].detach()
    return (torch.as_tensor(x, dtype=dtype) + grad(x, 0.0),
            torch.as_tensor(y, dtype=dtype) - grad(y, 1.0))


def _save(net, path, epoch=500):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"epoch": epoch, "model_state_dict": net.state_dict()}, path)
    return path


@pytest.mark.parametrize("dim, dims, beta, time_axis", [
    (2, (32, 32), 100.0, "last"), (2, (32, 32), 100.0, "first"), (1, (17,), 1.5, "first"),
    (3, (24, 40, 16), 10.0, "last")])
def test_lineage_checkpoint_loads_and_transports(tmp_path, rng, dim, dims, beta, time_axis):
    net = LineageMLP(dim + 1, dims, beta=beta)
    path = _save(net, tmp_path / "latest.pth")
    # no runconf.conf beside it: beta None is the lineage's 100
    ncf = NCF.load(path, device="cpu", time_axis=time_axis, beta=None if beta == 100.0 else beta)
    assert ncf.dim == dim and ncf.model.hidden == dims and ncf.model.activation == "softplus"
    x, y = rng.standard_normal((37, dim)), rng.standard_normal((41, dim))
    ref64, ref32 = _maps(net, x, y, time_axis, torch.float64), _maps(net, x, y, time_axis, torch.float32)
    for fast, r64, r32, name in zip((ncf.transport(x), ncf.inverse(y)), ref64, ref32, ("T", "T^-1")):
        assert_close_to_ref(torch.from_numpy(fast), r64, r32, name)
    other = NCF.load(path, device="cpu", time_axis="first" if time_axis == "last" else "last", beta=beta)
    assert np.abs(other.transport(x) - ref64[0].numpy()).max() > 1e-3  # the axis matters


def test_lineage_run_folder_via_the_cli(tmp_path, rng, capfd):
    """transport --checkpoint RUN of the research code: ModelParameters/latest.pth, weight-normed
    layers, beta from the run's runconf.conf; without --time_axis: asked for, nothing written."""
    net = LineageMLP(3, (24, 24), beta=4.0)
    state = {}  # torch.nn.utils.weight_norm's names: W = g v / |v|, one norm per output row
    for k in range(3):
        w, b = getattr(net, f"lin{k}").weight.detach(), getattr(net, f"lin{k}").bias.detach()
        state.update({f"lin{k}.weight_g": w.norm(dim=1, keepdim=True), f"lin{k}.weight_v": 3.0 * w,
                      f"lin{k}.bias": b})
    run = tmp_path / "exps" / "pinc" / "2023_05_01_12_00_00"
    os.makedirs(run / "checkpoints" / "ModelParameters")
    torch.save({"epoch": 9, "model_state_dict": state}, run / "checkpoints" / "ModelParameters" / "latest.pth")
    (run / "runconf.conf").write_text("network { inputs { dims = [24, 24], beta = 4 } }\n")
    x = rng.standard_normal((50, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    args = ["transport", "--checkpoint", run, "--input", tmp_path / "x.npy", "--out", out, "--gpu", "cpu"]
    assert cli.main([str(a) for a in args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "time_axis" in err[0] and not out.exists()
    assert cli.main([str(a) for a in args + ["--time_axis", "last"]]) == 0
    capfd.readouterr()
    ref64, ref32 = _maps(net, x, x, "last", torch.float64), _maps(net, x, x, "last", torch.float32)
    assert_close_to_ref(torch.from_numpy(np.load(out)).double(), ref64[0], ref32[0], "T")
    cont = ["train", "--home_dir", tmp_path, "--expname", "pinc", "--gpu", "cpu", "--is_continue"]
    for extra, needle in (([], "only runs of the research code"),
                          (["--timestamp", run.name], "a run of the research code")):
        assert cli.main([str(a) for a in cont + extra]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_lineage_checkpoints_that_are_not_a_plain_potential_are_refused(tmp_path):
    cases = {
        "skip.pth": LineageMLP(3, (16, 16, 16), skip_in=(2,)).state_dict(),
        "vector.pth": LineageMLP(3, (16,), d_out=2).state_dict(),
        "one_layer.pth": LineageMLP(3, ()).state_dict(),
        "latent.pth": {**LineageMLP(3, (16,)).state_dict(), "latent.weight": torch.zeros(4, 2)},
        "gap.pth": {k.replace("lin1", "lin2"): v for k, v in LineageMLP(3, (16,)).state_dict().items()},
        "no_bias.pth": {k: v for k, v in LineageMLP(3, (16,)).state_dict().items() if k != "lin1.bias"},
        "shapes.pth": {**LineageMLP(3, (16,)).state_dict(), "lin1.weight": torch.zeros(1, 15)},
        "nan.pth": {**LineageMLP(3, (16,)).state_dict(), "lin0.bias": torch.full((16,), float("nan"))},
        "one_input.pth": LineageMLP(1, (16,)).state_dict(),
    }
    needles = {"skip.pth": "skip connection re-injecting the input at lin2",
               "vector.pth": "2 outputs", "one_layer.pth": "at least one hidden layer",
               "latent.pth": "'latent.weight'", "gap.pth": "lin0 ... linK", "no_bias.pth": "lin1 is not",
               "shapes.pth": "lin1 takes 15 inputs but lin0 gives 16", "nan.pth": "NaN",
               "one_input.pth": "d + 1 >= 2"}
    for name, state in cases.items():
        torch.save({"epoch": 1, "model_state_dict": state}, tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(needles[name])):
            NCF.load(tmp_path / name, time_axis="last")
    torch.save({"epoch": 1, "optimizer_state_dict": {"state": {}, "param_groups": []}}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="OptimizerParameters"):
        NCF.load(tmp_path / "opt.pth", time_axis="last")
    torch.save({"epoch": 1, "model_state_dict": {"lin0.weight": os.system}}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        NCF.load(tmp_path / "code.pth", time_axis="last")
    _save(LineageMLP(3, (16,)), tmp_path / "good.pth")
    with pytest.raises(ValueError, match="give time_axis last"):
        NCF.load(tmp_path / "good.pth")
