"""The premise warning: FLAIN needs near-silent inputs to exist on clean data; the aux set shows when they do not."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flain_cli.features import NEAR_SILENT_SHARE, near_silent

from .conftest import invoke


def test_near_silent_counts_inputs_far_below_the_median():
    # a conv layer's flattened ReLU maps: many inputs near 0 on clean data
    conv_like = torch.cat([torch.zeros(40), torch.full((10,), 0.004), torch.rand(950) + 0.5])
    assert near_silent(conv_like) == 50
    # pooled features (a ResNet's classifier): every input active on average
    pooled = torch.rand(64) * 0.4 + 0.6
    assert near_silent(pooled) == 0 < NEAR_SILENT_SHARE * 64 + 1


def test_defend_and_scan_say_when_no_input_is_near_silent(tiny_run, aux_dir, tmp_path):
    """The tiny cnn-mnist run has near-silent fc1 inputs: no premise warning. ResNet-small's pooled classifier
    inputs have none: scan and defend both warn and name the alternative."""
    run, data = tiny_run
    scan = json.loads(invoke("scan", run / "final.safetensors", "--aux", aux_dir, "--json").stdout)
    assert not any("near-silent" in w for w in scan["warnings"])
    res = invoke("train", "--data-dir", data, "--arch", "resnet-small", "--clients", "2", "--mcr", "0.5", "--pdr",
                 "0.5", "--rounds", "1", "--batch-size", "64", "--seed", "1", "--out", tmp_path / "resnet")
    assert res.exit_code == 0, res.output
    # one round leaves the pooled features spread; a trained ResNet's are all active on clean data (the grid's:
    # none of 64 below 5 % of the median). Lift the last block's output as training would.
    final = tmp_path / "resnet" / "final.safetensors"
    with safe_open(final, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    tensors["block3.bn2.bias"] += 1.0
    save_file(tensors, final, metadata=meta)
    scan = invoke("scan", final, "--aux", aux_dir, "--json")
    assert any("near-silent" in w for w in json.loads(scan.stdout)["warnings"]), scan.output
    defended = invoke("defend", tmp_path / "resnet" / "final.safetensors", "--init",
                      tmp_path / "resnet" / "init.safetensors", "--aux", aux_dir, "--out", tmp_path / "d.safetensors",
                      "--repair-steps", "3", "--json")
    assert defended.exit_code == 0, defended.output
    warnings = json.loads(defended.stdout)["warnings"]
    assert any("near-silent" in w and "--method fine-pruning" in w for w in warnings)
    from flain_cli.checkpoint import load_checkpoint
    assert any("near-silent" in w for w in load_checkpoint(tmp_path / "d.safetensors").meta["defense"]["warnings"])
