"""The paper's architectures, by name.

Every model is a :class:`LayerStack`: an ``nn.Sequential`` whose children carry readable names
(``conv1``, ``fc1``...), so that state_dict keys read ``fc1.weight`` and the network can be cut
at any layer. FLAIN needs that cut: everything before the defended layer is a fixed feature
extractor, and only the part from the defended layer on is re-run while searching.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .catalog import ARCHITECTURES
from .errors import ConfigError


class LayerStack(nn.Sequential):
    """A sequential network with named layers that can be split at any of them."""

    def index_of(self, layer: str) -> int:
        names = [name for name, _ in self.named_children()]
        if layer not in names:
            raise ConfigError(f"layer {layer!r} is not in this model; its layers: {', '.join(names)}")
        return names.index(layer)

    def split_at(self, layer: str) -> tuple[nn.Sequential, nn.Sequential]:
        """(prefix, suffix): prefix maps inputs to the input of ``layer``; suffix starts at it.

        Both share their modules with this model (no copy).
        """
        i = self.index_of(layer)
        return cast(nn.Sequential, self[:i]), cast(nn.Sequential, self[i:])

    def linear_layers(self) -> list[str]:
        return [name for name, module in self.named_children() if isinstance(module, nn.Linear)]

    def linear(self, layer: str) -> nn.Linear:
        module = self[self.index_of(layer)]
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"layer {layer!r} is a {type(module).__name__}, not a Linear layer; "
                f"Linear layers: {', '.join(self.linear_layers())}"
            )
        return module


@dataclass(frozen=True)
class Architecture:
    name: str
    input_shape: tuple[int, int, int]  # (channels, height, width)
    defended_layer: str
    build: Callable[[int], LayerStack]
    description: str




def _register(name: str, input_shape: tuple[int, int, int], description: str,
              defended: str = "fc1") -> Callable[[Callable[[int], LayerStack]], Callable[[int], LayerStack]]:
    def add(build: Callable[[int], LayerStack]) -> Callable[[int], LayerStack]:
        ARCHITECTURES.register(name)(Architecture(name, input_shape, defended, build, description))
        return build

    return add


@_register("cnn-mnist", (1, 28, 28), "MNIST/EMNIST: 2 conv + 2 fc (fc1 3136->128)")
def cnn_mnist(num_classes: int) -> LayerStack:
    return LayerStack(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("drop1", nn.Dropout(0.5)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(3136, 128)), ("relu3", nn.ReLU()), ("drop2", nn.Dropout(0.5)),
        ("fc2", nn.Linear(128, num_classes)),
    ]))


def _cnn_fmnist(num_classes: int, drop1: float) -> LayerStack:
    return LayerStack(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 3)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3)), ("relu2", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("drop1", nn.Dropout(drop1)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(9216, 256)), ("relu3", nn.ReLU()), ("drop2", nn.Dropout(0.5)),
        ("fc2", nn.Linear(256, 128)), ("relu4", nn.ReLU()), ("drop3", nn.Dropout(0.5)),
        ("fc3", nn.Linear(128, 64)), ("relu5", nn.ReLU()), ("drop4", nn.Dropout(0.5)),
        ("fc4", nn.Linear(64, num_classes)),
    ]))


@_register("cnn-fmnist", (1, 28, 28), "Fashion-MNIST: 2 conv + 4 fc (fc1 9216->256), dropout 0.25 before fc1")
def cnn_fmnist(num_classes: int) -> LayerStack:
    return _cnn_fmnist(num_classes, 0.25)


@_register("cnn-fmnist-ref", (1, 28, 28),
           "cnn-fmnist with the authors' public model's dropout 0.5 before fc1 (same tensors)")
def cnn_fmnist_ref(num_classes: int) -> LayerStack:
    return _cnn_fmnist(num_classes, 0.5)


def _conv_bn(cin: int, cout: int, i: int) -> list[tuple[str, nn.Module]]:
    return [(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1)),
            (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU())]


@_register("cnn-cifar", (3, 32, 32), "CIFAR-10: 6 conv (BatchNorm) + 3 fc (fc1 4096->1024)")
def cnn_cifar(num_classes: int) -> LayerStack:
    layers: list[tuple[str, nn.Module]] = []
    layers += _conv_bn(3, 64, 1) + _conv_bn(64, 128, 2) + [("pool1", nn.MaxPool2d(2))]
    layers += _conv_bn(128, 256, 3) + _conv_bn(256, 256, 4) + [("pool2", nn.MaxPool2d(2))]
    layers += _conv_bn(256, 256, 5) + _conv_bn(256, 256, 6) + [("pool3", nn.MaxPool2d(2))]
    layers += [("drop1", nn.Dropout(0.5)), ("flatten", nn.Flatten()),
               ("fc1", nn.Linear(4096, 1024)), ("relu7", nn.ReLU()), ("drop2", nn.Dropout(0.5)),
               ("fc2", nn.Linear(1024, 512)), ("relu8", nn.ReLU()), ("drop3", nn.Dropout(0.5)),
               ("fc3", nn.Linear(512, num_classes))]
    return LayerStack(OrderedDict(layers))


@_register("lenet5", (1, 28, 28), "LeNet-5: 2 conv (5x5) + 3 fc, a small fc1 (400->120)")
def lenet5(num_classes: int) -> LayerStack:
    return LayerStack(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(400, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("fc3", nn.Linear(84, num_classes)),
    ]))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@_register("resnet-small", (1, 28, 28), "a small ResNet: 3 residual blocks, global average pooling, one Linear "
                                        "(fc 64->classes): FLAIN's layer is the classifier", defended="fc")
def resnet_small(num_classes: int) -> LayerStack:
    return LayerStack(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
        ("block1", ResidualBlock(16, 16, 1)), ("block2", ResidualBlock(16, 32, 2)),
        ("block3", ResidualBlock(32, 64, 2)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64, num_classes)),
    ]))


@_register("mlp", (1, 28, 28), "an MLP: 784->256->128->classes; fc1 reads the normalized pixels, which can be "
                               "negative (defend warns that FLAIN's premise fails there)")
def mlp(num_classes: int) -> LayerStack:
    return LayerStack(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(784, 256)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(256, 128)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(128, num_classes)),
    ]))


def build_model(arch: str, num_classes: int) -> LayerStack:
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return ARCHITECTURES.get(arch).build(num_classes)
