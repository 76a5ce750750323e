"""`flain demo` on a sample folder laid out like sample_models/, and `eval --test`."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from flain_cli.checkpoint import load_checkpoint
from flain_cli.cli import output
from flain_cli.cli.app import app

from .conftest import make_images, write_aux_folder

runner = CliRunner()


@pytest.fixture
def samples(tiny_run, tmp_path):
    run, _ = tiny_run
    folder = tmp_path / "samples" / "tiny-cba"
    folder.mkdir(parents=True)
    for name in ("init.safetensors", "final.safetensors"):
        shutil.copy(run / name, folder / name)
    write_aux_folder(folder / "aux", per_class=4)
    images, labels = make_images(100, seed=9)
    np.savez(tmp_path / "samples" / "fmnist-test-2000.npz", images=images, labels=labels)
    return tmp_path / "samples"


def test_demo_before_and_after(monkeypatch, samples, tmp_path):
    res = runner.invoke(app, ["demo", "--samples-dir", str(samples), "--sample", "tiny-cba", "--out",
                              str(tmp_path / "demo"), "--test-subset", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["n_test"] == 100 and report["test"].endswith("fmnist-test-2000.npz")
    assert {"acc", "asr"} <= set(report["before"]) and {"acc", "asr"} <= set(report["after"])
    assert report["after"]["rule"] == "flain+shifts+klshift+distill+sgd" and report["paper"]["rule"] == "flain"
    assert report["defense"]["of"] == 3136 and (tmp_path / "demo" / "tiny-cba.flain.safetensors").is_file()
    assert report["paper_out"] == str(tmp_path / "demo" / "tiny-cba.flain-paper.safetensors")
    # both rows are what eval says of the written models
    for key, path in (("after", report["out"]), ("paper", report["paper_out"])):
        ev = json.loads(runner.invoke(app, ["eval", path, "--test", str(samples / "fmnist-test-2000.npz"),
                                            "--json"]).stdout)
        assert ev["acc"] == pytest.approx(report[key]["acc"]) and ev["asr"] == pytest.approx(report[key]["asr"])
        assert report[key]["flipped"] == load_checkpoint(path).meta["defense"]["flipped"]  # each row its own count
    # the same numbers as eval --test on the same files
    ev = json.loads(runner.invoke(app, ["eval", str(samples / "tiny-cba" / "final.safetensors"), "--test",
                                        str(samples / "fmnist-test-2000.npz"), "--json"]).stdout)
    assert ev["acc"] == pytest.approx(report["before"]["acc"]) and ev["asr"] == pytest.approx(report["before"]["asr"])
    # wide enough for a row per line; the console fixed its width at import where COLUMNS was exported then
    # (as on the GPU machine, COLUMNS=80), so set it on the console, not in the environment
    monkeypatch.setattr(output.out, "_width", 200)
    table = runner.invoke(app, ["demo", "--samples-dir", str(samples), "--sample", "tiny-cba", "--out",
                                str(tmp_path / "demo"), "--test-subset", "--force"])
    assert table.exit_code == 0 and "FLAIN --preset paper" in table.stdout
    rows = {line.split("│")[1].strip(): line for line in table.stdout.splitlines() if line.count("│") > 2}
    assert f"{report['paper']['flipped']} of 3136" in rows["FLAIN --preset paper"]
    assert f"{report['after']['flipped']} of 3136" in rows["FLAIN (default rule)"]
    assert f"{report['peer']['flipped']} of 3136" in rows["fine-pruning (best peer)"]
    assert report["peer"]["method"] == "fine-pruning" and report["peer_out"].endswith("-fine-pruning.safetensors")
    peer = load_checkpoint(report["peer_out"]).meta["defense"]
    assert peer["method"] == "fine-pruning" and peer["flipped"] == report["peer"]["flipped"]


def test_demo_unknown_sample(samples, tmp_path):
    res = runner.invoke(app, ["demo", "--samples-dir", str(samples), "--sample", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "available: tiny-cba" in res.stderr
