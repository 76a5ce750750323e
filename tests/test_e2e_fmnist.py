"""End to end on the real Fashion-MNIST from Debian's dataset-fashion-mnist (CI installs it)."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flain_cli.checkpoint import load_checkpoint
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


SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
# sha256 over (name, bytes) of every tensor `flain defend` wrote for each sample model with the
# defaults of before the repair existed (step 0.001, rho 0.03, crossing): --preset paper must keep them.
PAPER_TENSORS = {"fmnist-cba-iid": "12838ff506fd6623c31aca56acbcd77c1be878066f4261de40331dde4c9bc54e",
                 "fmnist-dba-noniid": "677d4dfc6e7fce6a20f4a3271959e859f697d4c01b1d7cad011541248c409300"}


def tensors_sha256(path: Path) -> str:
    tensors = load_checkpoint(path).tensors
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("sample", sorted(PAPER_TENSORS))
def test_sample_models_paper_preset_and_default_rule(sample, tmp_path):
    """--preset paper writes what the paper's defaults always wrote; the default rule keeps far more ACC."""
    folder = SAMPLES / sample
    common = [folder / "final.safetensors", "--init", folder / "init.safetensors", "--aux", folder / "aux"]
    flain("defend", *common, "--preset", "paper", "--out", tmp_path / "paper.safetensors")
    assert tensors_sha256(tmp_path / "paper.safetensors") == PAPER_TENSORS[sample]
    report = flain("defend", *common, "--out", tmp_path / "default.safetensors")
    assert report["rule"] == "flain+shifts+kl+distill+sgd" and report["stop"] == "kl" and report["kl"] == 0.07
    assert report["shifts"] == 2 and report["repair"]["optimizer"] == "sgd" and report["repair"]["lr"] == 0.1
    before, paper, default = (flain("eval", tmp_path / name if name != "final" else folder / "final.safetensors")
                              for name in ("final", "paper.safetensors", "default.safetensors"))
    assert before["asr"] > 0.95 and default["asr"] <= 0.03 and paper["asr"] <= 0.03
    assert default["acc"] >= paper["acc"] + 0.02  # measured: +2.9 (CBA) and +6.3 (DBA) points
    assert default["acc"] >= before["acc"] - 0.01  # the target: measured -0.96 and -0.97 points
