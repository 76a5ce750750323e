"""End to end on the real Fashion-MNIST from Debian's dataset-fashion-mnist (CI installs it)."""

import json

import pytest
from typer.testing import CliRunner

from flain_cli.cli.app import app

from .conftest import real_fmnist

pytestmark = [real_fmnist, pytest.mark.e2e]
runner = CliRunner()


def flain(*args) -> dict:
    res = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A backdoor planted quickly (3 rounds, cnn-mnist, PDR 1) with `flain train` on real data."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    summary = flain("train", "--dataset", "fmnist", "--arch", "cnn-mnist", "--clients", "2", "--mcr", "0.5",
                    "--pdr", "1.0", "--attack", "0:5", "--trigger", "cba", "--split", "iid", "--rounds", "3",
                    "--train-samples", "6000", "--eval-every", "3", "--seed", "1", "--out", out)
    return out, summary


def test_train_then_eval(backdoored):
    out, summary = backdoored
    # 1 malicious client of 2 (IID), poisoning all of its ~300 class-0 samples
    assert 250 <= summary["poisoned_samples"] <= 350
    report = flain("eval", out / "final.safetensors")
    assert report["n_clean"] == 10000 and report["n_triggered"] == 1000
    assert report["acc"] == pytest.approx(summary["acc"]) and report["asr"] == pytest.approx(summary["asr"])
    assert report["acc"] > 0.6  # chance is 0.1
    assert report["asr"] > 0.5  # the backdoor is in


def test_defend_cuts_the_backdoor(backdoored, tmp_path):
    """FLAIN with the paper's step and rho cuts the ASR; clean accuracy drops by about rho at most."""
    out, before = backdoored
    flain("aux", "export", "--dataset", "fmnist", "--per-class", "20", "--out", tmp_path / "aux")
    defended = flain("defend", out / "final.safetensors", "--init", out / "init.safetensors",
                     "--aux", tmp_path / "aux", "--out", tmp_path / "clean.safetensors")
    assert defended["flipped"] > 0 and not defended["all_selected"]
    after = flain("eval", tmp_path / "clean.safetensors")
    assert after["asr"] < before["asr"] / 2, (before["asr"], after["asr"])
    assert after["acc"] >= before["acc"] - 0.03 - 0.02, (before["acc"], after["acc"])
