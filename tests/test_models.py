import pytest
import torch
from torch import nn

from flain_cli.errors import ConfigError
from flain_cli.models import ARCHITECTURES, build_model

EXPECTED_FC1 = {"cnn-mnist": (3136, 128), "cnn-fmnist": (9216, 256), "cnn-fmnist-ref": (9216, 256),
                "cnn-cifar": (4096, 1024)}
EXPECTED_LINEAR = {"cnn-mnist": 2, "cnn-fmnist": 4, "cnn-fmnist-ref": 4, "cnn-cifar": 3}
EXPECTED_CONV = {"cnn-mnist": 2, "cnn-fmnist": 2, "cnn-fmnist-ref": 2, "cnn-cifar": 6}


def test_the_reference_variant_differs_only_in_the_dropout_before_fc1():
    ours, ref = build_model("cnn-fmnist", 10), build_model("cnn-fmnist-ref", 10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    drops = lambda m: [c.p for c in m.children() if isinstance(c, nn.Dropout)]  # noqa: E731
    assert drops(ours) == [0.25, 0.5, 0.5, 0.5] and drops(ref) == [0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("arch", sorted(EXPECTED_FC1))
def test_shapes_and_defended_layer(arch):
    spec = ARCHITECTURES.get(arch)
    model = build_model(arch, 7).eval()
    x = torch.randn(3, *spec.input_shape)
    assert model(x).shape == (3, 7)
    fc1 = model.linear(spec.defended_layer)
    assert spec.defended_layer == "fc1"
    assert (fc1.in_features, fc1.out_features) == EXPECTED_FC1[arch]
    assert len(model.linear_layers()) == EXPECTED_LINEAR[arch]
    assert sum(isinstance(m, nn.Conv2d) for m in model.children()) == EXPECTED_CONV[arch]
    # fc1 is the first fully connected layer after the convolutions
    assert model.linear_layers()[0] == "fc1"


@pytest.mark.parametrize("arch", sorted(EXPECTED_FC1))
def test_split_at_defended_layer_composes_to_the_whole_model(arch):
    spec = ARCHITECTURES.get(arch)
    model = build_model(arch, 10).eval()
    x = torch.randn(2, *spec.input_shape)
    prefix, suffix = model.split_at("fc1")
    features = prefix(x)
    assert features.shape == (2, EXPECTED_FC1[arch][0])
    assert torch.equal(suffix(features), model(x))


def test_cifar_model_has_batchnorm_buffers():
    keys = build_model("cnn-cifar", 10).state_dict().keys()
    assert "bn1.running_mean" in keys and "bn6.num_batches_tracked" in keys


def test_unknown_names_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet'.*cnn-mnist"):
        build_model("resnet", 10)
    model = build_model("cnn-mnist", 10)
    with pytest.raises(ConfigError, match="not a Linear layer"):
        model.linear("conv1")
    with pytest.raises(ConfigError, match="not in this model"):
        model.split_at("fc9")
