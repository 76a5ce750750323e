"""Evaluate a checkpoint: what it is (from its metadata, or the caller's overrides) and its ACC/ASR."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attack import AttackTask
from .auxdata import AuxSet, load_aux
from .checkpoint import Checkpoint, ModelMeta, ModelSource, conformed_model, dataset_spec, load_checkpoint
from .datasets import Split, load_dataset
from .errors import ConfigError, opt
from .loading import LoadedModel
from .metrics import EvalResult, der, evaluate
from .triggers import Trigger, TriggerSpec, load_trigger_image, make_trigger, parse_pos


@dataclass(frozen=True)
class AttackSpec:
    """The attack to measure: its task, and its trigger by spec (or, for a trigger an auditor suspects, built
    from their image: ``stamp``)."""

    task: AttackTask
    trigger: TriggerSpec
    stamp: Trigger | None = None

    def build(self, shape: tuple[int, int, int]) -> Trigger:
        return self.stamp if self.stamp is not None else make_trigger(self.trigger, *shape[1:], channels=shape[0])

    @property
    def label(self) -> str:
        """The trigger in words: its spec, or the suspected image's path."""
        return self.stamp.name if self.stamp is not None else str(self.trigger)


def resolve_attack(ckpt: Checkpoint, num_classes: int, attack: str | None = None, trigger: str | None = None, *,
                   alpha: float | None = None, pos: str | None = None) -> AttackSpec | None:
    """The attack to measure: the options if given ("none" turns it off), else the metadata's (its trigger with
    its recorded settings: a blend's weight and image, a checkerboard's place)."""
    if attack is not None and attack.lower() == "none":
        return None
    task, _ = ckpt.attack
    text = attack or task
    if text is None:
        return None
    recorded = ckpt.meta.get("attack") or {}
    if trigger is None and alpha is None and pos is None:
        spec = TriggerSpec.from_record(recorded)
    else:
        name = trigger or recorded.get("trigger") or "cba"
        base = TriggerSpec.from_record(recorded, name)
        spec = TriggerSpec(name, alpha if alpha is not None else base.alpha, base.image,
                           parse_pos(pos) if pos is not None else base.pos)
    spec.check()
    return AttackSpec(AttackTask.parse(text, num_classes), spec)


@dataclass(frozen=True)
class CheckpointEval:
    """One model measured: what it is, the attack it was measured with, the result; with a reference model, the
    reference measured under the same attack on the same test set."""

    meta: ModelMeta
    attack: AttackSpec | None
    result: EvalResult
    notes: tuple[str, ...] = ()  # how the checkpoint was read (formats.align)
    path: Path | None = None
    reference: EvalResult | None = None
    reference_path: Path | None = None

    def record(self) -> dict[str, Any]:
        """The JSON/CSV layout of `flain eval` (docs/cli.md): one flat object per model."""
        res, attack = self.result, self.attack
        row: dict[str, Any] = {
            "model": None if self.path is None else str(self.path), "dataset": self.meta.dataset,
            "arch": self.meta.arch, "attack": str(attack.task) if attack else None,
            "trigger": attack.label if attack else None, "acc": res.acc, "asr": res.asr, "asr_all": res.asr_all,
            "ra": res.ra, "asr_clean": res.asr_clean, "n_clean": res.n_clean, "n_triggered": res.n_triggered,
            "n_all": res.n_all}
        ref = self.reference
        if ref is not None:
            row |= {"reference": str(self.reference_path), "d_acc": res.acc - ref.acc,
                    "d_asr": None if res.asr is None or ref.asr is None else res.asr - ref.asr,
                    "der": der(ref, res), "der_all": der(ref, res, all_classes=True)}
        return row | {"per_class_acc": list(res.per_class_acc), "notes": list(self.notes)}


def load_test_file(path: Path, meta: ModelMeta) -> Split:
    """A test set in the aux-file format (.safetensors/.npz with images and labels)."""
    aux = load_aux(path, meta.input_shape, meta.num_classes, list(meta.class_names) if meta.class_names else None)
    return Split(aux.images, aux.labels)


def evaluate_checkpoint(path: Path, *, source: ModelSource = ModelSource(), data_dir: Path | None = None,
                        attack: str | None = None, trigger: str | None = None,
                        device: torch.device | str = "cpu", test: Split | None = None, test_file: Path | None = None,
                        trigger_image: Path | None = None, trigger_mask: Path | None = None,
                        trigger_alpha: float | None = None, trigger_pos: str | None = None,
                        tests: dict[str, Split] | None = None, attack_spec: AttackSpec | None = None) -> CheckpointEval:
    """ACC on the clean test split (or ``test``/``test_file``), the ASRs and RA of the known (or given) attack.

    ``source`` says what the file does not (architecture, dataset...: `ModelSource`). ``trigger``,
    ``trigger_alpha`` and ``trigger_pos`` choose a built-in trigger and its settings. ``trigger_image`` (with
    ``trigger_mask``, or its alpha channel): a trigger the user suspects, stamped, measured for the task of
    ``attack`` (SRC:TGT or all:TGT), instead of a built-in one; with ``trigger="blend"``, the image is blended
    over the whole input instead (``trigger_alpha``). ``tests``: test sets already read, by dataset name or test
    file (filled as they are read). ``attack_spec``: measure this attack, whatever the options and metadata say.
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
    if attack_spec is not None:
        spec_attack: AttackSpec | None = attack_spec
    elif trigger_image is not None and trigger == "blend":
        spec_attack = resolve_attack(ckpt, meta.num_classes, attack)
        assert spec_attack is not None  # an attack was given
        spec_attack = AttackSpec(spec_attack.task, TriggerSpec("blend", trigger_alpha, str(trigger_image)))
        spec_attack.trigger.check()
    elif trigger_image is not None:
        if trigger_alpha is not None or trigger_pos is not None:
            raise ConfigError(f"shape built-in triggers; a suspected {opt('trigger_image')} is stamped as drawn",
                              param="trigger_alpha" if trigger_alpha is not None else "trigger_pos")
        spec_attack = resolve_attack(ckpt, meta.num_classes, attack)
        assert spec_attack is not None
        spec_attack = AttackSpec(spec_attack.task, spec_attack.trigger,
                                 load_trigger_image(trigger_image, spec.shape, trigger_mask))
    else:
        spec_attack = resolve_attack(ckpt, meta.num_classes, attack, trigger, alpha=trigger_alpha, pos=trigger_pos)
    if test is None:
        tests = {} if tests is None else tests
        key = str(test_file) if test_file else dataset
        if key not in tests:
            tests[key] = load_test_file(test_file, meta) if test_file else load_dataset(dataset, data_dir).test
        test = tests[key]
    trig = spec_attack.build(spec.shape) if spec_attack else None
    result = evaluate(model, test, spec, spec_attack.task if spec_attack else None, trig, device)
    return CheckpointEval(meta, spec_attack, result, ckpt.notes, Path(path))


def evaluate_checkpoints(paths: list[Path], *, reference: Path | None = None, **options: Any) -> list[CheckpointEval]:
    """`evaluate_checkpoint` for each of ``paths`` (same ``options``), each test set read once; with ``reference``,
    that model measured as well under each model's attack (once per attack and test set), for the changes and DER.

    Example: ``evaluate_checkpoints([Path("final.safetensors"), Path("clean.safetensors")],
    reference=Path("final.safetensors"))[1].record()["der"]``.
    """
    tests: dict[str, Split] = {}
    references: dict[str, EvalResult] = {}
    out = []
    for path in paths:
        report = evaluate_checkpoint(path, tests=tests, **options)
        if reference is not None:
            key = f"{report.meta.test_dataset(path)}|{report.attack.task if report.attack else None}|" \
                  f"{report.attack.label if report.attack else None}"
            if key not in references:
                ref_options = {k: v for k, v in options.items() if k in ("source", "data_dir", "device", "test_file")}
                references[key] = evaluate_checkpoint(reference, tests=tests, attack_spec=report.attack,
                                                      **ref_options).result
            report = dataclasses.replace(report, reference=references[key], reference_path=Path(reference))
        out.append(report)
    return out


def attack_sets(test: Split, attack: AttackSpec | None, shape: tuple[int, int, int]) -> dict[str, AuxSet]:
    """The image sets a defense is scored on, named as the sweep's columns: ``acc`` (the clean test images), and
    with an attack ``asr`` (the source-class images with the full trigger, labelled with the target) and
    ``asr_clean`` (the same images without it, labelled with the target: ASR's floor)."""
    sets = {"acc": AuxSet(test.images, test.labels, "test")}
    if attack is not None:
        trigger = attack.build(shape)
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
    stamp = spec.build(meta.input_shape) if spec else None
    return evaluate(model, test, dataset_spec(meta), spec.task if spec else None, stamp, device)
