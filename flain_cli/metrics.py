"""Clean accuracy (ACC), attack success rates (ASR: the source class's, and BackdoorBench's over every
non-target class), robust accuracy (RA) and the defense effectiveness rating (DER)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attack import AttackTask
from .datasets import DatasetSpec, Split
from .triggers import AnyTrigger


@dataclass(frozen=True)
class EvalResult:
    """What a model does on a test split. Every rate is an exact fraction of counts (correct / total)."""

    acc: float
    asr: float | None  # source-class ASR (the paper's); None when no attack is known, or no source image was there
    n_clean: int
    n_triggered: int  # source-class images triggered
    per_class_acc: tuple[float, ...]
    # the same source-class images without the trigger, classified as the target: the natural
    # confusion that ASR counts too, and that no backdoor removal can take away
    asr_clean: float | None = None
    # BackdoorBench's: over every test image whose label is not the target, triggered (None when not measured)
    asr_all: float | None = None  # predicted as the target
    ra: float | None = None  # robust accuracy: predicted as their true label
    n_all: int = 0


def der(before: EvalResult, after: EvalResult, all_classes: bool = False) -> float | None:
    """Defense effectiveness rating (BackdoorBench): ``[max(0, dASR) - max(0, dACC) + 1] / 2`` with dASR = ASR
    before - after and dACC = ACC before - after; in [0, 1], higher is better. ``all_classes``: with the
    all-class ASR instead of the source-class one. None when an ASR was not measured."""
    a, b = (before.asr_all, after.asr_all) if all_classes else (before.asr, after.asr)
    if a is None or b is None:
        return None
    return (max(0.0, a - b) - max(0.0, before.acc - after.acc) + 1) / 2


def _share(hits: torch.Tensor) -> float | None:
    """The exact fraction of true entries (None for an empty tensor: nothing measured)."""
    return int(hits.sum()) / len(hits) if len(hits) else None


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, device: torch.device | str = "cpu",
            batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels of uint8 images, in eval mode, without autograd."""
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(images), batch_size):
        x = spec.normalize(images[start:start + batch_size].to(device))
        preds.append(model(x).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def evaluate(model: nn.Module, split: Split, spec: DatasetSpec, task: AttackTask | None = None,
             trigger: AnyTrigger | None = None, device: torch.device | str = "cpu",
             all_classes: bool = True) -> EvalResult:
    """Clean accuracy (ACC) of ``model`` on ``split`` and, with a task and a trigger, the attack's success.

    Args:
        model: the network (its train/eval mode is restored afterwards).
        split: uint8 images and labels; normalized as ``spec`` says.
        task: the attack (source classes, target); None for ACC only.
        trigger: stamped in full for the ASRs.
        all_classes: also trigger every non-target image (BackdoorBench's ASR and RA); False triggers the
            source-class images only (the training loop's per-round log).

    Returns:
        ``EvalResult``: ``acc``; ``asr`` (share of triggered source images predicted as the target; None
        without a task, or when the split holds no source-class image) with ``n_triggered``;
        ``asr_clean``, the same share without the trigger (the classes' natural confusion, ASR's
        floor); ``asr_all`` and ``ra`` over the ``n_all`` triggered non-target images; per-class accuracy.

    Example: ``evaluate(model, load_dataset("fmnist").test, DATASETS.get("fmnist"), task, trigger).acc``.
    """
    preds = predict(model, split.images, spec, device)
    correct = preds == split.labels
    per_class = tuple(float("nan") if (share := _share(correct[split.labels == c])) is None else share
                      for c in range(spec.num_classes))
    acc = _share(correct)
    if task is None or trigger is None:
        return EvalResult(float("nan") if acc is None else acc, None, len(split), 0, per_class)
    source = task.is_source(split.labels)
    triggered = torch.nonzero(split.labels != task.target if all_classes else source).flatten()
    labels = split.labels[triggered]
    hits = predict(model, trigger.stamp(split.images[triggered]), spec, device)
    on_source = task.is_source(labels)
    return EvalResult(float("nan") if acc is None else acc, _share(hits[on_source] == task.target), len(split),
                      int(on_source.sum()), per_class, _share(preds[source] == task.target),
                      _share(hits == task.target) if all_classes else None,
                      _share(hits == labels) if all_classes else None, len(triggered) if all_classes else 0)
