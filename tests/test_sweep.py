"""`flain sweep`: the model `defend` would write at each threshold, scored on aux and test data."""

import csv
import json

import pytest

from .conftest import invoke


def test_sweep_agrees_with_defend_and_eval(tiny_run, aux_dir, tmp_path):
    run, data = tiny_run
    common = [run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir, "--step", "0.01"]
    res = invoke("sweep", *common, "--points", "25", "--data-dir", data, "--csv", tmp_path / "curve.csv", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    points = report["points"]
    assert report["attack"] == "0:5" and report["n_test"] == 200 and report["of"] == 3136 and len(points) == 26
    assert points[0]["lambda"] is None and points[0]["changed"] == 0
    changed = [p["changed"] for p in points]
    assert changed == sorted(changed) and changed[-1] > changed[1] > 0
    # the unchanged model scores what eval says
    before = json.loads(invoke("eval", run / "final.safetensors", "--data-dir", data, "--json").stdout)
    assert points[0]["acc"] == pytest.approx(before["acc"]) and points[0]["asr"] == pytest.approx(before["asr"])
    assert points[0]["asr_clean"] == pytest.approx(before["asr_clean"])
    # the threshold defend stops at: same neurons, same aux accuracy, same test ACC/ASR as the written model
    # (the sweep is the search's curve: Algorithm 1 without the repair, i.e. the paper preset)
    out = tmp_path / "clean.safetensors"
    defended = json.loads(invoke("defend", *common, "--rho", "0.05", "--preset", "paper", "--out", out,
                                 "--json").stdout)
    (row,) = [p for p in points[1:] if p["lambda"] == pytest.approx(defended["lambda"])]
    assert row["changed"] == defended["flipped"]
    assert row["aux_acc"] == pytest.approx(defended["aux_acc_after"])
    after = json.loads(invoke("eval", out, "--data-dir", data, "--json").stdout)
    assert row["acc"] == pytest.approx(after["acc"], abs=0.01) and row["asr"] == pytest.approx(after["asr"], abs=0.05)
    rows = list(csv.DictReader((tmp_path / "curve.csv").open()))
    assert list(rows[0]) == ["lambda", "changed", "aux_acc", "acc", "asr", "asr_clean"] and len(rows) == 26
    assert rows[0]["lambda"] == "" and float(rows[5]["acc"]) == pytest.approx(points[5]["acc"])


def test_sweep_with_shifts_follows_defend_with_shifts(tiny_run, aux_dir, tmp_path):
    run, data = tiny_run
    common = [run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir, "--step", "0.01",
              "--shifts", "1", "--json"]
    report = json.loads(invoke("sweep", *common, "--points", "25", "--data-dir", data).stdout)
    plain = json.loads(invoke("sweep", *common[:-3], "--points", "25", "--data-dir", data, "--json").stdout)
    assert report["shifts"] == 1 and plain["shifts"] == 0 and report["points"] != plain["points"]
    defended = json.loads(invoke("defend", *common, "--rho", "0.05", "--preset", "paper", "--out",
                                 tmp_path / "shifted.safetensors").stdout)
    (row,) = [p for p in report["points"][1:] if p["lambda"] == pytest.approx(defended["lambda"])]
    assert row["changed"] == defended["flipped"] and row["aux_acc"] == pytest.approx(defended["aux_acc_after"])


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
