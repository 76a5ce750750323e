"""Scan and defend checkpoints: load the model and the aux set, then call the pure search.

The layers before the defended layer never change during the search, so their output on the
aux set (the layer's inputs x) is computed once; each candidate weight only re-runs the network
from the defended layer on (:class:`AuxFeatures`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from .auxdata import AuxSet, load_aux, patched_copies
from .checkpoint import Checkpoint, ModelMeta, ModelSource, conform, conformed_model, load_checkpoint
from .datasets import normalize
from .defense import SearchResult, search_fast, search_plain
from .errors import AuxError, CheckpointError, ConfigError, opt
from .modeldef import get_linear, split_model
from .records import AuxRecord, DefenseRecord
from .repair import distill_repair
from .settings import PRESETS, DefenseConfig, RepairSettings


@dataclass(frozen=True)
class LoadedModel:
    ckpt: Checkpoint
    meta: ModelMeta
    model: torch.nn.Module


def load_model(path: Path, source: ModelSource = ModelSource(), device: torch.device | str = "cpu") -> LoadedModel:
    """Read a checkpoint in any supported format, align it to its architecture, and build the model.

    ``source`` says what the file does not (`ModelSource`). ``ckpt.tensors`` of the result are under
    the architecture's names, floating ones as float32.
    """
    ckpt = load_checkpoint(path)
    meta = source.meta_for(ckpt)
    ckpt, model = conformed_model(ckpt, meta, device, strict=source.strict)
    return LoadedModel(ckpt, meta, model)


def load_aux_for(loaded: LoadedModel, aux_path: Path) -> AuxSet:
    meta = loaded.meta
    if meta.normalization is None:
        raise AuxError(f"{loaded.ckpt.path} does not say how its inputs are normalized; pass {opt('dataset')}")
    return load_aux(aux_path, meta.input_shape, meta.num_classes, list(meta.class_names) if meta.class_names else None)


class AuxFeatures:
    """The aux set pushed once through the layers before ``layer``; aux accuracy for any new weight.

    The search evaluates the defended layer and everything after it in float64. :meth:`accuracy`
    keeps the layer's pre-activation and, for a new weight, adds only the change of the columns
    that differ from the last weight it saw, so a step that selects a few more neurons costs a
    few columns, not the whole layer. :meth:`accuracy_full` computes the same from scratch
    through the whole network. In float64 the two agree to ~1e-15, far below any argmax tie,
    so both search loops see the same accuracies (a test checks it on trained models).
    """

    def __init__(self, model: torch.nn.Module, layer: str, aux: AuxSet, meta: ModelMeta,
                 device: torch.device | str = "cpu") -> None:
        self.linear = get_linear(model, layer)  # a Linear layer, or a clear error
        self.model, self.layer = model.eval(), layer
        self.aux, self.norm = aux, meta.norm
        self.inputs = aux.normalized(meta.norm.mean, meta.norm.std).to(device)
        self.labels = aux.labels.to(device)
        self.prefix, head = split_model(model, layer)
        self.rest = copy.deepcopy(head).double().eval()
        self.bias = (self.linear.bias.detach().double() if self.linear.bias is not None
                     else torch.zeros(self.linear.out_features, dtype=torch.float64, device=device))
        with torch.no_grad():
            self.features64 = self.prefix(self.inputs).double()
        self._weight: torch.Tensor | None = None  # the weight behind self._pre
        self._pre: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None  # the outputs last scored (for divergence)
        self._teacher_logp: torch.Tensor | None = None
        self.evaluations = 0

    def premise_warnings(self) -> list[str]:
        """FLAIN reads low mean activations as silent neurons: that needs non-negative inputs (after a ReLU)."""
        low = float(self.features64.min())
        if low < 0:
            return [f"the inputs of {self.layer} take negative values on the aux set (down to {low:.3g}): FLAIN "
                    f"assumes non-negative activations (after a ReLU), so a low mean does not mean a silent neuron "
                    f"here; choose a layer that follows a ReLU (--layer)"]
        return []

    def mean_activations(self, shifts: int = 0) -> torch.Tensor:
        """Mean of each input neuron of the layer over the aux set (x of eq. 6).

        ``shifts`` > 0 (ours, not in the paper): the mean over the aux images moved by every offset of up
        to ``shifts`` pixels in each direction ((2 shifts + 1)^2 copies, black border; AuxSet.translations).
        An input that clean images use somewhere near where the aux images have it then counts as used;
        a trigger stays where it is, so its inputs stay silent.
        """
        if not shifts:
            return self.features64.mean(dim=0).to(torch.float32).cpu()
        with torch.no_grad():
            sums = [self.features_of(moved).sum(dim=0) for moved in self.aux.translations(shifts)]
        return (torch.stack(sums).sum(dim=0) / (len(sums) * len(self.aux))).to(torch.float32).cpu()

    @torch.no_grad()
    def _score(self, pre: torch.Tensor) -> float:
        self.evaluations += 1
        self._logits = self.rest(pre)
        return float((self._logits.argmax(dim=1) == self.labels).double().mean())

    @torch.no_grad()
    def original_logits(self) -> torch.Tensor:
        """The model as loaded, on the aux set (float64): the kl stop's reference and the repair's teacher."""
        original = self.linear.weight.detach().double().to(self.features64.device)
        return self.rest(torch.addmm(self.bias, self.features64, original.T))

    @torch.no_grad()
    def divergence(self) -> float:
        """Mean KL(original || last scored) of the output distributions over the aux set (the kl stop)."""
        if self._teacher_logp is None:
            self._teacher_logp = torch.log_softmax(self.original_logits(), 1)
        if self._logits is None:
            raise RuntimeError("divergence() before any accuracy(): nothing scored yet")
        return float(torch.nn.functional.kl_div(torch.log_softmax(self._logits, 1), self._teacher_logp,
                                                log_target=True, reduction="batchmean"))

    @torch.no_grad()
    def accuracy(self, weight: torch.Tensor, changed: torch.Tensor | None = None, scale: float = 1.0) -> float:
        """Aux accuracy with the layer's weight replaced, updating only the changed columns.

        ``changed`` (from the search) names the columns that can differ from the last call;
        without it they are found by comparing the whole weight. ``scale`` scores
        ``scale * weight`` instead (the rescaled layer) without touching every column.
        """
        weight = weight.to(self.features64.device)
        if self._weight is None or self._pre is None:
            self._weight = weight.clone()
            self._pre = pre = torch.addmm(self.bias, self.features64, weight.double().T)
        else:
            pre = self._pre
            cols = changed if changed is not None else torch.nonzero((weight != self._weight).any(dim=0)).flatten()
            if len(cols):
                new, old = weight[:, cols], self._weight[:, cols]
                pre.addmm_(self.features64[:, cols], (new.double() - old.double()).T)
                self._weight[:, cols] = new
        return self._score(pre if scale == 1.0 else (pre - self.bias) * scale + self.bias)

    @torch.no_grad()
    def accuracy_full(self, weight: torch.Tensor, changed: torch.Tensor | None = None) -> float:
        """The same from scratch through the whole network, as Algorithm 1's Evaluate(theta*, psi)."""
        features = self.prefix(self.inputs).double()
        w = weight.to(features.device, torch.float64)
        return self._score(torch.addmm(self.bias, features, w.T))

    @torch.no_grad()
    def accuracy_model(self, tensors: torch.Tensor | dict[str, torch.Tensor]) -> float:
        """Aux accuracy of the model as it will be written (float32 forward pass).

        ``tensors``: the defended layer's new weight, or a state dict whose tensors replace the model's.
        """
        if isinstance(tensors, torch.Tensor):
            tensors = {f"{self.layer}.weight": tensors}
        logits = functional_call(self.model, {k: v.to(self.inputs.device) for k, v in tensors.items()},
                                 (self.inputs,))
        return float((logits.argmax(dim=1) == self.labels).float().mean())

    @torch.no_grad()
    def features_of(self, images: torch.Tensor) -> torch.Tensor:
        """The defended layer's inputs (float64) on other uint8 images, e.g. moved or patched aux images."""
        return self.prefix(normalize(images, self.norm.mean, self.norm.std).to(self.features64.device)).double()

    def patched_features(self, copies: int, batch: int = 2000) -> torch.Tensor:
        """The layer's inputs on ``copies`` patched copies of the aux images (:func:`patched_copies`, seed 0),
        copy after copy, for the repair's patch term; ``batch`` images at a time."""
        images = patched_copies(self.aux.images, copies)
        return torch.cat([self.features_of(images[i:i + batch]) for i in range(0, len(images), batch)])

    def repair(self, weight: torch.Tensor, frozen: torch.Tensor, settings: RepairSettings,
               activations: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The distillation repair on these aux images (:func:`distill_repair`), as new named tensors.

        The teacher is the model as loaded; ``weight`` is the defended layer after the search,
        ``frozen`` its changed columns and ``activations`` the search's mean activations (the
        guard's candidates; default: these images' own).
        """
        teacher = self.original_logits()
        has_bias = self.linear.bias is not None
        result = distill_repair(self.features64, self.labels, teacher, weight.to(self.features64.device),
                                self.bias if has_bias else None, self.rest, frozen.to(self.features64.device),
                                settings, self.mean_activations() if activations is None else activations,
                                self.patched_features(settings.patches) if settings.patches else None)
        out = {f"{self.layer}.weight": result.weight.cpu()}
        if result.bias is not None:
            out[f"{self.layer}.bias"] = result.bias.cpu()
        # the head shares the model's modules under their own names (fc2.weight...): see split_model
        return out | {name: value.cpu() for name, value in result.head.items()}


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
                    shifts: int = 0, device: torch.device | str = "cpu") -> ScanResult:
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
    result: SearchResult  # the search, with its trace
    record: DefenseRecord  # every setting and what was found; ``record.warnings``: the result may be wrong
    seconds: float
    notes: tuple[str, ...] = ()  # how MODEL was read (format, prefixes, dtype): stderr and --json


REPAIR_TUNED_PER_CLASS = 50  # above this many aux images per class, the repair is past what it was tuned on


def resize_notes(aux: AuxSet, meta: ModelMeta) -> list[str]:
    """Say so when aux images did not have the model's input size (they were resized, bilinear)."""
    if not aux.resized:
        return []
    _, height, width = meta.input_shape
    return [f"{aux.resized} of {len(aux)} aux images were resized to {width}x{height}, the model's input size"]


def check_finite(ckpt: Checkpoint, role: str) -> None:
    """Refuse a checkpoint with NaN or Inf in any floating tensor: every result from it would be garbage."""
    bad = [name for name, t in ckpt.tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{role} {ckpt.path} holds NaN or Inf in {', '.join(bad[:3])}{more}; "
                              f"use a checkpoint whose weights are all finite")


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


def load_init(path: Path, loaded: LoadedModel, *, strict: bool = True) -> Checkpoint:
    """The initial checkpoint W0, read and aligned like MODEL (same architecture, or a clear error)."""
    init = load_checkpoint(path)
    model = loaded.ckpt
    if model.arch and init.arch and model.arch != init.arch:
        raise CheckpointError(f"{model.path} is a {model.arch} but {opt('init_path')} {init.path} is a {init.arch}")
    init = conform(init, loaded.meta, strict=strict)
    check_finite(init, opt("init_path"))
    check_pair(model, init)
    return init


def check_pair(model: Checkpoint, init: Checkpoint) -> None:
    """MODEL and INIT (both aligned to one architecture) must hold the same tensor names and shapes."""
    names_m, names_i = set(model.tensors), set(init.tensors)
    if names_m != names_i:
        diff = sorted(names_m ^ names_i)
        raise CheckpointError(f"{model.path} and {opt('init_path')} {init.path} hold different tensors "
                              f"(e.g. {', '.join(diff[:3])}); pass the initial checkpoint of the same run")
    for name in sorted(names_m):
        if model.tensors[name].shape != init.tensors[name].shape:
            raise CheckpointError(f"{name} is {tuple(model.tensors[name].shape)} in {model.path} but "
                                  f"{tuple(init.tensors[name].shape)} in {opt('init_path')} {init.path}")
    if all(torch.equal(model.tensors[name], init.tensors[name]) for name in names_m):
        raise CheckpointError(f"{model.path} and {opt('init_path')} {init.path} hold the same weights: there are "
                              f"no updates to flip; pass the model before training as {opt('init_path')}")
    recorded = model.parent_init
    if recorded and model.role == "final" and init.sha256 is not None and recorded != init.sha256:
        raise CheckpointError(f"{model.path} was trained from an initial checkpoint with sha256 {recorded[:16]}..., "
                              f"but {opt('init_path')} {init.path} has sha256 {init.sha256[:16]}...; pass the "
                              f"init.safetensors written by the same `flain train` run")


def defend_checkpoint(path: Path, init_path: Path | None, aux_path: Path, config: DefenseConfig = PRESETS["default"],
                      *, layer: str | None = None, source: ModelSource = ModelSource(), plain: bool = False,
                      seed: int = 0, device: torch.device | str = "cpu") -> DefendOutcome:
    """Apply FLAIN (or pruning), and the repair if ``config`` asks for it, to the checkpoint at ``path``.

    Nothing is written here. Args: the checkpoint, its initial checkpoint W0 and the aux set;
    ``config`` (default: ``PRESETS["default"]``; ``PRESETS["paper"]`` is Algorithm 1 exactly);
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
    if config.repair is not None:
        config.repair.check()
    if init_path is None and config.method != "prune":
        raise ConfigError(f"is needed for method {config.method}: FLAIN flips the updates W - W0, so it needs "
                          "W0, the model before training (only method prune works without it)", param="init_path")
    loaded = load_model(path, source, device)
    check_finite(loaded.ckpt, opt("path"))
    init = None
    if init_path is not None:
        init = load_init(init_path, loaded, strict=source.strict)
    layer = layer or loaded.meta.defended_layer
    aux = load_aux_for(loaded, aux_path)
    warnings = aux_warnings(aux, loaded.meta.num_classes)
    if config.repair is not None and len(aux) > REPAIR_TUNED_PER_CLASS * loaded.meta.num_classes:
        warnings.append(f"the repair was tuned on 20 aux images per class; with {len(aux)} images it brought the "
                        f"backdoor back on one of our trainings (ASR 0.025 after the flip, 0.389 after the repair, "
                        f"docs/results.md): check ASR, or pass --repair none")
    every = AuxFeatures(loaded.model, layer, aux, loaded.meta, device)
    warnings += every.premise_warnings()
    if config.holdout:
        activation_set, scoring_set = aux.split(config.holdout, seed)
        x = AuxFeatures(loaded.model, layer, activation_set, loaded.meta, device).mean_activations(config.shifts)
        feats = AuxFeatures(loaded.model, layer, scoring_set, loaded.meta, device)
    else:  # the paper: one aux set for both
        feats = every
        x = feats.mean_activations(config.shifts)
    weight = loaded.ckpt.tensors[f"{layer}.weight"]
    init_weight = init.tensors[f"{layer}.weight"] if init is not None else torch.zeros_like(weight)
    search = search_plain if plain else search_fast  # plain: Algorithm 1 as written (slow; for verification)
    evaluate = feats.accuracy_full if plain else feats.accuracy
    result = search(weight, init_weight, x, evaluate, config, divergence=feats.divergence)
    if result.all_selected:
        budget = f"the aux accuracy dropped by rho={config.rho}" if config.stop == "accuracy" else \
            f"the outputs' divergence reached kl={config.kl}"
        warnings.append(f"all {result.mask.numel()} inputs of {layer} were selected before {budget}; the whole "
                        f"layer was {'flipped' if config.method == 'flain' else 'pruned'}")
    elif config.stop == "accuracy" and result.acc0 - result.acc_kept > config.rho + 0.1:  # rho: that stop's budget
        warnings.append(f"the kept threshold cost {100 * (result.acc0 - result.acc_kept):.1f} points of aux accuracy "
                        f"(rho {config.rho}): the search jumped far past rho at one step; try a smaller --step "
                        f"or --select last-safe")
    state = dict(loaded.ckpt.tensors)
    state[f"{layer}.weight"] = result.weight.contiguous()
    aux_acc_flipped = None
    if config.repair is not None:
        aux_acc_flipped = every.accuracy_model(state)
        repaired = every.repair(result.weight, result.mask, config.repair, x)
        state |= {name: value.to(state[name].dtype).contiguous() for name, value in repaired.items()}
    aux_acc_after = every.accuracy_model(state)
    notes = list(loaded.ckpt.notes) + resize_notes(aux, loaded.meta)
    if loaded.meta.model_def:
        notes.append(f"ran {loaded.meta.model_def['spec']} to build the model; defended layer: {layer}")
    if loaded.ckpt.dtype not in ("float32", "mixed"):
        dtype = getattr(torch, loaded.ckpt.dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        notes.append(f"written as {loaded.ckpt.dtype}, like MODEL (aux accuracy above is the float32 model's)")
    record = DefenseRecord(
        config, layer, result.lam, result.mu, result.changed, int(x.numel()),
        tuple(torch.nonzero(result.mask).flatten().tolist()), result.all_selected, result.acc0, result.acc_kept,
        result.kl_kept, aux_acc_flipped, aux_acc_after, result.steps, result.evaluations, seed, tuple(warnings),
        AuxRecord(aux.source, len(aux), int(feats.labels.numel()), aux.resized))
    meta = {key: value for key, value in loaded.ckpt.meta.items() if key not in ("metrics",)} | loaded.meta.to_json()
    meta |= {
        "role": "defended",
        "parents": {"final": loaded.ckpt.sha256, "init": init.sha256 if init is not None else None},
        "source": {"format": loaded.ckpt.format, "dtype": loaded.ckpt.dtype, "notes": notes},
        "defense": record.to_json(),
    }
    return DefendOutcome(meta, state, result, record, time.perf_counter() - started, tuple(notes))
