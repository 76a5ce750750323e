"""Scan and defend checkpoints: load the model and the aux set (:mod:`flain_cli.loading`), push the aux
set through the layers before the defended one once (:mod:`flain_cli.features`), then call the pure
search (:mod:`flain_cli.defense`) and the repair.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .auxdata import AuxSet
from .catalog import METHODS
from .checkpoint import ModelMeta, ModelSource
from .defense import SearchResult, search_fast, search_plain
from .errors import AuxError, ConfigError, opt
from .features import AuxFeatures
from .loading import check_finite, load_aux_for, load_init, load_model, resize_notes
from .modeldef import get_linear
from .peers import TuneResult, fine_tune, rnp_mask
from .records import AuxRecord, DefenseRecord
from .repair import RepairResult
from .settings import DEFAULT, AccuracyStop, DefenseConfig, KlStop


@dataclass(frozen=True)
class ScanResult:
    meta: ModelMeta
    layer: str
    means: torch.Tensor
    n_aux: int
    aux_acc: float
    notes: tuple[str, ...] = ()  # how the checkpoint was read (formats.align)
    warnings: tuple[str, ...] = ()


def scan_checkpoint(path: Path, aux_path: Path, *, layer: str | None = None, source: ModelSource = ModelSource(),
                    shifts: int = DEFAULT.shifts, device: torch.device | str = "cpu") -> ScanResult:
    """Mean activation of each input of ``layer`` over the aux set: the statistic FLAIN thresholds.

    Args: the checkpoint, the aux set (folder or file, :func:`flain_cli.auxdata.load_aux`);
    ``layer`` (default: the checkpoint's defended layer); ``source`` for what the file does not say;
    ``shifts``: the means over moved copies of the aux images too, as `DefenseConfig.shifts`.
    Returns a `ScanResult` (``means``: one float per input of the layer, in column order).

    Example: ``scan_checkpoint(Path("final.safetensors"), Path("aux")).means.argsort()[:10]``, the
    ten most silent inputs.
    """
    loaded = load_model(path, source, device)
    check_finite(loaded.ckpt, opt("path"))
    layer = layer or loaded.meta.defended_layer
    aux = load_aux_for(loaded, aux_path)
    feats = AuxFeatures(loaded.model, layer, aux, loaded.meta, device)
    return ScanResult(loaded.meta, layer, feats.mean_activations(shifts), len(aux),
                      feats.accuracy_model(get_linear(loaded.model, layer).weight.detach()),
                      loaded.ckpt.notes + (f"defended layer: {layer}",) * bool(loaded.meta.model_def)
                      + tuple(resize_notes(aux, loaded.meta)),
                      tuple(feats.premise_warnings()))


@dataclass(frozen=True)
class DefendOutcome:
    meta: dict[str, Any]  # metadata of the defended checkpoint (its "defense" is ``record.to_json()``)
    state: dict[str, torch.Tensor]
    result: SearchResult | None  # the search, with its trace (None: the method does not search)
    record: DefenseRecord  # every setting and what was found; ``record.warnings``: the result may be wrong
    seconds: float
    notes: tuple[str, ...] = ()  # how MODEL was read (format, prefixes, dtype): stderr and --json


REPAIR_TUNED_PER_CLASS = 50  # above this many aux images per class, the repair is past what it was tuned on


def aux_warnings(aux: AuxSet, num_classes: int) -> list[str]:
    """Refuse an aux set of one class; warn about missing classes and very small sets."""
    present = sorted(set(aux.labels.tolist()))
    if len(present) < 2:
        raise AuxError(f"aux set {aux.source} holds images of class {present[0]} only; the stopping rule needs "
                       f"clean images of every class: export one with `flain aux export --per-class 20`")
    found = []
    if len(present) < num_classes:
        missing = sorted(set(range(num_classes)) - set(present))
        found.append(f"the aux set has no images of class {', '.join(map(str, missing[:10]))}"
                     f"{' ...' if len(missing) > 10 else ''} ({len(present)} of {num_classes} classes): the "
                     f"search cannot see the damage it does to those classes")
    if len(aux) < 5 * num_classes:
        found.append(f"the aux set holds only {len(aux)} images ({num_classes} classes); the paper uses 20 per "
                     f"class, and fewer make the stopping rule coarse")
    return found


def search_warnings(result: SearchResult, config: DefenseConfig, layer: str) -> list[str]:
    """What the search's outcome may hide: every input selected, or a step far past the paper's rho."""
    if result.all_selected:
        done = "flipped" if config.method == "flain" else "pruned"
        return [f"all {result.mask.numel()} inputs of {layer} were selected before the {config.stop.name} stop "
                f"fired ({config.stop.describe()}); the whole layer was {done}"]
    if isinstance(config.stop, AccuracyStop) and result.acc0 - result.acc_kept > config.stop.rho + 0.1:
        return [f"the kept threshold cost {100 * (result.acc0 - result.acc_kept):.1f} points of aux accuracy "
                f"({config.stop.describe()}): the search jumped far past rho at one step; try a smaller --step "
                f"or --select last-safe"]
    return []


def repair_warnings(run: RepairResult | TuneResult) -> list[str]:
    """Say when the repair (or fine-tuning) diverged and ran again at a lower learning rate (or not at all)."""
    if not run.diverged:
        return []
    what = "fine-tuning" if isinstance(run, TuneResult) else "repair"
    tried = ", ".join(f"lr {lr:.3g} (its loss {run.loss_before:.3g} -> {after:.3g})" for lr, after in run.diverged)
    kept = (f"kept the run at lr {run.lr:.3g}" if run.lr else
            "kept the model without fine-tuning" if what == "fine-tuning" else "kept the layers without the repair")
    return [f"the {what} diverged at {tried}; {kept} (--repair-backtrack)"]


def defend_checkpoint(path: Path, init_path: Path | None, aux_path: Path, config: DefenseConfig = DEFAULT,
                      *, layer: str | None = None, source: ModelSource = ModelSource(), plain: bool = False,
                      seed: int = 0, device: torch.device | str = "cpu") -> DefendOutcome:
    """Apply FLAIN (or pruning), and the repair if ``config`` asks for it, to the checkpoint at ``path``.

    Nothing is written here. Args: the checkpoint, its initial checkpoint W0 and the aux set;
    ``config`` (default: the default preset; ``PRESETS["paper"]`` is Algorithm 1 exactly; ``defense_config``
    builds any other);
    ``layer`` (default: the checkpoint's defended layer); ``source`` for what the file does not say
    (architecture, dataset, normalization...: `ModelSource`); ``init_path`` may be None
    for ``method="prune"`` (it zeroes columns, W0 plays no part). Checkpoints of any supported format
    and floating dtype are read (:mod:`flain_cli.formats`); the work is done in float32/float64 and
    the result is cast back to the model's dtype; ``plain`` runs Algorithm 1 one threshold at a time
    (same result, slow);
    ``seed`` draws the ``holdout`` split. Returns the new tensors, their metadata and the search.

    Example: ``defend_checkpoint(Path("final.safetensors"), Path("init.safetensors"), Path("aux"),
    PRESETS["paper"])``.
    """
    started = time.perf_counter()
    config.check()
    method = METHODS.get(config.method)
    if init_path is None and method.needs_init:
        raise ConfigError(f"is needed for method {config.method}: FLAIN flips the updates W - W0, so it needs "
                          "W0, the model before training (the other methods work without it)", param="init_path")
    loaded = load_model(path, source, device)
    check_finite(loaded.ckpt, opt("path"))
    init = None
    if init_path is not None:
        init = load_init(init_path, loaded, strict=source.strict)
    layer = layer or loaded.meta.defended_layer
    aux = load_aux_for(loaded, aux_path)
    warnings = aux_warnings(aux, loaded.meta.num_classes)
    if method.train == "repair" and config.repair is not None and \
            len(aux) > REPAIR_TUNED_PER_CLASS * loaded.meta.num_classes:
        warnings.append(f"the repair was tuned on 20 aux images per class; with {len(aux)} images it brought the "
                        f"backdoor back on one of our trainings (ASR 0.025 after the flip, 0.389 after the repair, "
                        f"docs/results.md): check ASR, or pass --repair none")
    every = AuxFeatures(loaded.model, layer, aux, loaded.meta, device)
    warnings += every.premise_warnings()
    weight = loaded.ckpt.tensors[f"{layer}.weight"]
    init_weight = init.tensors[f"{layer}.weight"] if init is not None else torch.zeros_like(weight)
    feats, x, result, kl_scale = every, None, None, None
    if method.select in ("search", "rnp"):
        if config.holdout:
            activation_set, scoring_set = aux.split(config.holdout, seed)
            ranking = AuxFeatures(loaded.model, layer, activation_set, loaded.meta, device)
            feats = AuxFeatures(loaded.model, layer, scoring_set, loaded.meta, device)
        else:  # the paper: one aux set for both
            ranking = feats
        if method.select == "rnp":  # the inputs ranked by RNP's recovered mask instead of their mean activation
            x = rnp_mask(loaded.model, layer, ranking.inputs, ranking.labels).ranking.float().cpu()
        else:
            x = ranking.mean_activations(config.shifts)
        search = search_plain if plain else search_fast  # plain: Algorithm 1 as written (slow; for verification)
        evaluate = feats.accuracy_full if plain else feats.accuracy
        searched = config
        if isinstance(config.stop, KlStop) and config.stop.unit == "shift":  # the budget in the model's own unit
            kl_scale = feats.shift_divergence()
            searched = replace(config, stop=config.stop.in_nats(kl_scale))
        result = search(weight, init_weight, x, evaluate, searched, divergence=feats.divergence)
        warnings += search_warnings(result, config, layer)
        mask, new_weight = result.mask, result.weight
    else:
        mask, new_weight = torch.zeros(weight.shape[1], dtype=torch.bool), weight
    state = dict(loaded.ckpt.tensors)
    state[f"{layer}.weight"] = new_weight.contiguous()
    aux_acc_selected = every.accuracy_model(state)
    aux_acc_flipped = None
    if method.train == "repair" and config.repair is not None:
        aux_acc_flipped = aux_acc_selected
        repaired, run = every.repair(new_weight, mask, config.repair, x)
        state |= {name: value.to(state[name].dtype).contiguous() for name, value in repaired.items()}
        warnings += repair_warnings(run)
    elif method.train == "finetune" and config.repair is not None:
        aux_acc_flipped = aux_acc_selected
        start = copy.deepcopy(loaded.model)
        start.load_state_dict(state)
        frozen = {f"{layer}.weight": mask.view(1, -1).expand_as(new_weight).to(every.inputs.device)}
        tuned = fine_tune(start, every.inputs, every.labels, config.repair, frozen)
        state = {name: tuned.state[name].to(state[name].dtype).contiguous() for name in state}
        warnings += repair_warnings(tuned)
    aux_acc_after = every.accuracy_model(state)
    notes = list(loaded.ckpt.notes) + resize_notes(aux, loaded.meta)
    if loaded.meta.model_def:
        notes.append(f"ran {loaded.meta.model_def['spec']} to build the model; defended layer: {layer}")
    if loaded.ckpt.dtype not in ("float32", "mixed"):
        dtype = getattr(torch, loaded.ckpt.dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        notes.append(f"written as {loaded.ckpt.dtype}, like MODEL (aux accuracy above is the float32 model's)")
    acc0 = every.accuracy_model({})
    record = DefenseRecord(
        config, layer, result.lam if result else None, result.mu if result else None, int(mask.sum()),
        int(weight.shape[1]), tuple(torch.nonzero(mask).flatten().tolist()),
        result.all_selected if result else False, result.acc0 if result else acc0,
        result.acc_kept if result else aux_acc_selected, result.kl_kept if result else None, aux_acc_flipped,
        aux_acc_after, result.steps if result else 0, result.evaluations if result else 0, seed, tuple(warnings),
        AuxRecord(aux.source, len(aux), int(feats.labels.numel()), aux.resized), kl_scale)
    meta = {key: value for key, value in loaded.ckpt.meta.items() if key not in ("metrics",)} | loaded.meta.to_json()
    meta |= {
        "role": "defended",
        "parents": {"final": loaded.ckpt.sha256, "init": init.sha256 if init is not None else None},
        "source": {"format": loaded.ckpt.format, "dtype": loaded.ckpt.dtype, "notes": notes},
        "defense": record.to_json(),
    }
    return DefendOutcome(meta, state, result, record, time.perf_counter() - started, tuple(notes))
