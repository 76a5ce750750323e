"""A catalogue of bad inputs to `defend` and `scan`: each gets one `Error:` line and exit 1 (or a
warning and a result), nothing is written, nothing hangs. Extend it with every new option or input."""

import json
import shutil

import pytest
import torch

from flain_cli.checkpoint import load_checkpoint, save_checkpoint

from .conftest import invoke


def spoiled(run, tmp_path, which: str, tensor: str, value: float):
    """A copy of the run whose checkpoint ``which`` has ``value`` written into one entry of ``tensor``."""
    folder = tmp_path / "spoiled"
    folder.mkdir(exist_ok=True)
    for name in ("init.safetensors", "final.safetensors"):
        shutil.copy(run / name, folder / name)
    ckpt = load_checkpoint(folder / which)
    tensors = dict(ckpt.tensors)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[3] = value
    save_checkpoint(folder / which, tensors, ckpt.meta)
    return folder


def defend(folder, aux, out, *options):
    return invoke("defend", folder / "final.safetensors", "--init", folder / "init.safetensors", "--aux", aux,
                  "--out", out, *options)


def one_error_line(res, start: str) -> None:
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), res.stderr


@pytest.mark.parametrize(("which", "tensor", "value", "start"), [
    ("final.safetensors", "fc1.weight", float("nan"), "Error: MODEL "),
    ("final.safetensors", "conv1.weight", float("inf"), "Error: MODEL "),
    ("init.safetensors", "fc1.weight", float("nan"), "Error: --init "),
])
def test_non_finite_weights_are_refused(tiny_run, aux_dir, tmp_path, which, tensor, value, start):
    run, _ = tiny_run
    folder = spoiled(run, tmp_path, which, tensor, value)
    out = tmp_path / "o.safetensors"
    res = defend(folder, aux_dir, out, "--preset", "paper")
    one_error_line(res, start)
    assert "holds NaN or Inf in " + tensor in res.stderr and not out.exists()
    if which == "final.safetensors":
        one_error_line(invoke("scan", folder / "final.safetensors", "--aux", aux_dir), "Error: MODEL ")


@pytest.mark.parametrize(("options", "start"), [
    (["--step", "1e-300"], "Error: --step 1e-300 would take"),  # used to count down from k ~ 1e297 forever
    (["--step", "1e300"], "Error: --step 1e+300 selects all 3136 inputs at the first threshold"),
    (["--step", "nan"], "Error: --step must be a finite number, got nan"),
    (["--rho", "-0.1"], "Error: --rho must be in [0, 1], got -0.1"),
])
def test_search_settings_out_of_range(tiny_run, aux_dir, tmp_path, options, start):
    run, _ = tiny_run
    out = tmp_path / "o.safetensors"
    one_error_line(defend(run, aux_dir, out, *options), start)
    assert not out.exists()


def test_an_aux_set_of_one_class_is_refused_and_missing_classes_warned(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    one = tmp_path / "one"
    shutil.copytree(aux_dir / "3", one / "3")
    out = tmp_path / "o.safetensors"
    one_error_line(defend(run, one, out), "Error: aux set ")
    assert "class 3 only" in invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors",
                                    "--aux", one, "--out", out).stderr and not out.exists()
    some = tmp_path / "some"
    for label in ("0", "1", "2", "4", "5", "6", "7", "8", "9"):
        shutil.copytree(aux_dir / label, some / label)
    res = defend(run, some, out, "--preset", "paper", "--rho", "0.05", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert any("no images of class 3" in w for w in report["warnings"])
    assert "warning: the aux set has no images of class 3" in res.stderr
    assert load_checkpoint(out).meta["defense"]["warnings"] == report["warnings"]


def test_a_clean_run_has_no_warnings(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    res = defend(run, aux_dir, tmp_path / "o.safetensors", "--preset", "paper", "--rho", "0.05", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["warnings"] == [] and "warning" not in res.stderr


def test_the_search_functions_refuse_non_finite_activations():
    from flain_cli.defense import search_fast
    from flain_cli.errors import ConfigError
    w, w0 = torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="NaN or Inf"):
        search_fast(w, w0, torch.tensor([0.0, float("nan"), 1.0]), lambda weight, changed=None: 1.0)


def test_the_repair_on_a_large_aux_set_is_warned_about(tiny_run, tmp_path):
    from .conftest import write_aux_folder
    run, _ = tiny_run
    big = write_aux_folder(tmp_path / "big", per_class=51)
    res = defend(run, big, tmp_path / "o.safetensors", "--rho", "0.05", "--repair-steps", "5", "--json")
    assert res.exit_code == 0, res.output
    assert any("brought the backdoor back" in w for w in json.loads(res.stdout)["warnings"])
    paper = defend(run, big, tmp_path / "p.safetensors", "--rho", "0.05", "--preset", "paper", "--json")
    assert not any("repair" in w for w in json.loads(paper.stdout)["warnings"])
