"""Model classes as a user of `--model-def` writes them: not built into flain-cli."""

import torch
from torch import nn


class MLP(nn.Module):
    """Pixels straight into fc1: its inputs are normalized pixels, negative too."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A ResNet head: residual blocks, global average pooling, then the one Linear layer `fc`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Block(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


class SkipAround(nn.Module):
    """The logits also read the pixels directly: the network cannot be cut at fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.direct = nn.Linear(784, 32), nn.Linear(32, 10), nn.Linear(784, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc2(torch.relu(self.fc1(x))) + self.direct(x)


def make_mlp():
    """A factory function instead of a class."""
    return MLP(10)


class AuthorsFMNIST(nn.Module):
    """The paper's public Fashion-MNIST model as its own code writes it: named layers, functional ReLUs,
    Dropout(0.5) before each fc layer (docs/simulation.md). Not a built-in LayerStack."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.dropout = nn.Dropout(0.5)
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(9216, 256), nn.Linear(256, 128), nn.Linear(128, 64),
                                                  nn.Linear(64, 10))

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        x = self.dropout(torch.flatten(x, 1))
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        x = self.dropout(torch.relu(self.fc3(x)))
        return self.fc4(x)


def sequential_mlp():
    """An nn.Sequential: its tensors are named 0.weight, 0.bias, 2.weight..."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
