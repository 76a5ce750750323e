import builtins
import json

import pytest
from typer.testing import CliRunner

from flain_cli.cli.app import app

pytest.importorskip("matplotlib")
runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"round": r, "acc": 0.5 + r / 20, "asr": r / 10, "seconds": 1.0}) + "\n"
                           for r in range(1, 6)))
    trace = tmp_path / "trace.csv"
    trace.write_text("lambda,selected,aux_acc,drop\n0.001,3,0.9,0.0\n0.002,9,0.88,0.02\n0.004,20,0.86,0.04\n")
    means = tmp_path / "means.csv"
    means.write_text("neuron,mean\n" + "".join(f"{i},{i / 100}\n" for i in range(50)))
    return log, trace, means


def test_each_plot_writes_a_png(files, tmp_path):
    log, trace, means = files
    for kind, src in (("training", log), ("trace", trace), ("activations", means)):
        out = tmp_path / f"{kind}.png"
        res = invoke("plot", kind, src, "--out", out)
        assert res.exit_code == 0, res.output
        assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


def test_bad_plot_inputs(files, tmp_path):
    log, trace, means = files
    res = invoke("plot", "trace", means, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a CSV with columns lambda, selected, aux_acc" in res.stderr
    res = invoke("plot", "training", log, "--out", tmp_path / "x.jpg")
    assert res.exit_code == 1 and "must end in .png" in res.stderr
    res = invoke("plot", "training", trace, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a `flain train --log` file" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_a_clear_error(files, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = invoke("plot", "training", files[0], "--out", tmp_path / "t.png")
    assert res.exit_code == 1 and res.stderr.strip() == "Error: plotting needs matplotlib: pip install 'flain-cli[plot]'"
