"""The whole threshold curve: what each lambda of the search does to aux accuracy, ACC and ASR.

FLAIN picks its threshold from the aux accuracy alone. An auditor who holds labelled test data
may want to see the trade-off itself: for each threshold of the search's grid
(lambda_k = mu + k * step, Algorithm 1), the model as `flain defend` would write it (the selected
columns flipped or pruned, the layer rescaled to its original norm), scored on the aux set, the
clean test set, the triggered source images (ASR) and the same images without the trigger.
It reads test labels, so it is a diagnostic, never a defense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .audit import AuxFeatures, check_finite, load_aux_for, load_init, load_model
from .auxdata import AuxSet
from .catalog import METHODS
from .checkpoint import ModelSource
from .datasets import load_dataset
from .defense import apply_mask, rescale_factor, threshold
from .errors import ConfigError, opt
from .evaluation import load_test_file, resolve_attack
from .settings import PAPER_STEP
from .triggers import make_trigger


@dataclass(frozen=True)
class SweepPoint:
    lam: float | None  # None: the model as it is
    changed: int
    aux_acc: float
    acc: float
    asr: float | None
    asr_clean: float | None


@dataclass(frozen=True)
class SweepResult:
    points: list[SweepPoint]
    layer: str
    method: str
    step: float
    of: int  # inputs of the layer
    attack: str | None
    n_aux: int
    n_test: int


def sweep_checkpoint(path: Path, init_path: Path, aux_path: Path, *, method: str = "flain", step: float = PAPER_STEP,
                     points: int = 25, layer: str | None = None, source: ModelSource = ModelSource(),
                     data_dir: Path | None = None, test_file: Path | None = None, shifts: int = 0,
                     device: torch.device | str = "cpu") -> SweepResult:
    """The model unchanged, then ``points`` thresholds mu, mu + step, ... as `defend` would apply them
    (``shifts``: on the means over moved copies of the aux images too, as `defend --shifts`)."""
    if not (math.isfinite(step) and step > 0):
        raise ConfigError(f"must be a finite number > 0, got {step}", param="step")
    if points < 1:
        raise ConfigError(f"must be at least 1, got {points}", param="points")
    loaded = load_model(path, source, device)
    check_finite(loaded.ckpt, opt("path"))
    init = load_init(init_path, loaded, strict=source.strict)
    meta = loaded.meta
    dataset = meta.test_dataset(path)
    layer = layer or meta.defended_layer
    aux = load_aux_for(loaded, aux_path)
    test = load_test_file(test_file, meta) if test_file else load_dataset(dataset, data_dir).test
    scored = {"aux": aux, "acc": AuxSet(test.images, test.labels, "test")}
    attack = resolve_attack(loaded.ckpt, meta.num_classes)
    if attack is not None:
        trigger = make_trigger(attack.trigger, *meta.input_shape[1:])
        is_source = attack.task.is_source(test.labels)
        target = torch.full((int(is_source.sum()),), attack.task.target, dtype=torch.long)
        scored["asr"] = AuxSet(trigger.stamp(test.images[is_source]), target, "triggered source images")
        scored["asr_clean"] = AuxSet(test.images[is_source], target, "source images")
    feats = {name: AuxFeatures(loaded.model, layer, images, meta, device) for name, images in scored.items()}
    x = feats["aux"].mean_activations(shifts)
    weight = loaded.ckpt.tensors[f"{layer}.weight"]
    replacement = METHODS.get(method)(weight, init.tensors[f"{layer}.weight"].to(weight.dtype))
    norm = float(torch.linalg.matrix_norm(weight.double()))

    def point(lam: float | None, mask: torch.Tensor, changed: torch.Tensor | None) -> SweepPoint:
        w = apply_mask(weight, replacement, mask)
        scale = 1.0 if lam is None else rescale_factor(w, norm)
        s = {name: f.accuracy(w, changed, scale) for name, f in feats.items()}
        return SweepPoint(lam, int(mask.sum()), s["aux"], s["acc"], s.get("asr"), s.get("asr_clean"))

    mask = torch.zeros_like(x, dtype=torch.bool)
    curve = [point(None, mask, None)]
    mu = float(x.min())
    for k in range(points):
        lam = threshold(mu, k, step)  # the search's own lambdas (k = 0: mu itself)
        new = (x <= lam) & ~mask
        mask = mask | new
        curve.append(point(lam, mask, torch.nonzero(new).flatten()))
    return SweepResult(curve, layer, method, step, int(x.numel()), str(attack.task) if attack else None,
                       len(aux), len(test))
