"""Clean accuracy (ACC) and attack success rate (ASR)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attack import AttackTask
from .datasets import DatasetSpec, Split
from .triggers import AnyTrigger


@dataclass(frozen=True)
class EvalResult:
    acc: float
    asr: float | None  # None when no attack is known, or no source-class image was there to trigger
    n_clean: int
    n_triggered: int
    per_class_acc: tuple[float, ...]
    # the same source-class images without the trigger, classified as the target: the natural
    # confusion that ASR counts too, and that no backdoor removal can take away
    asr_clean: float | None = None


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, device: torch.device | str = "cpu",
            batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels of uint8 images, in eval mode."""
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(images), batch_size):
        x = spec.normalize(images[start:start + batch_size].to(device))
        preds.append(model(x).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def attack_success_rate(model: nn.Module, split: Split, spec: DatasetSpec, task: AttackTask, trigger: AnyTrigger,
                        device: torch.device | str = "cpu") -> tuple[float | None, int]:
    """Share of source-class test images, stamped with the full trigger, classified as the target (None: the split
    holds no source-class image, so nothing was measured)."""
    idx = torch.nonzero(task.is_source(split.labels)).flatten()
    if len(idx) == 0:
        return None, 0
    preds = predict(model, trigger.stamp(split.images[idx]), spec, device)
    return float((preds == task.target).float().mean()), len(idx)


def evaluate(model: nn.Module, split: Split, spec: DatasetSpec, task: AttackTask | None = None,
             trigger: AnyTrigger | None = None, device: torch.device | str = "cpu") -> EvalResult:
    """Clean accuracy (ACC) of ``model`` on ``split`` and, with a task and a trigger, the attack's success rate.

    Args:
        model: the network (its train/eval mode is restored afterwards).
        split: uint8 images and labels; normalized as ``spec`` says.
        task: the attack (source classes, target); None for ACC only.
        trigger: stamped in full on the source-class images for ASR.

    Returns:
        ``EvalResult``: ``acc``; ``asr`` (share of triggered source images predicted as the target; None
        without a task, or when the split holds no source-class image) with ``n_triggered``;
        ``asr_clean``, the same share without the trigger (the classes' natural confusion, ASR's
        floor); per-class accuracy.

    Example: ``evaluate(model, load_dataset("fmnist").test, DATASETS.get("fmnist"), task, trigger).acc``.
    """
    preds = predict(model, split.images, spec, device)
    correct = preds == split.labels
    per_class = tuple(
        float(correct[split.labels == c].float().mean()) if bool((split.labels == c).any()) else float("nan")
        for c in range(spec.num_classes)
    )
    asr, n_triggered, asr_clean = None, 0, None
    if task is not None and trigger is not None:
        asr, n_triggered = attack_success_rate(model, split, spec, task, trigger, device)
        source = task.is_source(split.labels)
        asr_clean = float((preds[source] == task.target).float().mean()) if bool(source.any()) else None
    return EvalResult(float(correct.float().mean()) if len(split) else float("nan"), asr, len(split),
                      n_triggered, per_class, asr_clean)
