"""The whole threshold curve: what each lambda of the search does to aux accuracy, ACC and ASR.

FLAIN picks its threshold from the aux accuracy alone. An auditor who holds labelled test data
may want to see the trade-off itself: for each threshold of the search's grid
(lambda_k = mu + k * step, Algorithm 1), the model as `flain defend` would write it (the selected
columns flipped or pruned, the layer rescaled to its original norm), scored on the aux set, the
clean test set, the triggered source images (ASR) and the same images without the trigger.
It reads test labels, so it is a diagnostic, never a defense. Each threshold's layer is the one
:func:`flain_cli.defense.candidate` gives, the function the search keeps its model with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ModelSource
from .datasets import load_dataset
from .defense import candidates
from .errors import ConfigError, opt
from .evaluation import attack_sets, load_test_file, resolve_attack
from .features import FeatureSets
from .loading import check_finite, load_aux_for, load_init, load_model
from .settings import DEFAULT, DefenseConfig


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
    config: DefenseConfig  # the method, step, shifts and rescale of the curve (its stop and repair play no part)
    of: int  # inputs of the layer
    attack: str | None
    n_aux: int
    n_test: int


def sweep_checkpoint(path: Path, init_path: Path, aux_path: Path, config: DefenseConfig = DEFAULT, *,
                     points: int = 25, layer: str | None = None, source: ModelSource = ModelSource(),
                     data_dir: Path | None = None, test_file: Path | None = None,
                     device: torch.device | str = "cpu") -> SweepResult:
    """The model unchanged, then the layer `flain defend` would keep at ``points`` thresholds mu, mu + step, ...
    (:func:`flain_cli.defense.candidates`, with ``config``'s method, step, shifts and rescale; no repair),
    each scored on the aux set, the test set, the triggered source images and the same without trigger."""
    config.check()
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
    attack = resolve_attack(loaded.ckpt, meta.num_classes)
    feats = FeatureSets(loaded.model, layer, {"aux": aux} | attack_sets(test, attack, meta.input_shape), meta, device)
    x = feats["aux"].mean_activations(config.shifts)
    weight = loaded.ckpt.tensors[f"{layer}.weight"]
    curve = []
    for c in candidates(weight, init.tensors[f"{layer}.weight"].to(weight.dtype), x, config, points):
        s = feats.scores(c.masked, c.added, c.factor)
        curve.append(SweepPoint(c.lam, int(c.mask.sum()), s["aux"], s["acc"], s.get("asr"), s.get("asr_clean")))
    return SweepResult(curve, layer, config, int(x.numel()), str(attack.task) if attack else None, len(aux),
                       len(test))
