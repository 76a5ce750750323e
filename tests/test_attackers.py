"""Stronger attackers, new triggers and architectures: each one's defining property, and each end to end
through `flain train` on a tiny federation, read back by `flain eval` without options."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from flain_cli.attack import adaptive_penalty, boosted, neurotoxin_masks, projected
from flain_cli.models import build_model
from flain_cli.simulation import TrainConfig, make_clients, train_client
from flain_cli.triggers import make_trigger

from .conftest import invoke
from .test_simulation import _dataset

CFG = TrainConfig(arch="cnn-mnist", clients=4, mcr=0.5, pdr=0.5, attack="0:5", trigger="cba", rounds=1,
                  batch_size=32, seed=3)


def malicious_update(cfg: TrainConfig, previous=None, seed: int = 0):
    """One malicious client's (client 0's) update from a fixed global model, with ``cfg``'s attacker."""
    data = _dataset()
    clients = make_clients(cfg, data, np.random.default_rng(cfg.seed))
    torch.manual_seed(seed)
    model = build_model(cfg.arch, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trigger = make_trigger(cfg.trigger_spec, 28, 28)
    torch.manual_seed(seed)
    return train_client(model, state, clients[0], data, trigger, 5, cfg, torch.Generator().manual_seed(seed),
                        torch.device("cpu"), previous), state


def test_boosting_scales_the_malicious_update_by_k():
    plain, _ = malicious_update(CFG)
    boosted_update, _ = malicious_update(dataclasses.replace(CFG, boost=5.0))
    assert all(torch.equal(boosted_update[k], plain[k] * 5.0) for k in plain)
    assert boosted({"w": torch.ones(2)}, 3.0, ["w"])["w"].tolist() == [3.0, 3.0]


def test_the_norm_constrained_update_lies_in_the_ball():
    plain, _ = malicious_update(CFG)
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in plain.values())))
    bounded, _ = malicious_update(dataclasses.replace(CFG, norm_bound=norm / 4))
    names = list(plain)
    assert float(torch.sqrt(sum((bounded[k].double() ** 2).sum() for k in names))) <= norm / 4 * (1 + 1e-6)
    assert torch.allclose(bounded["fc1.weight"], plain["fc1.weight"] / 4, rtol=1e-5)  # the same direction
    assert projected({"w": torch.tensor([3.0, 4.0])}, 10.0, ["w"])["w"].tolist() == [3.0, 4.0]  # inside: as is


def test_neurotoxins_update_is_zero_on_the_masked_coordinates():
    _, state = malicious_update(CFG)
    gen = torch.Generator().manual_seed(7)
    previous = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    update, _ = malicious_update(dataclasses.replace(CFG, neurotoxin=10.0), previous)
    masks = neurotoxin_masks(previous, 10.0, list(previous))
    masked = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert masked == int(total * 0.1)  # the 10 % the previous global update changed most
    assert all(bool((update[k][~masks[k]] == 0).all()) for k in masks)
    top = torch.cat([p.abs().flatten() for p in previous.values()]).topk(masked).values.min()
    assert all(bool((previous[k].abs()[~masks[k]] >= top).all()) for k in masks)
    assert any(bool((update[k][masks[k]] != 0).any()) for k in masks)  # it still trains elsewhere


def test_the_adaptive_terms_gradient_reaches_the_layers_before_the_defended_one():
    model = build_model("cnn-mnist", 10)
    seen = []
    model.fc1.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    model(torch.randn(8, 1, 28, 28))
    chosen = torch.arange(5)
    penalty = adaptive_penalty(seen[0], chosen, level=float(seen[0].detach().mean(0).max()) + 1)
    penalty.backward()
    assert penalty > 0 and model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc1.weight.grad is None  # the term reads fc1's inputs, not its weights
    assert adaptive_penalty(seen[0].detach(), chosen, level=-1.0) == 0  # busy enough: no penalty
    plain, _ = malicious_update(CFG)
    aware, _ = malicious_update(dataclasses.replace(CFG, adaptive=5.0))
    assert not torch.equal(plain["conv1.weight"], aware["conv1.weight"])


def test_a_clean_client_ignores_the_attackers_options():
    data = _dataset()
    cfg = dataclasses.replace(CFG, boost=5.0, norm_bound=0.01, adaptive=1.0)
    clients = make_clients(cfg, data, np.random.default_rng(cfg.seed))
    model = build_model("cnn-mnist", 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trig = make_trigger("cba", 28, 28)
    runs = []
    for c in (cfg, CFG):
        torch.manual_seed(0)
        runs.append(train_client(model, state, clients[3], data, trig, 5, c, torch.Generator().manual_seed(0),
                                 torch.device("cpu")))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("options", [
    ["--trigger", "blend", "--trigger-alpha", "0.2"], ["--trigger", "sig"], ["--trigger", "checker", "--trigger-pos",
                                                                              "2,3"],
    ["--boost", "3"], ["--neurotoxin", "5", "--rounds", "2"], ["--norm-bound", "1.5"], ["--adaptive", "2"],
    ["--arch", "lenet5"], ["--arch", "resnet-small"], ["--arch", "mlp"],
])
def test_each_new_setting_trains_is_recorded_and_is_read_back_by_eval(fmnist_dir, aux_dir, tmp_path, options):
    out = tmp_path / "run"
    args = ["train", "--data-dir", fmnist_dir, "--clients", "2", "--mcr", "0.5", "--pdr", "0.5", "--rounds", "1",
            "--batch-size", "64", "--seed", "1", *(["--arch", "cnn-mnist"] if "--arch" not in options else []),
            *options, "--out", out, "--json"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    from flain_cli.checkpoint import load_checkpoint
    meta = load_checkpoint(out / "final.safetensors").meta
    given = dict(zip(options[::2], options[1::2]))
    recorded = meta["train_config"]
    for option, value in given.items():
        key = option.removeprefix("--").replace("-", "_")
        assert str(recorded[key]) == value or float(recorded[key]) == float(value)
    attack = meta["attack"]
    if "--trigger" in given:
        assert attack["trigger"] == given["--trigger"]
    if any(o in given for o in ("--boost", "--neurotoxin", "--norm-bound", "--adaptive")):
        assert attack["attacker"] != "plain"
    report = json.loads(invoke("eval", out / "final.safetensors", "--data-dir", fmnist_dir, "--json").stdout)
    assert report["asr"] == pytest.approx(summary["asr"])  # the trigger read back from the metadata, settings too
    assert report["trigger"].startswith(given.get("--trigger", "cba")) and report["ra"] is not None
    if options == ["--arch", "mlp"]:  # fc1 reads normalized pixels: negative, and defend says FLAIN's premise fails
        defended = invoke("defend", out / "final.safetensors", "--init", out / "init.safetensors", "--aux", aux_dir,
                          "--preset", "paper", "--rho", "0.1", "--out", tmp_path / "d.safetensors", "--json")
        assert defended.exit_code == 0 and "take negative values" in " ".join(json.loads(defended.stdout)["warnings"])
    if options == ["--arch", "resnet-small"]:
        assert meta["defended_layer"] == "fc"


@pytest.mark.parametrize(("options", "message"), [
    (["--trigger", "cba", "--trigger-alpha", "0.2"], "Error: --trigger-alpha is the blend trigger's weight"),
    (["--trigger", "checker", "--trigger-pos", "1"], "Error: --trigger-pos must be ROW,COL"),
    (["--trigger", "blend", "--trigger-image", "missing.png"], "Error: --trigger-image missing.png is not a file"),
    (["--boost", "0"], "Error: --boost must be in (0, 1000], got 0.0"),
    (["--neurotoxin", "100"], "Error: --neurotoxin must be a share in [0, 100) percent"),
    (["--adaptive", "1", "--attack", "none"], "Error: the attacker's options (adaptive 1) need malicious clients"),
])
def test_bad_attack_settings_are_one_error_line(fmnist_dir, tmp_path, options, message):
    res = invoke("train", "--data-dir", fmnist_dir, "--rounds", "1", *options, "--out", tmp_path / "t")
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(message), res.stderr
    assert not (tmp_path / "t" / "final.safetensors").exists()
