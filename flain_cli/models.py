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




def _register(name: str, input_shape: tuple[int, int, int],
              description: str) -> Callable[[Callable[[int], LayerStack]], Callable[[int], LayerStack]]:
    def add(build: Callable[[int], LayerStack]) -> Callable[[int], LayerStack]:
        ARCHITECTURES.register(name)(Architecture(name, input_shape, "fc1", build, description))
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


def build_model(arch: str, num_classes: int) -> LayerStack:
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return ARCHITECTURES.get(arch).build(num_classes)
