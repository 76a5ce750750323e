"""`--model-def FILE.py:NAME`: architectures that are not built in, cut at their Linear layer by
torch.fx; an MLP and a small ResNet trained here on a few hundred images go through scan, defend
and eval."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flain_cli.checkpoint import load_checkpoint
from flain_cli.datasets import DATASETS

from .conftest import invoke, write_idx

DEFS = Path(__file__).parent / "data" / "model_defs.py"


def brightness_images(n: int, seed: int):
    """Images whose class is their mean brightness: learnable after a global average pool."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (labels[:, None, None] * 24 + rng.integers(0, 16, size=(n, 28, 28))).astype(np.uint8)
    return images, labels


@pytest.fixture
def bright(tmp_path):
    """An aux folder and Fashion-MNIST-shaped IDX files of brightness images."""
    from PIL import Image
    images, labels = brightness_images(60, 5)
    for i, (image, label) in enumerate(zip(images, labels)):
        (tmp_path / "aux" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "aux" / str(label) / f"{i}.png")
    (tmp_path / "data").mkdir()
    for stem, n, seed in (("train", 100, 6), ("t10k", 200, 7)):
        images, labels = brightness_images(n, seed)
        write_idx(tmp_path / "data" / f"{stem}-images-idx3-ubyte", images)
        write_idx(tmp_path / "data" / f"{stem}-labels-idx1-ubyte", labels)
    return tmp_path / "aux", tmp_path / "data"


def user_class(name: str):
    """A class of tests/data/model_defs.py, imported as the user's own code would be."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("defs_for_test", DEFS)
    defs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(defs)
    return getattr(defs, name)


def trained(tmp_path, name: str, steps: int = 60):
    """init and final safetensors (no metadata) of the class ``name``, trained on tiny images."""
    torch.manual_seed(0)
    model = user_class(name)()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = brightness_images(400, 0)
    ds = DATASETS.get("fmnist")
    x = (torch.from_numpy(images).float()[:, None] / 255 - ds.mean[0]) / ds.std[0]
    y = torch.from_numpy(labels).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = slice(step * 50 % 400, step * 50 % 400 + 50)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    folder = tmp_path / name
    folder.mkdir()
    save_file(init, folder / "init.safetensors")
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "final.safetensors")
    return folder


def test_a_small_resnet_is_scanned_defended_and_evaluated(tmp_path, bright):
    aux_dir, fmnist_dir = bright
    run = trained(tmp_path, "TinyResNet")
    before = invoke("eval", run / "final.safetensors", "--model-def", f"{DEFS}:TinyResNet", "--dataset", "fmnist",
                    "--data-dir", fmnist_dir, "--json")
    assert before.exit_code == 0, before.output
    assert json.loads(before.stdout)["acc"] > 0.8  # it learnt the task: the defense below has something to keep
    spec = f"{DEFS}:TinyResNet"
    scan = invoke("scan", run / "final.safetensors", "--aux", aux_dir, "--model-def", spec, "--dataset", "fmnist",
                  "--json")
    assert scan.exit_code == 0, scan.output
    report = json.loads(scan.stdout)
    # a pooled classifier's 16 inputs are all active on clean data: the premise warning, and no other
    assert report["layer"] == "fc" and report["neurons"] == 16
    assert len(report["warnings"]) == 1 and "near-silent" in report["warnings"][0]
    assert "note: defended layer: fc" in scan.stderr
    out = tmp_path / "clean.safetensors"
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--model-def", spec, "--dataset", "fmnist", "--preset", "paper", "--rho", "0.1", "--out", out,
                 "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["layer"] == "fc" and f"ran {spec} to build the model; defended layer: fc" in report["notes"]
    cleaned, final, init = (load_checkpoint(p).tensors for p in (out, run / "final.safetensors",
                                                                 run / "init.safetensors"))
    flipped = torch.tensor(load_checkpoint(out).meta["defense"]["neurons"], dtype=torch.long)
    assert len(flipped) == report["flipped"] > 0
    w, w0 = final["fc.weight"], init["fc.weight"]
    scale = cleaned["fc.weight"].norm() / torch.where(torch.isin(torch.arange(16), flipped), 2 * w0 - w, w).norm()
    expected = torch.where(torch.isin(torch.arange(16), flipped), 2 * w0 - w, w) * scale  # eq. 7, then the rescale
    assert torch.allclose(cleaned["fc.weight"], expected, atol=1e-6)
    assert all(torch.equal(cleaned[k], final[k]) for k in final if not k.startswith("fc."))
    assert load_checkpoint(out).meta["model_def"]["spec"] == spec
    again = invoke("eval", out, "--model-def", spec, "--data-dir", fmnist_dir, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["acc"] > 0.5  # flips on a 16-input layer are coarse (rho 0.1): a cost, not chance
    missing = invoke("eval", out, "--data-dir", fmnist_dir)
    assert missing.exit_code == 1 and f"pass --model-def {spec}" in missing.stderr


def test_an_mlp_warns_that_its_first_layer_sees_negative_inputs(tmp_path, aux_dir):
    run = trained(tmp_path, "MLP")
    for name, layer, warned in (("MLP", None, True), ("make_mlp", "fc2", False)):
        args = ["scan", run / "final.safetensors", "--aux", aux_dir, "--model-def", f"{DEFS}:{name}",
                "--dataset", "fmnist", "--json"] + (["--layer", layer] if layer else [])
        res = invoke(*args)
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["layer"] == (layer or "fc1")
        assert bool(report["warnings"]) == warned and ("take negative values" in res.stderr) == warned


def test_an_mlp_and_a_sequential_defend_at_a_layer_after_a_relu_and_evaluate(tmp_path, bright):
    aux_dir, data = bright
    for name, layer in (("MLP", "fc2"), ("sequential_mlp", "3")):
        run = trained(tmp_path, name)
        spec = f"{DEFS}:{name}"
        out = tmp_path / f"{name}.clean.safetensors"
        res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                     "--model-def", spec, "--dataset", "fmnist", "--layer", layer, "--preset", "paper", "--rho", "0.1",
                     "--out", out, "--json")
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["layer"] == layer and report["of"] == 64
        assert not any("negative" in w for w in report["warnings"])  # after a ReLU (near-silent ones may be few)
        evaluated = invoke("eval", out, "--model-def", spec, "--data-dir", data, "--json")
        assert evaluated.exit_code == 0, evaluated.output
    assert set(load_checkpoint(out).tensors) == {"1.weight", "1.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize(("spec", "extra", "message"), [
    ("{defs}:SkipAround", [], "after fc1 the network also reads direct, computed before it (a skip connection"),
    ("{defs}:Nope", [], "has no class or function 'Nope'"),
    ("{defs}", [], "must be FILE.py:NAME"),
    ("{defs}:MLP", ["--arch", "cnn-mnist"], "--arch and --model-def both name the architecture"),
    ("{defs}:TinyResNet", [], "does not fit the architecture: missing"),
])
def test_model_def_failures_are_one_line(tmp_path, aux_dir, spec, extra, message):
    run = trained(tmp_path, "SkipAround" if "SkipAround" in spec else "MLP", steps=1)
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--model-def", spec.format(defs=DEFS), "--dataset", "fmnist", "--out", tmp_path / "o.st", *extra)
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert message in res.stderr
    assert not (tmp_path / "o.st").exists()


@pytest.mark.parametrize("kind", ["safetensors", "bfloat16", "pt", "npz"])
def test_the_authors_model_in_four_formats_goes_through_inspect_eval_defend_eval(tmp_path, kind):
    """Issue 11's walk-through: their class file, their checkpoint (no metadata), our commands."""
    from .conftest import write_aux_folder, write_fmnist_like
    data = write_fmnist_like(tmp_path / "data", n_train=200, n_test=100)
    aux = write_aux_folder(tmp_path / "aux", per_class=4)
    run = tmp_path / "run"
    res = invoke("train", "--data-dir", data, "--arch", "cnn-fmnist-ref", "--clients", "2", "--rounds", "1",
                 "--batch-size", "64", "--out", run)  # tensors named as the authors' (conv1..fc4)
    assert res.exit_code == 0, res.output
    spec = f"{DEFS}:AuthorsFMNIST"
    order = list(user_class("AuthorsFMNIST")().state_dict())  # a Flower client sends the values in this order
    paths = {}
    for name in ("final", "init"):
        tensors = load_checkpoint(run / f"{name}.safetensors").tensors
        if kind in ("safetensors", "bfloat16"):
            paths[name] = tmp_path / f"{name}.safetensors"
            save_file({k: v.to(torch.bfloat16 if kind == "bfloat16" else torch.float32) for k, v in tensors.items()},
                      paths[name])
        elif kind == "pt":
            paths[name] = tmp_path / f"{name}.pt"
            torch.save({f"module.{k}": v for k, v in tensors.items()}, paths[name])
        else:
            paths[name] = tmp_path / f"{name}.npz"
            np.savez(paths[name], *[tensors[k].numpy() for k in order])
    found = json.loads(invoke("inspect", paths["final"], "--json").stdout)
    assert {"cnn-fmnist", "cnn-fmnist-ref"} <= {m["arch"] for m in found["matches"]}
    common = ("--model-def", spec, "--dataset", "fmnist")
    before = invoke("eval", paths["final"], *common, "--data-dir", data, "--attack", "0:5", "--trigger", "cba",
                    "--json")
    assert before.exit_code == 0, before.output
    out = tmp_path / "clean.safetensors"
    res = invoke("defend", paths["final"], "--init", paths["init"], "--aux", aux, *common, "--rho", "0.05",
                 "--repair-steps", "5", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["layer"] == "fc1"
    after = invoke("eval", out, "--model-def", spec, "--data-dir", data, "--attack", "0:5", "--trigger", "cba",
                   "--json")
    assert after.exit_code == 0, after.output
    written = load_checkpoint(out)
    assert written.meta["source"]["format"] == {"pt": "torch", "npz": "npz"}.get(kind, "safetensors")
    assert written.tensors["fc1.weight"].dtype == (torch.bfloat16 if kind == "bfloat16" else torch.float32)
