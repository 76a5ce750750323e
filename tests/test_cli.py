"""The CLI contract: exit codes, the one-line errors, the JSON on stdout."""

import json

import pytest
import torch

from flain_cli.checkpoint import load_checkpoint
from flain_cli.events import read_train_log

from .conftest import invoke

TINY = ["--arch", "cnn-mnist", "--clients", "2", "--mcr", "0.5", "--pdr", "0.5", "--rounds", "1",
        "--batch-size", "64", "--seed", "1"]



@pytest.fixture
def trained(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    res = invoke("train", "--data-dir", fmnist_dir, *TINY, "--out", out, "--log", tmp_path / "log.jsonl", "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout), fmnist_dir


def test_train_writes_checkpoints_log_and_json(trained, tmp_path):
    out, summary, _ = trained
    assert {"init", "final", "acc", "asr", "history", "init_sha256", "final_sha256"} <= set(summary)
    init, final = load_checkpoint(out / "init.safetensors"), load_checkpoint(out / "final.safetensors")
    assert init.meta["role"] == "init" and final.meta["role"] == "final"
    assert final.meta["parents"]["init"] == init.sha256 == summary["init_sha256"]
    assert final.meta["attack"] == {"task": "0:5", "source": 0, "target": 5, "trigger": "cba", "pdr": 0.5,
                                    "mcr": 0.5, "malicious_clients": [0]}
    assert final.meta["train_config"]["clients"] == 2 and final.meta["seed"] == 1
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1] and {"acc", "asr", "seconds", "train_seconds"} <= set(lines[0])
    # one record of a round: the log's lines are train.json's history, and read back the same way
    assert lines == summary["history"] == read_train_log(tmp_path / "log.jsonl")


def test_eval_json_contract(trained):
    out, summary, data_dir = trained
    res = invoke("eval", out / "final.safetensors", "--data-dir", data_dir, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"acc", "asr", "asr_clean", "n_clean", "n_triggered"} <= set(report)
    assert 0 <= report["asr_clean"] <= 1
    assert report["n_clean"] == 200 and report["n_triggered"] == 20
    assert report["acc"] == pytest.approx(summary["acc"]) and report["asr"] == pytest.approx(summary["asr"])
    assert len(report["per_class_acc"]) == 10
    # overrides: another attack task, or none
    other = json.loads(invoke("eval", out / "final.safetensors", "--data-dir", data_dir, "--attack", "all:3",
                              "--json").stdout)
    assert other["attack"] == "all:3" and other["n_triggered"] == 180
    assert json.loads(invoke("eval", out / "final.safetensors", "--data-dir", data_dir, "--attack", "none",
                             "--json").stdout)["asr"] is None


def test_eval_table_shows_per_class_accuracy_when_asked(trained):
    out, _, data_dir = trained
    res = invoke("eval", out / "final.safetensors", "--data-dir", data_dir, "--per-class")
    assert res.exit_code == 0 and "per-class accuracy" in res.stdout and "Ankle boot" in res.stdout
    assert "per-class" not in invoke("eval", out / "final.safetensors", "--data-dir", data_dir).stdout


def test_eval_of_several_models_in_one_call_equals_separate_calls(trained, tmp_path):
    """One call, one test set read, one row per model: each row is what a call of its own says; with --reference,
    the changes and DER against it; --csv writes the same rows."""
    out, _, data_dir = trained
    models = [out / "final.safetensors", out / "init.safetensors"]
    alone = [json.loads(invoke("eval", m, "--data-dir", data_dir, "--json").stdout) for m in models]
    res = invoke("eval", *models, "--data-dir", data_dir, "--reference", models[0], "--csv", tmp_path / "e.csv",
                 "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert isinstance(rows, list) and [r["model"] for r in rows] == [str(m) for m in models]
    for row, single in zip(rows, alone):
        assert {k: row[k] for k in single} == single  # the single call's object, field for field
    assert rows[0]["der"] == 0.5 and rows[0]["d_acc"] == 0  # the reference against itself
    assert rows[1]["d_acc"] == pytest.approx(rows[1]["acc"] - rows[0]["acc"])
    expected = (max(0.0, rows[0]["asr"] - rows[1]["asr"]) - max(0.0, rows[0]["acc"] - rows[1]["acc"]) + 1) / 2
    assert rows[1]["der"] == pytest.approx(expected)
    import csv
    table = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert [float(r["acc"]) for r in table] == [r["acc"] for r in rows] and "acc_class_9" in table[0]
    shown = invoke("eval", *models, "--data-dir", data_dir, "--reference", models[0])
    assert "DER" in shown.stdout and any(line.split()[:1] == ["init"] for line in shown.stdout.splitlines())


def test_existing_outputs_are_not_overwritten(trained):
    out, _, data_dir = trained
    before = (out / "final.safetensors").read_bytes()
    res = invoke("train", "--data-dir", data_dir, *TINY, "--out", out)
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [f"Error: --out (init) {out / 'init.safetensors'} already exists; "
                                               "pass --force to replace it or choose another path"]
    assert (out / "final.safetensors").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["eval", "missing.safetensors"], "Error: checkpoint missing.safetensors does not exist"),
    (["train", "--attack", "0:12"], "Error: attack 0:12 names class 12"),
    (["train", "--mcr", "1.5"], "Error: --mcr must be in [0, 1], got 1.5"),
    (["train", "--trigger", "star"], "Error: unknown trigger 'star'; choose one of: cba, dba"),
    (["train", "--dataset", "mnist", "--data-dir", "nowhere"],
     "Error: MNIST file train-images-idx3-ubyte[.gz] not found in: nowhere"),
    pytest.param(["train", "--device", "cuda:0"], "Error: --device cuda was asked for",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_input_is_one_error_line_and_exit_1(args, message):
    res = invoke(*args)
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert "Traceback" not in res.output


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_text("hello")
    res = invoke("eval", bad)
    assert res.exit_code == 1 and res.stderr.startswith(f"Error: {bad} is not a checkpoint flain-cli can read")


def test_usage_errors_keep_exit_code_2():
    assert invoke("train", "--rounds", "many").exit_code == 2
    assert invoke("eval").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.startswith("flain-cli ")


def test_same_seed_same_files_and_a_clean_run(tmp_path, fmnist_dir):
    shas = []
    for name in ("a", "b"):
        res = invoke("train", "--data-dir", fmnist_dir, *TINY, "--out", tmp_path / name, "--json")
        assert res.exit_code == 0, res.output
        shas.append((json.loads(res.stdout)["init_sha256"], json.loads(res.stdout)["final_sha256"]))
    assert shas[0] == shas[1]
    assert (tmp_path / "a" / "final.safetensors").read_bytes() == (tmp_path / "b" / "final.safetensors").read_bytes()
    clean = invoke("train", "--data-dir", fmnist_dir, *TINY, "--attack", "none", "--out", tmp_path / "c", "--json")
    summary = json.loads(clean.stdout)
    assert summary["asr"] is None and summary["poisoned_samples"] == 0 and summary["malicious_clients"] == []
    assert load_checkpoint(tmp_path / "c" / "final.safetensors").meta["attack"] is None
    assert json.loads(invoke("eval", tmp_path / "c" / "final.safetensors", "--data-dir", fmnist_dir,
                             "--json").stdout)["asr"] is None


def test_train_precision_is_an_option_recorded_in_the_checkpoints(tmp_path, fmnist_dir):
    out = tmp_path / "bf16"
    res = invoke("train", "--data-dir", fmnist_dir, *TINY, "--precision", "bf16", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out / "final.safetensors").meta["train_config"]["precision"] == "bf16"
    bad = invoke("train", "--data-dir", fmnist_dir, *TINY, "--precision", "fp8", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "fp8" in bad.stderr and not (tmp_path / "x").exists()
