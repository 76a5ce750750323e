"""Evaluate a checkpoint: what it is (from its metadata, or the caller's overrides) and its ACC/ASR."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .attack import AttackTask
from .auxdata import AuxSet, load_aux
from .checkpoint import Checkpoint, ModelMeta, ModelSource, conformed_model, dataset_spec, load_checkpoint
from .datasets import Split, load_dataset
from .errors import ConfigError, opt
from .loading import LoadedModel
from .metrics import EvalResult, evaluate
from .triggers import AnyTrigger, load_trigger_image, make_trigger


@dataclass(frozen=True)
class AttackSpec:
    task: AttackTask
    trigger: str


def resolve_attack(ckpt: Checkpoint, num_classes: int, attack: str | None = None,
                   trigger: str | None = None) -> AttackSpec | None:
    """The attack to measure: the options if given ("none" turns it off), else the metadata's."""
    if attack is not None and attack.lower() == "none":
        return None
    task, recorded_trigger = ckpt.attack
    text = attack or task
    if text is None:
        return None
    return AttackSpec(AttackTask.parse(text, num_classes), trigger or recorded_trigger or "cba")


@dataclass(frozen=True)
class CheckpointEval:
    meta: ModelMeta
    attack: AttackSpec | None
    result: EvalResult
    notes: tuple[str, ...] = ()  # how the checkpoint was read (formats.align)


def load_test_file(path: Path, meta: ModelMeta) -> Split:
    """A test set in the aux-file format (.safetensors/.npz with images and labels)."""
    aux = load_aux(path, meta.input_shape, meta.num_classes, list(meta.class_names) if meta.class_names else None)
    return Split(aux.images, aux.labels)


def evaluate_checkpoint(path: Path, *, source: ModelSource = ModelSource(), data_dir: Path | None = None,
                        attack: str | None = None, trigger: str | None = None,
                        device: torch.device | str = "cpu", test: Split | None = None, test_file: Path | None = None,
                        trigger_image: Path | None = None, trigger_mask: Path | None = None) -> CheckpointEval:
    """ACC on the clean test split (or ``test``/``test_file``) and ASR of the known (or given) attack.

    ``source`` says what the file does not (architecture, dataset...: `ModelSource`).
    ``trigger_image`` (with ``trigger_mask``, or its alpha channel): a trigger the user suspects,
    measured for the task of ``attack`` (SRC:TGT or all:TGT), instead of a built-in one.
    """
    if trigger_image is not None and (attack is None or attack.lower() == "none"):
        raise ConfigError(f"needs {opt('attack')} SRC:TGT (or all:TGT): the target class its ASR counts",
                          param="trigger_image")
    if trigger_mask is not None and trigger_image is None:
        raise ConfigError(f"goes with {opt('trigger_image')}", param="trigger_mask")
    ckpt = load_checkpoint(path)
    meta = source.meta_for(ckpt)
    dataset = meta.test_dataset(path)
    spec = dataset_spec(meta)
    ckpt, model = conformed_model(ckpt, meta, device, strict=source.strict)
    spec_attack = resolve_attack(ckpt, meta.num_classes, attack, str(trigger_image) if trigger_image else trigger)
    if test is None:
        test = load_test_file(test_file, meta) if test_file else load_dataset(dataset, data_dir).test
    trig: AnyTrigger | None
    if trigger_image is not None:
        trig = load_trigger_image(trigger_image, spec.shape, trigger_mask)
    else:
        trig = make_trigger(spec_attack.trigger, *spec.shape[1:]) if spec_attack else None
    result = evaluate(model, test, spec, spec_attack.task if spec_attack else None, trig, device)
    return CheckpointEval(meta, spec_attack, result, ckpt.notes)


def attack_sets(test: Split, attack: AttackSpec | None, shape: tuple[int, int, int]) -> dict[str, AuxSet]:
    """The image sets a defense is scored on, named as the sweep's columns: ``acc`` (the clean test images), and
    with an attack ``asr`` (the source-class images with the full trigger, labelled with the target) and
    ``asr_clean`` (the same images without it, labelled with the target: ASR's floor)."""
    sets = {"acc": AuxSet(test.images, test.labels, "test")}
    if attack is not None:
        trigger = make_trigger(attack.trigger, *shape[1:])
        is_source = attack.task.is_source(test.labels)
        target = torch.full((int(is_source.sum()),), attack.task.target, dtype=torch.long)
        sets["asr"] = AuxSet(trigger.stamp(test.images[is_source]), target, "triggered source images")
        sets["asr_clean"] = AuxSet(test.images[is_source], target, "source images")
    return sets


def evaluate_loaded(loaded: LoadedModel, test: Split, tensors: dict[str, torch.Tensor] | None = None,
                    device: torch.device | str = "cpu", attack: str | None = None,
                    trigger: str | None = None) -> EvalResult:
    """ACC and ASR (of the attack its metadata records, or ``attack``/``trigger`` as `flain eval` takes them) of a
    loaded model, or of the model with ``tensors`` (e.g. a defense's ``state``) in place of its own; the model
    itself is left as it was. The labs' one score function."""
    meta = loaded.meta
    spec = resolve_attack(loaded.ckpt, meta.num_classes, attack, trigger)
    model = loaded.model
    if tensors is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(tensors)
    stamp = make_trigger(spec.trigger, *meta.input_shape[1:]) if spec else None
    return evaluate(model, test, dataset_spec(meta), spec.task if spec else None, stamp, device)
