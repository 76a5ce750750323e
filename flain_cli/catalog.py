"""What flain-cli offers by name, known without importing torch.

The registries of built-in datasets, architectures, triggers, splits, aggregators and defense
methods, each with its names and the module that registers the implementations (imported on
first use, :class:`flain_cli.registry.Registry`). The CLI builds its help and choices from these,
so ``flain --help`` and every usage error answer in a fraction of a second. To add a trigger
(or any other entry): declare its name here and register it in the module named beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Registry

if TYPE_CHECKING:  # the implementations' types (annotations only: importing them at run time would import torch)
    from collections.abc import Callable

    import torch

    from .aggregation import AggregatorSettings, Update
    from .datasets import DatasetSpec
    from .methods import Method
    from .models import Architecture
    from .triggers import Trigger, TriggerSpec

DATASETS: Registry[DatasetSpec] = Registry("dataset", ("fmnist", "mnist", "emnist", "cifar10"), "flain_cli.datasets")
ARCHITECTURES: Registry[Architecture] = Registry(
    "architecture", ("cnn-mnist", "cnn-fmnist", "cnn-fmnist-ref", "cnn-cifar", "lenet5", "resnet-small", "mlp"),
    "flain_cli.models")
TRIGGERS: Registry[Callable[[TriggerSpec, tuple[int, int, int]], Trigger]] = Registry(
    "trigger", ("cba", "dba", "pix3", "pix5", "pix7", "pix9", "checker", "blend", "sig"), "flain_cli.triggers")
SPLITS: Registry[Callable[..., list[torch.Tensor]]] = Registry("split", ("iid", "dirichlet"), "flain_cli.splits")
AGGREGATORS: Registry[Callable[[list[Update], list[float], AggregatorSettings], Update]] = Registry(
    "aggregator", ("fedavg", "rlr"), "flain_cli.aggregation")
# a defense method: how it selects the defended layer's inputs, what training follows, whether it reads W0
# (methods.py adds what the selected columns become). select: "search" (Algorithm 1's thresholds on the mean
# activations), "rnp" (the same on RNP's mask), "none"; train: "repair", "finetune", "none"
METHOD_STEPS: dict[str, tuple[str, str, bool]] = {
    "flain": ("search", "repair", True), "prune": ("search", "repair", False),
    "finetune": ("none", "finetune", False), "fine-pruning": ("search", "finetune", False),
    "distill": ("none", "repair", False), "rnp": ("rnp", "none", False)}
METHODS: Registry[Method] = Registry("method", tuple(METHOD_STEPS), "flain_cli.methods")

# triggers' settings (triggers.py): blend's weight when none is given, the checkerboard's top-left pixel by default
BLEND_ALPHA = 0.15  # the literature uses 0.1-0.2
CHECKER_POS = (1, 1)  # the top-left corner, away from the CBA block

# how clients train: float32, or autocast to bfloat16/float16 (the model and optimizer stay float32);
# "auto" picks bf16 where the device supports it and is resolved before a run starts (simulation.py)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
ENGINES = ("builtin", "flower")  # flain-cli's own round loop, or Flower's simulation engine (flain_cli.flower)

# file names of a `flain train` run folder
RESUME_FILE = "resume.safetensors"
LOCK_FILE = "train.lock"
