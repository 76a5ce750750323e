"""A catalogue of bad inputs to `defend` and `scan`: each gets one `Error:` line and exit 1 (or a
warning and a result), nothing is written, nothing hangs. Extend it with every new option or input."""

import json
import shutil

import pytest
import torch

from flain_cli.checkpoint import load_checkpoint, save_checkpoint
from flain_cli.settings import PRESETS

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
    (["--stop", "kl", "--kl", "-1", "--kl-unit", "nats"], "Error: --kl must be in (0, 10], got -1.0"),
    (["--kl", "0.05"], "Error: --kl needs its unit, the default stop's budget being in shift units: add --kl-unit "
                       "nats (what --kl meant before) or --kl-unit shift"),
    (["--stop", "kl", "--rho", "0.02"], "Error: --rho is the accuracy stop's budget and has no effect with --stop kl"),
    (["--stop", "accuracy", "--kl", "0.1"],
     "Error: --kl is the kl stop's budget and has no effect with --stop accuracy"),
    (["--rho", "0.02", "--kl", "0.1"], "Error: --rho and --kl are the budgets of two different stops"),
    (["--stop", "accuracy", "--kl-unit", "shift"],
     "Error: --kl-unit is the kl stop's unit and has no effect with --stop accuracy"),
    (["--kl-unit", "shift", "--kl", "11"], "Error: --kl must be in (0, 10], got 11.0"),
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
        search_fast(w, w0, torch.tensor([0.0, float("nan"), 1.0]), lambda weight, changed=None: 1.0,
                    PRESETS["paper"])


def test_the_repair_on_a_large_aux_set_is_warned_about(tiny_run, tmp_path):
    from .conftest import write_aux_folder
    run, _ = tiny_run
    big = write_aux_folder(tmp_path / "big", per_class=51)
    res = defend(run, big, tmp_path / "o.safetensors", "--rho", "0.05", "--repair-steps", "5", "--json")
    assert res.exit_code == 0, res.output
    assert any("brought the backdoor back" in w for w in json.loads(res.stdout)["warnings"])
    paper = defend(run, big, tmp_path / "p.safetensors", "--rho", "0.05", "--preset", "paper", "--json")
    assert not any("repair" in w for w in json.loads(paper.stdout)["warnings"])


# ---- files: an output never replaces an input; clashes, claims, staging, names ---------------------------

def tree(path) -> dict:
    """Every file under ``path`` (or the file itself) with its bytes: to show nothing changed."""
    from pathlib import Path
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def export(data, out, *options):
    return invoke("aux", "export", "--dataset", "fmnist", "--data-dir", data, "--per-class", "2", "--out", out,
                  *options)


def refused(command, start: str, detail: str, *watched) -> None:
    """Run ``command`` (a thunk): one `Error:` line starting with ``start`` and holding ``detail``, and every
    file under ``watched`` byte for byte as it was just before it ran: no input touched, no output, no lock
    or temporary file left anywhere in those folders."""
    before = {}
    for root in watched:
        before |= tree(root)
    res = command()
    one_error_line(res, start)
    assert detail in res.stderr, res.stderr
    after = {}
    for root in watched:
        after |= tree(root)
    assert after == before, sorted(set(after) ^ set(before)) or "an input changed"


def test_outputs_that_are_inputs_or_clash_are_refused_and_inputs_stay(tiny_run, aux_dir, tmp_path, monkeypatch):
    run, data = tiny_run
    earlier = tmp_path / "earlier"
    assert export(data, earlier).exit_code == 0
    npz = tmp_path / "aux.npz"
    assert export(data, npz, "--format", "npz").exit_code == 0
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    model = (run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir)
    cases = [
        (lambda: export(data, data, "--force"), "Error: --out ", "is also the input --data-dir"),
        (lambda: export(data, earlier, "--exclude", earlier, "--force"), "Error: --out ",
         "is also the input --exclude"),
        (lambda: export(data, junk, "--force"), "Error: --out ", "did not write (it has no aux.json)"),
        (lambda: invoke("scan", run / "final.safetensors", "--aux", npz, "--csv", npz, "--force"), "Error: --csv ",
         "is also the input --aux"),
        (lambda: invoke("sweep", *model, "--test", npz, "--csv", npz, "--force"), "Error: --csv ",
         "is also the input --test"),
        (lambda: invoke("train", "--data-dir", data, "--rounds", "1", "--out", tmp_path / "t", "--log",
                        data / "log.jsonl"), "Error: --log ", "lies inside the input folder --data-dir"),
        (lambda: invoke("defend", *model, "--out", tmp_path / "f.csv", "--trace", tmp_path / "f.csv"),
         "Error: --out and --trace are the same path", ""),
        (lambda: invoke("defend", *model, "--out", aux_dir / "clean.safetensors"), "Error: --out ",
         "lies inside the input folder --aux"),
        (lambda: invoke("defend", *model, "--out", run, "--force"), "Error: --out ", "contains the input MODEL"),
    ]
    for command, start, detail in cases:
        refused(command, start, detail, tmp_path, data, aux_dir, run)
    monkeypatch.chdir(tmp_path)
    refused(lambda: export(data, ".", "--force"), "Error: --out . ", "", tmp_path, data)


def test_the_catalogue_sees_a_refused_command_that_deletes_an_input(tmp_path):
    """The check above is not a tautology: a command that deletes an input and then fails is caught."""
    victim = tmp_path / "input.txt"
    victim.write_text("mine")

    class Result:
        exit_code, stderr = 1, "Error: refused\n"

    def destructive():
        victim.unlink()
        return Result()

    with pytest.raises(AssertionError):
        refused(destructive, "Error: ", "refused", tmp_path)
    stray = tmp_path / "kept.txt"
    stray.write_text("x")

    def leaves_debris():
        (tmp_path / ".kept.txt.lock").write_text("")
        return Result()

    with pytest.raises(AssertionError):
        refused(leaves_debris, "Error: ", "refused", tmp_path)


def test_an_experiment_name_that_leaves_its_folder_is_refused(fmnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("../../escaped", "a/b", "..", ".hidden", ""):
        grid = tmp_path / "grid.toml"
        grid.write_text(f'name = "{name}"\n[train]\nrounds = 1\n[grid]\nseed = [1]\n[defense]\nmethods = ["none"]\n')
        for extra in ((), ("--dry-run",)):
            refused(lambda: invoke("experiment", grid, "--data-dir", fmnist_dir, *extra), "Error: ",
                    "must be one folder name", tmp_path.parent)


def test_checkpoints_misnamed_safetensors_are_read_by_content(tiny_run, aux_dir, tmp_path):
    """A torch.save zip as MODEL and a raw pickle stream as --init, both named .safetensors: the first is read as
    what it is, the second refused in one line (torch.load would have trusted the name)."""
    import pickle
    run, _ = tiny_run
    final, init = load_checkpoint(run / "final.safetensors"), load_checkpoint(run / "init.safetensors")
    model = tmp_path / "torchsave.safetensors"
    torch.save(dict(final.tensors), model)
    raw = tmp_path / "rawpickle.safetensors"
    raw.write_bytes(pickle.dumps({k: v.numpy() for k, v in init.tensors.items()}, protocol=4))
    out = tmp_path / "o.safetensors"
    refused(lambda: invoke("defend", model, "--init", raw, "--aux", aux_dir, "--arch", "cnn-mnist", "--dataset",
                           "fmnist", "--out", out), "Error: ", "flain-cli never unpickles code", tmp_path)
    torchsaved_init = tmp_path / "init.safetensors"
    torch.save(dict(init.tensors), torchsaved_init)
    res = invoke("defend", model, "--init", torchsaved_init, "--aux", aux_dir, "--arch", "cnn-mnist", "--dataset",
                 "fmnist", "--preset", "paper", "--rho", "0.05", "--out", out)
    assert res.exit_code == 0, res.output
    assert "read as a torch.save state dict" in res.stderr


def test_two_writers_of_one_output_cannot_both_succeed(tmp_path):
    from flain_cli.errors import ConfigError
    from flain_cli.files import Busy, FilePlan
    out = tmp_path / "o.txt"
    with FilePlan({}, {"--out": out}).writing() as stage:
        with pytest.raises(Busy, match="being written by another process"):
            with FilePlan({}, {"--out": out}).writing():
                pass
        stage["--out"].write_text("first")
    assert out.read_text() == "first"
    with pytest.raises(ConfigError, match="already exists; pass force"):
        with FilePlan({}, {"--out": out}).writing():
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.txt"]  # no lock, no temp file left


def test_a_failure_writes_none_of_the_outputs(tiny_run, aux_dir, tmp_path):
    from flain_cli.files import FilePlan
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(RuntimeError):
        with FilePlan({}, {"--a": a, "--b": b}).writing() as stage:
            stage["--a"].write_text("a")
            raise RuntimeError("the second output failed")
    assert list(tmp_path.iterdir()) == []
    run, _ = tiny_run
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "o.safetensors"
    res = defend(run, aux_dir, out, "--trace", blocker / "trace.csv")  # --trace cannot be written
    one_error_line(res, "Error: --trace ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    res = defend(run, tmp_path / "no-aux", tmp_path / "new" / "deeper" / "o.safetensors")  # fails mid-command
    assert res.exit_code == 1 and not (tmp_path / "new").exists()  # folders made for a failed output go too
    res = defend(run, aux_dir, tmp_path / "new" / "deeper" / "o.safetensors", "--preset", "paper", "--rho", "0.05")
    assert res.exit_code == 0 and (tmp_path / "new" / "deeper" / "o.safetensors").is_file()


def test_long_names_and_brackets_in_paths_are_written_and_printed_as_given(tiny_run, aux_dir, tmp_path, monkeypatch):
    run, _ = tiny_run
    monkeypatch.chdir(tmp_path)  # short relative names: the table titles below fit on one line
    long = tmp_path / ("m" * 238 + ".safetensors")  # 250 bytes: the temp name must still fit
    res = defend(run, aux_dir, long, "--preset", "paper", "--rho", "0.05", "--json")
    assert res.exit_code == 0, res.output
    assert long.is_file() and json.loads(res.stdout)["out"] == str(long)
    (tmp_path / "runs[").mkdir()
    for name in ("runs[/x].csv", "d[v2].csv", "[bold]b[/bold].csv"):
        model = name.replace("/", "_").replace(".csv", ".safetensors")
        shutil.copy(run / "final.safetensors", model)
        res = invoke("scan", model, "--aux", aux_dir, "--csv", name)
        assert res.exit_code == 0, res.output
        assert (tmp_path / name).is_file() and f"flain scan {model}:" in res.stdout
    res = invoke("aux", "export", "--dataset", "fmnist", "--data-dir", tiny_run[1], "--per-class", "1",
                 "--out", "a[v2]")
    assert res.exit_code == 0 and "to a[v2]" in res.stdout


# ---- numbers: every option has a range, checked before any work ----------------------------------------

@pytest.mark.parametrize(("args", "code", "start"), [
    (["train", "--server-lr", "nan"], 1, "Error: --server-lr must be a finite number, got nan"),
    (["train", "--lr", "inf"], 1, "Error: --lr must be a finite number, got inf"),
    (["train", "--train-samples", "0"], 1, "Error: --train-samples must be at least one per class (10), got 0"),
    (["train", "--alpha", "0"], 1, "Error: --alpha must be > 0, got 0.0"),
    (["train", "--device", "cpu:5"], 1, "Error: --device 'cpu:5': there is one CPU device; use cpu"),
    (["train", "--seed", "-1"], 2, "Usage: "),
])
def test_train_options_out_of_range(fmnist_dir, tmp_path, args, code, start):
    res = invoke(*args, "--data-dir", fmnist_dir, "--rounds", "1", "--out", tmp_path / "t")
    assert res.exit_code == code and res.stderr.startswith(start), res.stderr
    assert not (tmp_path / "t" / "final.safetensors").exists()


def test_the_flower_engine_and_ray_without_the_extra_are_one_clear_error(fmnist_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    res = invoke("train", "--engine", "flower", "--data-dir", fmnist_dir, "--rounds", "1", "--out", tmp_path / "t")
    one_error_line(res, "Error: --engine flower needs Flower: bash scripts/setup.sh --flower")
    assert not (tmp_path / "t" / "final.safetensors").exists()
    assert invoke("train", "--engine", "ray", "--out", tmp_path / "t").exit_code == 2  # not a choice: usage error
    grid = tmp_path / "g.toml"
    grid.write_text('[train]\nrounds = 1\n[grid]\nattack = ["0:5"]\n[defense]\nmethods = ["none"]\n')
    missing = ("flwr", "ray")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    res = invoke("experiment", grid, "--out", tmp_path / "e", "--data-dir", fmnist_dir, "--ray", "local")
    one_error_line(res, "Error: --ray needs Ray: bash scripts/setup.sh --flower")


@pytest.mark.parametrize(("args", "code", "start"), [
    (["scan", "{final}", "--aux", "{aux}", "--lowest", "-5"], 2, "Usage: "),
    (["sweep", "{final}", "--init", "{init}", "--aux", "{aux}", "--step", "nan"], 1,
     "Error: --step must be a finite number, got nan"),
    (["defend", "{final}", "--init", "{init}", "--aux", "{aux}", "--method", "../x"], 1, "Error: "),
    (["defend", "{final}", "--init", "{init}", "--aux", "{aux}", "--holdout", "1"], 1,
     "Error: --holdout must be in [0, 1), got 1.0"),
    (["defend", "{final}", "--init", "{init}", "--aux", "{aux}", "--shifts", "11"], 1,
     "Error: --shifts must be a whole number of pixels from 0 to 10, got 11"),
    (["defend", "{final}", "--init", "{init}", "--aux", "{aux}", "--shifts", "-1"], 1,
     "Error: --shifts must be a whole number of pixels from 0 to 10, got -1"),
    (["defend", "{final}", "--init", "{init}", "--aux", "{aux}", "--seed", "-1"], 2, "Usage: "),
    (["plot", "activations", "{csv}", "--out", "{png}", "--bins", "0"], 2, "Usage: "),
])
def test_other_options_out_of_range(tiny_run, aux_dir, tmp_path, args, code, start):
    run, _ = tiny_run
    fill = {"final": run / "final.safetensors", "init": run / "init.safetensors", "aux": aux_dir,
            "csv": tmp_path / "m.csv", "png": tmp_path / "m.png"}
    res = invoke(*[a.format(**{k: str(v) for k, v in fill.items()}) for a in args])
    assert res.exit_code == code and res.stderr.startswith(start), res.stderr
    if code == 1:
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.png").exists() and not (run / "final.flain.safetensors").exists()


# ---- experiment grids: refused before anything trains ---------------------------------------------------

GRID = '[train]\nrounds = 1\nclients = 2\n[grid]\nseed = [1]\n'


@pytest.mark.parametrize(("text", "message"), [
    (GRID + '[defence]\nrho = 0.05\n', "unknown key or table defence"),
    (GRID.replace("seed = [1]", "seed = " + str(list(range(10_000)))), "the grid has 10,000 points, more than 100"),
    (GRID.replace("rounds = 1", 'rounds = "ten"'), "grid.toml: rounds must be a whole number, got 'ten'"),
    (GRID.replace("rounds = 1", 'rounds = 1\nprecision = "auto"'), "precision auto would train differently"),
    (GRID.replace("rounds = 1", 'rounds = 1\nprecision = "fp8"'), "grid.toml: precision must be one of fp32"),
    (GRID + '[defense]\nrho = 2.0\n', "[defense] rho must be in [0, 1], got 2.0"),
    (GRID + '[defense]\nstep = "big"\n', "[defense] step must be a finite number, got 'big'"),
    (GRID + '[defense]\naux_per_class = 0\n', "[defense] aux_per_class must be a whole number of at least 1"),
    ("defense = 3\n", "defense must be a table"),
])
def test_bad_experiment_grids_fail_before_training(fmnist_dir, tmp_path, text, message):
    config = tmp_path / "grid.toml"
    config.write_text(text)
    res = invoke("experiment", config, "--data-dir", fmnist_dir, "--out", tmp_path / "out")
    one_error_line(res, "Error: ")
    assert message in res.stderr
    assert not (tmp_path / "out").exists()


def test_binary_and_endless_files_are_refused(tiny_run, tmp_path):
    binary = tmp_path / "grid.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    one_error_line(invoke("experiment", binary), "Error: experiment file ")
    assert "is not UTF-8 text" in invoke("experiment", binary).stderr
    one_error_line(invoke("experiment", "/dev/zero"), "Error: experiment file /dev/zero is not a regular file")
    one_error_line(invoke("plot", "training", "/dev/zero", "--out", tmp_path / "p.png"),
                   "Error: training log /dev/zero is not a regular file")
    bad_csv = tmp_path / "t.csv"
    bad_csv.write_bytes(b"lambda,selected\n\xff\xff\n")
    one_error_line(invoke("plot", "trace", bad_csv, "--out", tmp_path / "p.png"), "Error: CSV file ")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(("row", "detail"), [
    ('{"round": "1", "acc": 0.8, "asr": 0.9}', "round is '1' in the row of round '1', not a number"),
    ('{"round": 1, "acc": "0.8", "asr": 0.9}', "acc is '0.8' in the row of round 1, not a number"),
    ('{"round": 1, "acc": 0.8, "asr": "high"}', "asr is 'high' in the row of round 1, not a number"),
    ('{"round": 1, "acc": true}', "acc is True in the row of round 1, not a number"),
])
def test_a_training_log_with_values_that_are_not_numbers_is_refused(tmp_path, row, detail):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text('{"round": 0, "acc": 0.1, "asr": 0.1}\n' + row + "\n")
    refused(lambda: invoke("plot", "training", log, "--out", tmp_path / "p.png"), "Error: ", detail, tmp_path)


# ---- aux images and checkpoints that are not what they claim --------------------------------------------

def png_declaring(path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb costs nothing to make)."""
    import io
    import struct
    import zlib

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    body = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(body))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("spoil", ["bomb", "warned", "large", "empty", "fifo", "superscript"])
def test_bad_aux_folders_get_one_error_line(tiny_run, aux_dir, tmp_path, spoil):
    import os
    run, _ = tiny_run
    aux = tmp_path / "aux"
    shutil.copytree(aux_dir, aux)
    if spoil == "bomb":  # Pillow's own guard
        png_declaring(aux / "3" / "x.png", 20000, 20000)
    elif spoil == "warned":  # over Pillow's warning size, under its guard: its warning must not be printed
        png_declaring(aux / "3" / "x.png", 12000, 12000)
    elif spoil == "large":  # under Pillow's guard, over what an aux image can be
        png_declaring(aux / "3" / "x.png", 5000, 5000)
    elif spoil == "empty":
        png_declaring(aux / "3" / "x.png", 0, 0)
    elif spoil == "fifo":
        os.mkfifo(aux / "3" / "x.png")  # opening it would block forever
    else:
        shutil.copytree(aux_dir / "3", aux / "²")
    import warnings
    with warnings.catch_warnings(record=True) as warned:  # a warning would print above the error line
        warnings.simplefilter("always")
        res = invoke("scan", run / "final.safetensors", "--aux", aux)
    assert not [w for w in warned if "decompression bomb" in str(w.message)]
    one_error_line(res, "Error: ")
    assert {"bomb": "decompression bomb", "warned": "declares 12000x12000 pixels",
            "large": "declares 5000x5000 pixels", "empty": "x.png",
            "fifo": "not a regular file",
            "superscript": "neither a class index nor a class name"}[spoil] in res.stderr


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_classes", 10**9, "num_classes 1000000000 is not from 2 to 100,000"),
    ("parents", "x", "metadata field 'parents' must be an object"),
    ("dataset", "cifar10", "dataset cifar10 has (3, 32, 32) images but architecture cnn-mnist takes (1, 28, 28)"),
])
def test_checkpoint_metadata_out_of_kind_is_refused(tiny_run, aux_dir, tmp_path, field, value, message):
    run, _ = tiny_run
    ckpt = load_checkpoint(run / "final.safetensors")
    edited = tmp_path / "edited.safetensors"
    save_checkpoint(edited, ckpt.tensors, ckpt.meta | {field: value})
    for res in (invoke("scan", edited, "--aux", aux_dir), invoke("eval", edited)):
        one_error_line(res, "Error: ")
        assert message in res.stderr


# ---- signals: exit 130/143, one line, nothing left behind -------------------------------------------------

def flain_process(*args, cwd):
    import os
    import subprocess
    import sys
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flain_cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_mid_defend_exits_143_and_leaves_nothing(tiny_run, aux_dir, tmp_path):
    import signal
    import time
    run, _ = tiny_run
    out = tmp_path / "out"
    out.mkdir()
    proc = flain_process("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                         "--out", out / "o.safetensors", "--trace", out / "t.csv", "--repair-steps", "100000",
                         cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".lock") for p in out.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the outputs are claimed: the command is at work
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["Interrupted (SIGTERM); nothing was written."]
    assert list(out.iterdir()) == []


def _signal_inside_set_name():
    """Deliver SIGTERM the way torch's lazy imports met it in CI: while a class is being created, inside a
    descriptor's __set_name__ (Python 3.11 wraps what the handler raises there in a RuntimeError)."""
    import signal

    from flain_cli.signals import raise_on_signal

    class Field:
        def __set_name__(self, owner, name):
            raise_on_signal(signal.SIGTERM, None)

    class Frame:  # noqa: F841 - created for its __set_name__ call
        strategy = Field()


def test_a_wrapped_interrupt_still_exits_143_with_one_line(monkeypatch, capsys):
    import typer

    from flain_cli import signals
    from flain_cli.cli.common import handle_errors
    monkeypatch.setattr(signals, "_received", None)
    with pytest.raises(typer.Exit) as exit_info:
        handle_errors(_signal_inside_set_name)()
    assert exit_info.value.exit_code == 143
    assert capsys.readouterr().err.strip().splitlines() == ["Interrupted (SIGTERM); nothing was written."]


def test_the_entry_point_reports_an_interrupt_wrapped_during_the_imports(monkeypatch, capsys):
    import signal
    import sys
    import types

    from flain_cli import signals
    from flain_cli.cli import launch
    monkeypatch.setattr(signals, "_received", None)
    app = types.ModuleType("flain_cli.cli.app")
    app.__getattr__ = lambda name: _signal_inside_set_name()  # `from .app import app` meets the signal
    monkeypatch.setitem(sys.modules, "flain_cli.cli.app", app)
    monkeypatch.setattr(sys, "argv", ["flain", "eval", "x.safetensors"])
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_info:
            launch.main()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == "Interrupted (SIGTERM); nothing was written.\n"


def test_interrupt_behind_finds_the_signal_through_wrappers_and_only_then(monkeypatch):
    import signal

    from flain_cli import signals
    monkeypatch.setattr(signals, "_received", None)
    assert signals.interrupt_behind(RuntimeError("a bug")) is None
    inner = signals.Interrupted(signal.SIGINT)
    try:
        try:
            raise inner
        except KeyboardInterrupt:
            raise ValueError("a library's own error") from None  # the cause hidden, the context kept
    except ValueError as outer:
        assert signals.interrupt_behind(outer) is inner
    monkeypatch.setattr(signals, "_received", signal.SIGTERM)  # swallowed whole: only the handler saw it
    assert signals.interrupt_behind(RuntimeError("after the signal")).exit_code == 143


def test_sigint_during_start_up_exits_130_without_a_traceback(tmp_path):
    import signal
    import time
    from pathlib import Path
    proc = flain_process("eval", tmp_path / "none.safetensors", cwd=tmp_path)
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        proc.kill()
        pytest.skip("needs /proc to see when the handlers are in place")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until flain's handlers are in (it catches SIGTERM, bit 15)
        caught = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # now inside the imports (torch takes far longer than the polling)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["Interrupted (SIGINT); nothing was written."]


def test_exported_folders_follow_the_umask_and_fifos_are_not_read(tiny_run, tmp_path):
    import os
    _, data = tiny_run
    old = os.umask(0o022)
    try:
        assert export(data, tmp_path / "aux").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "aux").stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 used to stay
    os.mkfifo(tmp_path / "x.npz")
    one_error_line(export(data, tmp_path / "y", "--exclude", tmp_path / "x.npz"),
                   "Error: --exclude ")


def test_version_is_answered_without_importing_torch(tmp_path):
    import subprocess
    import sys
    code = ("import sys; sys.argv = ['flain', '--version']; from flain_cli.cli.launch import main; main(); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    from flain_cli import __version__
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == [f"flain-cli {__version__}", "False"], res.stdout


def test_a_training_that_fails_before_its_first_round_leaves_no_folder(tmp_path):
    res = invoke("train", "--data-dir", tmp_path / "nowhere", "--rounds", "1", "--out", tmp_path / "runs" / "t")
    one_error_line(res, "Error: ")
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_a_dataset_is_measured_only_with_one(tmp_path):
    from flain_cli.checkpoint import model_meta
    from flain_cli.models import build_model

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model("cnn-mnist", 10).state_dict(),
                    model_meta("cnn-mnist", 10, None).to_json() | {"role": "final"})
    one_error_line(invoke("eval", path), f"Error: {path} does not say which dataset it was trained on; "
                                         "pass --dataset (fmnist, mnist, emnist, cifar10)")


def test_a_signal_while_the_outputs_are_renamed_puts_back_what_was_there(tmp_path, monkeypatch):
    """SIGTERM between two renames: the first output gets its old bytes back, the second never appears, and no
    temporary file, backup or lock is left; the interrupt is raised once everything is undone."""
    import os
    import signal

    from flain_cli import files, signals
    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(signals, "_written", False)
    old, new = tmp_path / "a.txt", tmp_path / "b.txt"
    old.write_text("mine")
    real = os.replace
    calls = []

    def replace_then_signal(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the first output is in place: the signal lands before the second
            signals.raise_on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(files.os, "replace", replace_then_signal)
    with pytest.raises(signals.Interrupted) as info:
        with files.FilePlan({}, {"--a": old, "--b": new}, force=True).writing() as stage:
            stage["--a"].write_text("new a")
            stage["--b"].write_text("new b")
    monkeypatch.setattr(files.os, "replace", real)
    assert info.value.exit_code == 143 and calls[0] == old  # the signal did come after a rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and old.read_text() == "mine"
    assert not signals.outputs_written()


def test_an_interrupt_after_the_outputs_are_in_place_says_so(tmp_path, monkeypatch, capsys):
    import signal

    import typer

    from flain_cli import signals
    from flain_cli.cli.common import handle_errors
    from flain_cli.files import FilePlan
    monkeypatch.setattr(signals, "_received", None)

    def command():
        with FilePlan({}, {"--out": tmp_path / "o.txt"}).writing() as stage:
            stage["--out"].write_text("done")
        signals.raise_on_signal(signal.SIGINT, None)  # while the report is printed

    with pytest.raises(typer.Exit) as exit_info:
        handle_errors(command)()
    assert exit_info.value.exit_code == 130 and (tmp_path / "o.txt").read_text() == "done"
    assert capsys.readouterr().err.strip() == "Interrupted (SIGINT); its outputs had been written in full."
