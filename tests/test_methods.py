"""The peers as defend methods (fine-tuning, fine-pruning, the repair alone, RNP on the defended layer): each
against a step-by-step reference on a tiny model, through the CLI, and bad settings refused in one line."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flain_cli import peers
from flain_cli.audit import defend_checkpoint, repair_warnings
from flain_cli.catalog import METHODS
from flain_cli.checkpoint import load_checkpoint
from flain_cli.features import AuxFeatures
from flain_cli.loading import load_aux_for, load_model
from flain_cli.settings import RepairSettings, defense_config

from .conftest import invoke


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs = torch.randn(30, 1, 3, 4)
    labels = torch.arange(30) % 3
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):  # a model that has learnt its images (RNP has something to unlearn)
        opt.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        opt.step()
    return model, inputs, labels


def test_fine_tune_is_plain_full_batch_sgd_and_keeps_the_frozen_entries():
    model, inputs, labels = tiny()
    settings = RepairSettings(steps=7, optimizer="sgd", lr=0.05)
    frozen = {"1.weight": torch.zeros(8, 12, dtype=torch.bool)}
    frozen["1.weight"][:, 3] = True
    tuned = peers.fine_tune(model, inputs, labels, settings, frozen)
    ref = copy.deepcopy(model).eval()  # the reference: the loop written out
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(ref(inputs), labels).backward()
        ref[1].weight.grad[:, 3] = 0
        opt.step()
    assert all(torch.allclose(tuned.state[k], v, atol=1e-7) for k, v in ref.state_dict().items())
    assert torch.equal(tuned.state["1.weight"][:, 3], model[1].weight[:, 3])  # frozen: bit for bit
    assert not torch.equal(tuned.state["1.weight"], model[1].weight)  # and the rest trained
    assert tuned.lr == 0.05 and tuned.diverged == () and tuned.loss_after < tuned.loss_before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny()[0].state_dict().values()))


def steep(scale: float):
    """An untrained tiny model on inputs ``scale`` times larger: SGD at lr 1 diverges there (at scale 3 lr 1/3 does
    not; at scale 30 every lr down to 1/27 does)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, scale * torch.randn(30, 1, 3, 4), torch.arange(30) % 3


def test_a_diverging_fine_tuning_runs_again_at_a_third_of_the_learning_rate():
    model, inputs, labels = steep(3)
    settings = RepairSettings(steps=20, optimizer="sgd", lr=1.0, backtrack=0)
    alone = peers.fine_tune(model, inputs, labels, settings)
    assert alone.loss_after > alone.loss_before and alone.lr == 1.0  # off: the diverged run comes back
    tuned = peers.fine_tune(model, inputs, labels, replace(settings, backtrack=3))
    assert tuned.diverged == ((1.0, alone.loss_after),) and tuned.lr == pytest.approx(1 / 3)
    once = peers.fine_tune(model, inputs, labels, replace(settings, lr=1 / 3))  # the run it kept, run alone
    assert all(torch.equal(tuned.state[k], v) for k, v in once.state.items())
    assert tuned.loss_after == once.loss_after < tuned.loss_before


def test_when_every_fine_tuning_diverges_the_model_comes_back_as_it_was():
    model, inputs, labels = steep(30)
    tuned = peers.fine_tune(model, inputs, labels, RepairSettings(steps=20, optimizer="sgd", lr=1.0, backtrack=2))
    assert [lr for lr, _ in tuned.diverged] == pytest.approx([1.0, 1 / 3, 1 / 9]) and tuned.lr == 0.0
    assert math.isnan(tuned.diverged[0][1])  # a run that ends in NaN has diverged too
    assert all(torch.equal(tuned.state[k], v) for k, v in model.state_dict().items())
    assert tuned.loss_after == tuned.loss_before
    assert repair_warnings(tuned) == [
        f"the fine-tuning diverged at lr 1 (its loss {tuned.loss_before:.3g} -> nan), lr 0.333 (its loss "
        f"{tuned.loss_before:.3g} -> {tuned.diverged[1][1]:.3g}), lr 0.111 (its loss {tuned.loss_before:.3g} -> "
        f"{tuned.diverged[2][1]:.3g}); kept the model without fine-tuning (--repair-backtrack)"]


def test_rnp_unlearns_then_recovers_a_mask_step_by_step(monkeypatch):
    model, inputs, labels = tiny()
    monkeypatch.setattr(peers, "RNP_UNLEARNED", 0.5)
    monkeypatch.setattr(peers, "RNP_MASK_STEPS", 12)
    monkeypatch.setattr(peers, "RNP_UNLEARN_LR", 0.5)  # a tiny model that fits its images by a wide margin
    result = peers.rnp_mask(model, "3", inputs, labels)
    # the reference: gradient ascent until aux accuracy <= 0.5, then a [0, 1] mask on the layer's inputs
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(ref.parameters(), lr=peers.RNP_UNLEARN_LR, momentum=0.9)
    steps = 0
    while steps < peers.RNP_UNLEARN_STEPS and float((ref(inputs).argmax(1) == labels).double().mean()) > 0.5:
        opt.zero_grad()
        (-F.cross_entropy(ref(inputs), labels)).backward()
        opt.step()
        steps += 1
    mask = torch.ones(8, requires_grad=True)
    opt = torch.optim.SGD([mask], lr=peers.RNP_MASK_LR, momentum=0.9)
    for _ in range(12):
        opt.zero_grad()
        F.cross_entropy(ref[3](ref[2](ref[1](ref[0](inputs))) * mask), labels).backward()
        opt.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
    assert result.unlearn_steps == steps > 0 and result.unlearned_acc <= 0.5
    assert torch.allclose(result.mask, mask.detach(), atol=1e-6) and bool((result.mask < 1).any())
    assert torch.equal(result.selected, result.mask < peers.RNP_THRESHOLD)
    order = torch.argsort(result.ranking)  # zeros first (those that reached 0 first lowest), then by mask value
    values = result.mask[order]
    assert bool((values[1:] >= values[:-1]).all() | (values[:-1] == 0).all())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny()[0].state_dict().values()))


@pytest.mark.parametrize("name", ["finetune", "fine-pruning", "distill", "rnp"])
def test_each_method_through_defend(tiny_run, aux_dir, name):
    run, _ = tiny_run
    config = defense_config(method=name, repair_steps=5, repair_lr=0.01, shifts=0)
    outcome = defend_checkpoint(run / "final.safetensors", run / "init.safetensors", aux_dir, config)
    original = load_checkpoint(run / "final.safetensors").tensors
    d = outcome.meta["defense"]
    assert d["method"] == name and outcome.record.config == config
    method = METHODS.get(name)
    if method.select == "none":
        assert outcome.result is None and d["flipped"] == 0 and d["lambda"] is None
    else:
        assert outcome.result is not None and d["flipped"] == int(outcome.result.mask.sum()) > 0
        cols = outcome.result.mask
        assert bool((outcome.state["fc1.weight"][:, cols] == 0).all())  # pruned, and kept so through the training
    changed = sorted(k for k in original if not torch.equal(original[k], outcome.state[k]))
    if method.train == "finetune":
        assert "conv1.weight" in changed  # every layer trains
    elif name == "distill":  # the repair alone: the layers from fc1 on, no column selected
        loaded = load_model(run / "final.safetensors")
        feats = AuxFeatures(loaded.model, "fc1", load_aux_for(loaded, aux_dir), loaded.meta)
        expected, _ = feats.repair(original["fc1.weight"], torch.zeros(3136, dtype=torch.bool), config.repair)
        assert changed == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
        assert all(torch.equal(outcome.state[k], expected[k].to(torch.float32)) for k in expected)
    else:  # rnp: pruned, no training
        assert changed == ["fc1.weight"]


def test_the_methods_on_the_command_line(tiny_run, aux_dir, tmp_path):
    run, data = tiny_run
    common = [run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir, "--repair-steps", "3"]
    res = invoke("defend", *common, "--method", "finetune", "--out", tmp_path / "f.safetensors", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["method"] == "finetune" and report["lambda"] is None and report["flipped"] == 0
    table = invoke("defend", *common, "--method", "fine-pruning", "--out", tmp_path / "p.safetensors")
    assert table.exit_code == 0 and "search on fc1" in table.stdout and "neurons changed" in table.stdout
    no_init = invoke("defend", run / "final.safetensors", "--aux", aux_dir, "--method", "rnp", "--out",
                     tmp_path / "r.safetensors", "--json")
    assert no_init.exit_code == 0 and json.loads(no_init.stdout)["method"] == "rnp"  # RNP needs no W0


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "finetune", "--repair", "none"], "Error: --method finetune trains on the aux set: it needs the "
                                                   "training settings of --repair distill"),
    (["--method", "distill", "--trace", "{tmp}/t.csv"], "Error: --trace is the search's curve; method distill does "
                                                        "not search"),
    (["--method", "krum"], "Error: unknown method 'krum'"),
])
def test_bad_method_settings_are_one_error_line(tiny_run, aux_dir, tmp_path, options, message):
    run, _ = tiny_run
    out = tmp_path / "o.safetensors"
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--out", out, *[o.format(tmp=tmp_path) for o in options])
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(message), res.stderr
    assert not out.exists()
    sweep = invoke("sweep", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                   "--method", "finetune", "--points", "2")
    assert sweep.exit_code == 1 and "changes no columns" in sweep.stderr
