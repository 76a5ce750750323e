"""scan/defend on checkpoints written by `flain train`."""

import dataclasses
import json

import pytest
import torch

from flain_cli.audit import defend_checkpoint, scan_checkpoint
from flain_cli.checkpoint import load_checkpoint, model_meta, save_checkpoint
from flain_cli.datasets import normalize
from flain_cli.errors import CheckpointError, ConfigError
from flain_cli.features import AuxFeatures
from flain_cli.loading import load_aux_for, load_model
from flain_cli.models import build_model
from flain_cli.records import DefenseRecord
from flain_cli.settings import PRESETS, defense_config

from .conftest import write_aux_folder


@pytest.fixture(scope="module")
def aux_dir(tmp_path_factory):
    return write_aux_folder(tmp_path_factory.mktemp("aux") / "aux", per_class=8)


PAPER = PRESETS["paper"]


@pytest.mark.parametrize(("method", "rho", "preset"), [("flain", 0.0, "paper"), ("flain", 0.05, "paper"),
                                                       ("prune", 0.0, "paper"), ("prune", 0.05, "paper"),
                                                       ("flain", 0.05, "default")])
def test_fast_path_equals_algorithm_1_on_a_trained_model(tiny_run, aux_dir, method, rho, preset):
    out, _ = tiny_run
    config = defense_config(preset, method=method, step=0.01, rho=rho, shifts=0)
    fast = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config)
    plain = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config, plain=True)
    assert fast.result.lam == plain.result.lam
    assert torch.equal(fast.result.mask, plain.result.mask)
    assert all(torch.equal(fast.state[k], plain.state[k]) for k in plain.state)
    assert fast.result.evaluations <= plain.result.evaluations
    assert fast.result.changed > 0


@pytest.mark.parametrize("kl", [0.002, 0.05])
def test_the_kl_stop_on_a_trained_model(tiny_run, aux_dir, kl):
    """Both loops agree; the kept model is the first whose outputs diverge by kl; the original diverges by 0."""
    out, _ = tiny_run
    config = defense_config(step=0.01, kl=kl, kl_unit="nats", shifts=0, repair="none")
    fast = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config)
    plain = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config, plain=True)
    assert fast.result.lam == plain.result.lam and torch.equal(fast.result.mask, plain.result.mask)
    assert all(torch.equal(fast.state[k], plain.state[k]) for k in plain.state)
    trace = fast.result.trace
    assert not fast.result.all_selected and trace[-1].kl >= kl and all(0 <= s.kl < kl for s in trace[:-1])
    assert fast.result.changed > 0
    d = fast.meta["defense"]
    assert d["stop"] == "kl" and d["kl"] == kl and d["kl_kept"] == trace[-1].kl and d["rule"] == "flain+kl"
    assert DefenseRecord.from_json(json.loads(json.dumps(d))) == fast.record and fast.record.config == config
    loaded = load_model(out / "final.safetensors")
    feats = AuxFeatures(loaded.model, "fc1", load_aux_for(loaded, aux_dir), loaded.meta)
    feats.accuracy(loaded.ckpt.tensors["fc1.weight"])
    assert feats.divergence() == pytest.approx(0.0, abs=1e-12)


def test_only_the_defended_weight_changes(tiny_run, aux_dir):
    out, _ = tiny_run
    outcome = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir,
                                defense_config("paper", rho=0.05))
    original = load_checkpoint(out / "final.safetensors")
    changed = [k for k in original.tensors if not torch.equal(original.tensors[k], outcome.state[k])]
    assert changed == ["fc1.weight"]
    w, w0 = original.tensors["fc1.weight"], load_checkpoint(out / "init.safetensors").tensors["fc1.weight"]
    assert float(torch.linalg.matrix_norm(outcome.state["fc1.weight"].double())) == pytest.approx(
        float(torch.linalg.matrix_norm(w.double())), rel=1e-6)
    cols = outcome.result.mask
    unscaled = torch.where(cols.view(1, -1), 2 * w0 - w, w)
    assert torch.allclose(outcome.state["fc1.weight"], unscaled * torch.linalg.matrix_norm(w) /
                          torch.linalg.matrix_norm(unscaled), atol=1e-6)
    d = outcome.meta["defense"]
    assert outcome.meta["role"] == "defended" and d["flipped"] == int(cols.sum()) and d["of"] == 3136
    assert outcome.meta["parents"] == {"final": original.sha256,
                                       "init": load_checkpoint(out / "init.safetensors").sha256}


def test_scan_means_are_the_fc1_inputs(tiny_run, aux_dir):
    out, _ = tiny_run
    res = scan_checkpoint(out / "final.safetensors", aux_dir, shifts=0)
    assert res.layer == "fc1" and res.means.shape == (3136,) and res.n_aux == 80
    assert bool((res.means >= 0).all())  # ReLU'd inputs
    loaded = load_model(out / "final.safetensors")
    from flain_cli.auxdata import load_aux
    aux = load_aux(aux_dir, (1, 28, 28), 10)
    x = aux.normalized(loaded.meta.norm.mean, loaded.meta.norm.std)
    prefix, _ = loaded.model.split_at("fc1")
    with torch.no_grad():
        assert torch.allclose(res.means, prefix(x).mean(dim=0), atol=1e-6)
    assert scan_checkpoint(out / "final.safetensors", aux_dir, layer="fc2").means.shape == (128,)
    with pytest.raises(ConfigError, match="not a Linear layer"):
        scan_checkpoint(out / "final.safetensors", aux_dir, layer="conv1")


def test_mismatched_init_is_refused(tiny_run, aux_dir, tmp_path):
    out, _ = tiny_run
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, build_model("cnn-fmnist", 10).state_dict(),
                    model_meta("cnn-fmnist", 10, "fmnist").to_json() | {"role": "init"})
    with pytest.raises(CheckpointError, match="is a cnn-mnist but init_path .* is a cnn-fmnist"):
        defend_checkpoint(out / "final.safetensors", other, aux_dir, PAPER)
    with pytest.raises(CheckpointError, match="hold the same weights"):
        defend_checkpoint(out / "final.safetensors", out / "final.safetensors", aux_dir)
    # an init of the same architecture but from another run: the recorded parent hash catches it
    stranger = tmp_path / "stranger.safetensors"
    save_checkpoint(stranger, build_model("cnn-mnist", 10).state_dict(),
                    model_meta("cnn-mnist", 10, "fmnist").to_json() | {"role": "init"})
    with pytest.raises(CheckpointError, match="was trained from an initial checkpoint with sha256"):
        defend_checkpoint(out / "final.safetensors", stranger, aux_dir)
    wrong_classes = tmp_path / "c.safetensors"
    save_checkpoint(wrong_classes, build_model("cnn-mnist", 12).state_dict(),
                    model_meta("cnn-mnist", 12, None).to_json() | {"role": "init"})
    with pytest.raises(CheckpointError,
                       match=r"does not fit the architecture: wrong shape 2 \(fc2.weight \(12, 128\) vs \(10, 128\)"):
        defend_checkpoint(out / "final.safetensors", wrong_classes, aux_dir)


def test_holdout_scores_on_the_held_out_images(tiny_run, aux_dir):
    out, _ = tiny_run
    plain = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir,
                              defense_config("paper", rho=0.05))
    held = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir,
                             defense_config("paper", rho=0.05, holdout=0.5))
    assert plain.meta["defense"]["aux"]["scored_on"] == 80 and plain.meta["defense"]["holdout"] == 0.0
    assert held.meta["defense"]["aux"]["scored_on"] == 40 and held.meta["defense"]["holdout"] == 0.5
    assert not torch.equal(plain.result.mask, held.result.mask) or plain.result.acc0 != held.result.acc0


def test_shifted_means_average_the_features_of_every_translated_copy(tiny_run, aux_dir):
    """--shifts: exact against a plain loop that moves each image with roll and blanks the wrapped border."""
    out, _ = tiny_run
    loaded = load_model(out / "final.safetensors")
    aux = load_aux_for(loaded, aux_dir)
    feats = AuxFeatures(loaded.model, "fc1", aux, loaded.meta)
    assert torch.equal(feats.mean_activations(0), feats.features64.mean(0).float())
    prefix, norm = loaded.model.split_at("fc1")[0], loaded.meta.norm
    copies = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            moved = torch.roll(aux.images, (dy, dx), dims=(-2, -1))
            if dy:
                moved[..., 0 if dy > 0 else -1, :] = 0
            if dx:
                moved[..., :, 0 if dx > 0 else -1] = 0
            with torch.no_grad():
                copies.append(prefix(normalize(moved, norm.mean, norm.std)).double())
    expected = torch.cat(copies).mean(0).float()
    shifted = feats.mean_activations(1)
    assert torch.allclose(shifted, expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(shifted, feats.mean_activations(0))


def test_defend_with_shifts_records_them_and_is_deterministic(tiny_run, aux_dir):
    out, _ = tiny_run
    config = defense_config(step=0.01, kl=0.05, kl_unit="nats", shifts=1, repair_optimizer="adam")
    first = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config)
    again = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config)
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    d = first.meta["defense"]
    assert d["shifts"] == 1 and d["rule"] == "flain+shifts+kl+distill" and first.result.changed > 0
    assert DefenseRecord.from_json(json.loads(json.dumps(d))).config == config
    unshifted = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir,
                                  dataclasses.replace(config, shifts=0))
    assert unshifted.meta["defense"]["shifts"] == 0 and unshifted.meta["defense"]["rule"] == "flain+kl+distill"
    for bad in (-1, 11, True, 1.5):
        with pytest.raises(ConfigError, match=r"^shifts must be a whole number of pixels from 0 to 10"):
            dataclasses.replace(config, shifts=bad).check()


def test_the_repair_keeps_the_flip_and_touches_only_fc1_and_after(tiny_run, aux_dir):
    out, _ = tiny_run
    config = defense_config(rho=0.05, shifts=0, repair_optimizer="adam")  # the search, then the repair
    paper = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir,
                              defense_config("paper", rho=0.05))
    repaired = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config)
    again = defend_checkpoint(out / "final.safetensors", out / "init.safetensors", aux_dir, config)
    original = load_checkpoint(out / "final.safetensors").tensors
    changed = sorted(k for k in original if not torch.equal(original[k], repaired.state[k]))
    assert changed == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]  # the conv layers stay as trained
    mask = repaired.result.mask
    assert torch.equal(mask, paper.result.mask) and int(mask.sum()) > 0
    # the flipped columns are exactly the paper's; the others were trained
    assert torch.equal(repaired.state["fc1.weight"][:, mask], paper.state["fc1.weight"][:, mask])
    assert not torch.equal(repaired.state["fc1.weight"][:, ~mask], paper.state["fc1.weight"][:, ~mask])
    assert all(torch.equal(repaired.state[k], again.state[k]) for k in original)  # deterministic
    assert all(repaired.state[k].dtype == original[k].dtype for k in original)
    d = repaired.meta["defense"]
    assert d["rule"] == "flain+distill" and d["repair"]["steps"] == 100 and d["repair"]["alpha"] == 0.8
    assert d["repair"]["aux_acc_flipped"] == pytest.approx(paper.record.aux_acc_after)
    assert paper.meta["defense"]["rule"] == "flain" and paper.meta["defense"]["repair"] is None
    # the typed record and the JSON layout read back into each other, settings included
    for outcome in (repaired, paper):
        assert DefenseRecord.from_json(json.loads(json.dumps(outcome.meta["defense"]))) == outcome.record
    assert repaired.record.config == config and paper.record.config == dataclasses.replace(config, repair=None)
    assert repaired.record.aux_acc_flipped == pytest.approx(paper.record.aux_acc_after)
    with pytest.raises(CheckpointError, match="defense record version 2"):
        DefenseRecord.from_json(d | {"version": 2})
    with pytest.raises(CheckpointError, match="incomplete or malformed"):
        DefenseRecord.from_json({k: v for k, v in d.items() if k != "lambda"})
