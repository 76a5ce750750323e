import json

import pytest
import torch
from safetensors.torch import save_file

from flain_cli.checkpoint import build_from, load_checkpoint, model_meta, resolve_model_meta, save_checkpoint
from flain_cli.cli.common import cli_message
from flain_cli.errors import CheckpointError
from flain_cli.models import build_model


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    model = build_model("cnn-cifar", 10)
    model.bn1.running_mean.fill_(0.25)  # a BatchNorm buffer must survive
    meta = model_meta("cnn-cifar", 10, "cifar10").to_json() | {"role": "final", "seed": 3,
                                                                "attack": {"task": "0:5", "trigger": "dba"},
                                                                "parents": {"init": "ab" * 32}}
    sha = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), meta)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.sha256 == sha and len(sha) == 64
    assert set(ckpt.tensors) == set(model.state_dict())
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in model.state_dict().items())
    assert ckpt.meta == json.loads(json.dumps(meta))
    assert ckpt.meta["defended_layer"] == "fc1" and ckpt.meta["input_shape"] == [3, 32, 32]
    assert ckpt.meta["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    resolved = resolve_model_meta(ckpt)
    rebuilt = build_from(ckpt, resolved)
    assert torch.equal(rebuilt.bn1.running_mean, model.bn1.running_mean)
    # the typed description reads back what was written, field for field
    assert resolved == model_meta("cnn-cifar", 10, "cifar10") and resolved.input_shape == (3, 32, 32)
    assert json.loads(json.dumps(resolved.to_json())) == {k: ckpt.meta[k] for k in resolved.to_json()}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_same_content_gives_the_same_file(tmp_path):
    state = build_model("cnn-mnist", 10).state_dict()
    meta = model_meta("cnn-mnist", 10, "mnist").to_json() | {"role": "init"}
    first = save_checkpoint(tmp_path / "a.safetensors", state, meta)
    assert first == save_checkpoint(tmp_path / "b.safetensors", state, meta)


def test_foreign_safetensors_needs_an_architecture(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("cnn-mnist", 10).state_dict().items()}, str(path))
    ckpt = load_checkpoint(path)
    assert ckpt.meta == {}
    with pytest.raises(CheckpointError, match="pass arch ") as caught:  # the library says its parameters' names
        resolve_model_meta(ckpt)
    assert str(caught.value).endswith("and dataset")
    said = cli_message(caught.value)  # and the CLI its options'
    assert said.endswith("and --dataset") and "pass --arch (cnn-mnist, " in said
    model = build_from(ckpt, resolve_model_meta(ckpt, arch="cnn-mnist", dataset="mnist"))
    assert model.fc1.in_features == 3136


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a checkpoint flain-cli can read: not safetensors, not a "
                                              "torch.save state dict"):
        load_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")  # header past the end
    with pytest.raises(CheckpointError, match="not a checkpoint flain-cli can read"):
        load_checkpoint(tmp_path / "cut.safetensors")
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model("cnn-mnist", 10).state_dict(),
                    model_meta("cnn-mnist", 10, "mnist").to_json() | {"role": "init"})
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError,
                       match=r"\(architecture cnn-fmnist, 10 classes\) does not fit the architecture: missing 4 \(fc3"):
        build_from(ckpt, resolve_model_meta(ckpt, arch="cnn-fmnist"))
