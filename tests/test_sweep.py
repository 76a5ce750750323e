"""`flain sweep`: the model `defend` would write at each threshold, scored on aux and test data."""

import csv
import json

import pytest
import torch

from flain_cli.checkpoint import load_checkpoint

from .conftest import invoke


def test_sweep_scores_the_unchanged_model_as_eval_does(tiny_run, aux_dir, tmp_path):
    run, data = tiny_run
    common = [run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir, "--step", "0.01"]
    res = invoke("sweep", *common, "--points", "25", "--data-dir", data, "--csv", tmp_path / "curve.csv", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    points = report["points"]
    assert report["attack"] == "0:5" and report["n_test"] == 200 and report["of"] == 3136 and len(points) == 26
    assert report["shifts"] == 2 and report["rescale"] is True  # defend's defaults
    assert points[0]["lambda"] is None and points[0]["changed"] == 0
    changed = [p["changed"] for p in points]
    assert changed == sorted(changed) and changed[-1] > changed[1] > 0
    before = json.loads(invoke("eval", run / "final.safetensors", "--data-dir", data, "--json").stdout)
    assert points[0]["acc"] == pytest.approx(before["acc"]) and points[0]["asr"] == pytest.approx(before["asr"])
    assert points[0]["asr_clean"] == pytest.approx(before["asr_clean"])
    rows = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert list(rows[0]) == ["lambda", "changed", "aux_acc", "acc", "asr", "asr_clean"] and len(rows) == 26
    assert rows[0]["lambda"] == "" and float(rows[5]["acc"]) == pytest.approx(points[5]["acc"])


@pytest.mark.parametrize("options", [
    ("--preset", "paper", "--rho", "0.05"),
    ("--preset", "paper", "--rho", "0.05", "--method", "prune"),
    ("--preset", "paper", "--rho", "0.05", "--no-rescale"),
    ("--repair", "none", "--kl", "0.05", "--kl-unit", "nats"),  # the default search: moved copies, the kl stop
])
def test_the_sweep_at_defends_lambda_holds_exactly_what_defend_writes(tiny_run, aux_dir, tmp_path, options):
    """The layer the sweep scores at each threshold (defense.candidates) is, at defend's lambda, the very tensor
    defend writes, for each method and with --no-rescale; the sweep's row there reads that model's scores."""
    from flain_cli.defense import candidates
    from flain_cli.features import AuxFeatures
    from flain_cli.loading import load_aux_for, load_model
    from flain_cli.settings import defense_config
    run, data = tiny_run
    common = [run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir, "--step", "0.01"]
    out = tmp_path / "clean.safetensors"
    res = invoke("defend", *common, *options, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    defended = json.loads(res.stdout)
    written = load_checkpoint(out).tensors["fc1.weight"]
    config = defense_config(defended["preset"], method=defended["method"], step=0.01, rescale="--no-rescale" not in
                            options, shifts=defended["shifts"])
    loaded = load_model(run / "final.safetensors")
    x = AuxFeatures(loaded.model, "fc1", load_aux_for(loaded, aux_dir), loaded.meta).mean_activations(config.shifts)
    init = load_checkpoint(run / "init.safetensors").tensors["fc1.weight"]
    (kept,) = [c for c in candidates(loaded.ckpt.tensors["fc1.weight"], init, x, config, 1000)
               if c.lam == defended["lambda"]]
    assert torch.equal(kept.weight, written) and int(kept.mask.sum()) == defended["flipped"] > 0
    sweep_options = ["--method", defended["method"], "--shifts", str(config.shifts),
                     *(["--no-rescale"] if "--no-rescale" in options else [])]
    report = json.loads(invoke("sweep", *common, *sweep_options, "--points", "1000", "--data-dir", data,
                               "--json").stdout)
    (row,) = [p for p in report["points"][1:] if p["lambda"] == defended["lambda"]]
    assert row["changed"] == defended["flipped"] and row["aux_acc"] == pytest.approx(defended["aux_acc_after"])
    after = json.loads(invoke("eval", out, "--data-dir", data, "--json").stdout)
    assert row["acc"] == pytest.approx(after["acc"], abs=0.011) and row["asr"] == pytest.approx(after["asr"],
                                                                                              abs=0.011)


def test_sweep_errors(tiny_run, aux_dir, tmp_path):
    run, data = tiny_run
    res = invoke("sweep", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--points", "0", "--data-dir", data)
    assert res.exit_code == 2 and "--points" in res.stderr
    assert "greater than or equal to 1" in res.stderr or "not in the range 1<=x" in res.stderr  # click 8.3 / 8.1
    res = invoke("sweep", run / "final.safetensors", "--init", run / "final.safetensors", "--aux", aux_dir,
                 "--data-dir", data)
    assert res.exit_code == 1 and "hold the same weights" in res.stderr
    table = invoke("sweep", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                   "--points", "3", "--data-dir", data)
    assert table.exit_code == 0 and "(unchanged)" in table.stdout and "ASR without" in table.stdout
