"""Checkpoints written by other tools: torch.save state dicts, Flower .npz lists, prefixes, extra
tensors, other dtypes. The same weights in any of these forms must defend to the same result as
the flain-cli safetensors file they came from."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flain_cli.checkpoint import load_checkpoint
from flain_cli.formats import sniff
from flain_cli.models import build_model

from .conftest import invoke

FOREIGN = ("--arch", "cnn-mnist", "--dataset", "fmnist")  # what a file without metadata needs


def convert(run, tmp_path, kind: str):
    """(final, init) of the tiny run rewritten as another tool would have saved them."""
    out = []
    for name in ("final", "init"):
        tensors = load_checkpoint(run / f"{name}.safetensors").tensors
        path = tmp_path / f"{name}-{kind}"
        if kind == "pt":  # DataParallel prefix, a training-loop wrapper and a step counter
            wrapped = {f"module.{k}": v for k, v in tensors.items()} | {"global_step": torch.tensor(7)}
            path = path.with_suffix(".pt")
            torch.save({"epoch": 3, "state_dict": wrapped}, path)
        elif kind == "npz":  # Flower: the state_dict's values, in the model's order
            path = path.with_suffix(".npz")
            np.savez(path, *[tensors[k].numpy() for k in build_model("cnn-mnist", 10).state_dict()])
        else:  # safetensors without metadata, in another dtype
            path = path.with_suffix(".safetensors")
            save_file({k: v.to(getattr(torch, kind)) for k, v in tensors.items()}, path)
        out.append(path)
    return out


def defend_json(final, init, aux, out, *extra):
    res = invoke("defend", final, "--init", init, "--aux", aux, "--preset", "paper", "--rho", "0.05",
                 "--out", out, "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


def test_sniffing_goes_by_content_not_by_name(tiny_run, tmp_path):
    run, _ = tiny_run
    pt, _ = convert(run, tmp_path, "pt")
    npz, _ = convert(run, tmp_path, "npz")
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(pt.read_bytes())
    assert [sniff(p) for p in (run / "final.safetensors", pt, npz, disguised)] == ["safetensors", "torch", "npz",
                                                                                 "torch"]


@pytest.mark.parametrize("kind", ["pt", "npz"])
def test_torch_and_flower_checkpoints_defend_exactly_like_the_original(tiny_run, aux_dir, tmp_path, kind):
    run, _ = tiny_run
    final, init = convert(run, tmp_path, kind)
    reference, _ = defend_json(run / "final.safetensors", run / "init.safetensors", aux_dir, tmp_path / "ref.st")
    extra = ("--no-strict",) if kind == "pt" else ()
    report, stderr = defend_json(final, init, aux_dir, tmp_path / "d.safetensors", *FOREIGN, *extra)
    ours = load_checkpoint(tmp_path / "ref.st").tensors
    theirs = load_checkpoint(tmp_path / "d.safetensors").tensors
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert report["flipped"] == reference["flipped"]
    if kind == "pt":
        assert "stripped the prefix 'module.'" in stderr and "ignored 1 (global_step)" in stderr
        assert "read as a torch.save state dict (from its 'state_dict' entry" in stderr
    else:
        assert "mapped 8 arrays onto the architecture's tensors by position" in stderr


def test_sweep_takes_arch_for_a_file_without_metadata(tiny_run, aux_dir, tmp_path):
    run, data = tiny_run
    final, init = convert(run, tmp_path, "pt")
    res = invoke("sweep", final, "--init", init, "--aux", aux_dir, *FOREIGN, "--no-strict", "--data-dir", data,
                 "--points", "2", "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["points"]) == 3  # the model unchanged, then two thresholds


def test_extra_tensors_need_no_strict_and_mismatches_are_counted(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    final, _ = convert(run, tmp_path, "pt")
    res = invoke("scan", final, "--aux", aux_dir, *FOREIGN)
    assert res.exit_code == 1 and "unexpected 1 (global_step); extra tensors alone are allowed with --no-strict" \
        in res.stderr
    res = invoke("scan", final, "--aux", aux_dir, "--arch", "cnn-fmnist", "--dataset", "fmnist", "--no-strict")
    assert res.exit_code == 1 and "missing 4 (fc3.weight" in res.stderr and "wrong shape 4 (fc1.weight" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_other_dtypes_are_defended_and_written_back_in_their_dtype(tiny_run, aux_dir, tmp_path, dtype):
    run, _ = tiny_run
    final, init = convert(run, tmp_path, dtype)
    report, stderr = defend_json(final, init, aux_dir, tmp_path / "d.safetensors", *FOREIGN)
    cleaned = load_checkpoint(tmp_path / "d.safetensors")
    assert {t.dtype for t in cleaned.tensors.values()} == {getattr(torch, dtype)}
    assert f"its weights are {dtype}; computed in float32" in stderr and f"written as {dtype}" in stderr
    assert cleaned.meta["source"] == {"format": "safetensors", "dtype": dtype, "notes": report["notes"]}
    assert invoke("eval", tmp_path / "d.safetensors").exit_code == 0  # the cleaned file carries our metadata


def test_what_cannot_be_read_safely_gets_one_error_line(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)  # a pickled module: loading it would run code
    res = invoke("eval", whole, *FOREIGN)
    assert res.exit_code == 1 and "needs more than weights to load" in res.stderr
    assert "torch.save(model.state_dict(), path)" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    tensors = load_checkpoint(run / "final.safetensors").tensors
    quantized = tmp_path / "q.safetensors"
    save_file({k: v.to(torch.int8) for k, v in tensors.items()}, quantized)
    res = invoke("eval", quantized, *FOREIGN)
    assert res.exit_code == 1 and "as int8, a quantized or integer type" in res.stderr
    short = tmp_path / "short.npz"
    np.savez(short, *[v.numpy() for v in list(tensors.values())[:-1]])
    res = invoke("eval", short, *FOREIGN)
    assert res.exit_code == 1 and "holds 7 arrays but the architecture has 8 tensors" in res.stderr


def test_inspect_names_the_format_the_architecture_and_the_layers(tiny_run, tmp_path):
    run, _ = tiny_run
    pt, _ = convert(run, tmp_path, "pt")
    res = invoke("inspect", pt, "--json")
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert found["format"] == "torch" and found["meta"] == {} and len(found["tensors"]) == 9
    match = {m["arch"]: m for m in found["matches"]}["cnn-mnist"]
    assert match["num_classes"] == 10 and "stripped the prefix 'module.' from the tensor names" in match["notes"]
    assert [(x["name"], x["in_features"], x["defended"]) for x in match["linear_layers"]] == [
        ("fc1", 3136, True), ("fc2", 128, False)]
    mlp = tmp_path / "mlp.safetensors"
    save_file({"0.weight": torch.zeros(64, 784), "0.bias": torch.zeros(64), "2.weight": torch.zeros(10, 64),
               "2.bias": torch.zeros(10)}, mlp)
    found = json.loads(invoke("inspect", mlp, "--json").stdout)
    assert found["matches"] == [] and found["linear_like"] == ["0.weight", "2.weight"]
    table = invoke("inspect", run / "final.safetensors")
    words = " ".join(table.stdout.split())  # the line wraps at the terminal's width
    assert table.exit_code == 0 and "cnn-mnist" in words and "flain-cli metadata (role final)" in words


def test_debug_prints_the_traceback_of_the_error(tmp_path):
    res = invoke("--debug", "eval", tmp_path / "missing.safetensors")
    assert res.exit_code == 1 and "Traceback (most recent call last)" in res.stderr
    assert "NoneType: None" not in res.stderr and res.stderr.strip().splitlines()[-1].startswith("Error: checkpoint")


def test_normalization_comes_from_the_options_then_the_metadata_then_the_dataset(tiny_run, tmp_path):
    from flain_cli.checkpoint import save_checkpoint
    run, data = tiny_run
    ckpt = load_checkpoint(run / "final.safetensors")
    recorded = tmp_path / "half.safetensors"
    save_checkpoint(recorded, ckpt.tensors, ckpt.meta | {"normalization": {"mean": [0.9], "std": [0.05], "scale": 255}})

    def scores(*args):
        res = invoke("eval", *args, "--data-dir", data, "--json")
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        return report["acc"], report["asr"]
    standard = scores(run / "final.safetensors")
    assert scores(recorded) == scores(run / "final.safetensors", "--mean", "0.9", "--std", "0.05") != standard
    assert scores(recorded, "--mean", "0.286", "--std", "0.353") == standard  # the options win over the metadata
    res = invoke("eval", recorded, "--mean", "0.5")
    assert res.exit_code == 1 and res.stderr.startswith("Error: --mean and --std go together")
    res = invoke("eval", recorded, "--mean", "0.5", "--std", "0")
    assert res.exit_code == 1 and "a positive std" in res.stderr


def test_aux_folders_by_class_name_alias_and_resized_images_are_announced(tiny_run, tmp_path):
    from PIL import Image

    from .conftest import write_aux_folder
    run, _ = tiny_run
    names = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle_boot"]
    aux = write_aux_folder(tmp_path / "aux", per_class=3, names=names, size=32)  # 32x32: resized to 28x28
    res = invoke("scan", run / "final.safetensors", "--aux", aux, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_aux"] == 30
    assert "note: 30 of 30 aux images were resized to 28x28, the model's input size" in res.stderr
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux,
                 "--preset", "paper", "--rho", "0.05", "--out", tmp_path / "d.safetensors")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "d.safetensors").meta["defense"]["aux"]["resized"] == 30
    Image.new("L", (28, 28)).save(aux / "T-shirt_top" / "x.png")
    (aux / "T-shirt_top").rename(aux / "Tshirt")
    res = invoke("scan", run / "final.safetensors", "--aux", aux)
    assert res.exit_code == 1 and "known names: T-shirt_top, Trouser" in res.stderr


def test_a_suspected_trigger_from_a_png_measures_the_same_asr_as_the_built_in(tiny_run, tmp_path):
    from PIL import Image

    from flain_cli.triggers import make_trigger
    run, data = tiny_run
    cba = make_trigger("cba", 28, 28)
    mask = cba.full.numpy()
    pixels = (mask * cba.value).astype(np.uint8)
    Image.fromarray(np.stack([pixels, (mask * 255).astype(np.uint8)], axis=-1), "LA").save(tmp_path / "t.png")
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")

    def asr(*args):
        res = invoke("eval", run / "final.safetensors", "--data-dir", data, "--json", *args)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["asr"], json.loads(res.stdout)["trigger"]
    built_in, _ = asr("--attack", "0:5", "--trigger", "cba")
    assert asr("--attack", "0:5", "--trigger-image", tmp_path / "t.png") == (built_in, str(tmp_path / "t.png"))
    assert asr("--attack", "0:5", "--trigger-image", tmp_path / "plain.png", "--trigger-mask",
               tmp_path / "mask.png")[0] == built_in
    Image.new("L", (32, 32)).save(tmp_path / "big.png")
    for args, message in ((["--trigger-image", tmp_path / "t.png"], "needs --attack SRC:TGT"),
                          (["--attack", "0:5", "--trigger-image", tmp_path / "plain.png"], "has no alpha channel"),
                          (["--attack", "0:5", "--trigger-image", tmp_path / "big.png"],
                           "is 32x32; the model takes 28x28")):
        res = invoke("eval", run / "final.safetensors", "--data-dir", data, *args)
        assert res.exit_code == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_class_names_from_a_file_name_the_aux_folders_of_a_foreign_label_set(tiny_run, tmp_path):
    from .conftest import write_aux_folder
    run, _ = tiny_run
    names = [f"kind {c}" for c in range(10)]
    aux = write_aux_folder(tmp_path / "aux", per_class=3, names=names)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    res = invoke("scan", run / "final.safetensors", "--aux", aux)
    assert res.exit_code == 1 and "neither a class index nor a class name" in res.stderr
    res = invoke("scan", run / "final.safetensors", "--aux", aux, "--class-names", tmp_path / "names.txt", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_aux"] == 30
    (tmp_path / "short.txt").write_text("a\nb\n")
    res = invoke("scan", run / "final.safetensors", "--aux", aux, "--class-names", tmp_path / "short.txt")
    assert res.exit_code == 1 and "--class-names gives 2 names (2 distinct) for a model of 10 classes" in res.stderr
    res = invoke("scan", run / "final.safetensors", "--aux", aux, "--class-names", tmp_path / "names.txt",
                 "--csv", tmp_path / "names.txt", "--force")
    assert res.exit_code == 1 and "is also the input --class-names" in res.stderr
    assert (tmp_path / "names.txt").read_text() == "\n".join(names) + "\n"
