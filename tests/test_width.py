"""Every table of demo, eval, scan, defend and sweep fits an 80-column terminal: no line is wider, and no row's
label wraps onto a second line (a line whose first cell has text while every other cell is empty)."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from flain_cli.cli import output
from flain_cli.cli.app import app

from .conftest import make_images, write_aux_folder

runner = CliRunner()


@pytest.fixture
def narrow(monkeypatch):
    # the consoles fix their width at import; set it on them, as a terminal of 80 columns would
    monkeypatch.setattr(output.out, "_width", 80)
    monkeypatch.setattr(output.err, "_width", 80)


def wrapped_labels(text: str) -> list[str]:
    """Table lines whose first cell continues the row above (its other cells empty), and table lines over 80 (a
    path printed after a table stays whole on its line, for copying)."""
    bad = [line for line in text.splitlines() if len(line) > 80 and any(c in line for c in "│─━┃")]
    for line in text.splitlines():
        cells = line.split("│")
        if len(cells) > 3 and cells[1].strip() not in ("", "...", "…") and not any(c.strip() for c in cells[2:-1]):
            bad.append(line)
    return bad


def check(args: list[str], must_show: list[str]) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("│") > 6 or "────" in res.stdout, res.stdout  # a table was drawn
    assert wrapped_labels(res.stdout) == [], res.stdout
    lines = res.stdout.splitlines()
    for label in must_show:
        assert any(label in line for line in lines), f"{label!r} is not on one line:\n{res.stdout}"
    return res.stdout


@pytest.fixture
def model(tiny_run, tmp_path):
    run, _ = tiny_run
    aux = write_aux_folder(tmp_path / "aux", per_class=4)
    images, labels = make_images(100, seed=9)
    np.savez(tmp_path / "test.npz", images=images, labels=labels)
    return run, aux, tmp_path / "test.npz"


def test_eval_scan_defend_and_sweep_fit_80_columns(narrow, model, tmp_path):
    run, aux, test = model
    final, init = run / "final.safetensors", run / "init.safetensors"
    check(["defend", final, "--init", init, "--aux", aux, "--out", tmp_path / "d.safetensors", "--repair-steps", "5"],
          ["flipped"])
    deep = tmp_path / ("a-folder-whose-name-alone-is-longer-than-a-narrow-terminal-" * 2) / "defended.safetensors"
    deep.parent.mkdir()
    check(["defend", final, "--init", init, "--aux", aux, "--out", deep, "--repair-steps", "5"],
          [f"written: {deep}"])  # the whole path, on one line
    long_name = tmp_path / "a-rather-long-model-name-final.safetensors"
    shutil.copy(final, long_name)
    table = check(["eval", final, long_name, tmp_path / "d.safetensors", "--reference", final, "--test", test],
                  ["final ", " d ", "a-rather-l…el-name-final"])  # a long name keeps its end
    rows = [line for line in table.splitlines() if line.split()[:1] in (["final"], ["d"]) or "a-rather" in line]
    assert len(rows) >= 3 and all(line.count("0.") >= 5 for line in rows[-3:]), table  # a label and its numbers
    check(["scan", final, "--aux", aux], [])
    check(["sweep", final, "--init", init, "--aux", aux, "--points", "3"], [])


def test_demo_fits_80_columns(narrow, model, tmp_path):
    run, aux, test = model
    samples = tmp_path / "samples"
    (samples / "tiny-cba").mkdir(parents=True)
    for name in ("init.safetensors", "final.safetensors"):
        shutil.copy(run / name, samples / "tiny-cba" / name)
    shutil.copytree(aux, samples / "tiny-cba" / "aux")
    shutil.copy(test, samples / "fmnist-test-2000.npz")
    check(["demo", "--samples-dir", samples, "--sample", "tiny-cba", "--out", tmp_path / "demo", "--test-subset"],
          ["FLAIN --preset paper", "FLAIN (default rule)"])
