"""End to end on the real Fashion-MNIST from Debian's dataset-fashion-mnist (CI installs it)."""

import json

import pytest
from typer.testing import CliRunner

from flain_cli.cli.app import app

from .conftest import real_fmnist

pytestmark = [real_fmnist, pytest.mark.e2e]
runner = CliRunner()


def test_train_then_eval_on_real_fashion_mnist(tmp_path):
    out = tmp_path / "x"
    res = runner.invoke(app, ["train", "--dataset", "fmnist", "--clients", "4", "--mcr", "0.5", "--pdr", "0.5",
                              "--attack", "0:5", "--trigger", "cba", "--split", "iid", "--rounds", "2",
                              "--train-samples", "4000", "--eval-every", "2", "--seed", "1", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    # 2 malicious clients of 4 (IID), each poisoning half of its ~100 class-0 samples
    assert 80 <= summary["poisoned_samples"] <= 120
    res = runner.invoke(app, ["eval", str(out / "final.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["n_clean"] == 10000 and report["n_triggered"] == 1000
    assert report["acc"] == pytest.approx(summary["acc"])
    assert report["acc"] > 0.2  # chance is 0.1: two short rounds on 4,000 real images learn something
    assert 0.0 <= report["asr"] <= 1.0
