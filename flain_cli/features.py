"""The defended layer's inputs on an image set, computed once, and the network from that layer on:
aux accuracy, output divergence and the repair for any new weight of the layer (:class:`AuxFeatures`).

The layers before the defended layer never change during the search, so their output on the aux set
(the layer's inputs x) is computed once; each candidate weight only re-runs the network from the
defended layer on. Works on any model :mod:`flain_cli.modeldef` can cut (built-in or --model-def).
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call

from .auxdata import AuxSet, patched_copies
from .checkpoint import ModelMeta
from .datasets import normalize
from .modeldef import get_linear, split_model
from .repair import RepairResult, distill_repair
from .settings import RepairSettings

# premise_warnings: fewer than this share of inputs with a mean at most this fraction of the median mean
NEAR_SILENT_SHARE, NEAR_SILENT_OF_MEDIAN = 0.01, 0.05


def near_silent(means: torch.Tensor) -> int:
    """How many inputs have a mean activation at most NEAR_SILENT_OF_MEDIAN of the median one."""
    return int((means <= NEAR_SILENT_OF_MEDIAN * means.median()).sum())


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
        """Where the aux set shows that FLAIN's premise (a backdoor in inputs silent on clean data) may not hold:
        inputs that take negative values (a low mean is then no silence), or almost no near-silent input (fewer
        than NEAR_SILENT_SHARE of them have a mean at most NEAR_SILENT_OF_MEDIAN of the median mean). The
        second fired on 3 of the 5 generality-grid cells whose backdoor the default rule left in, and on 1 of
        the 7 where it removed it (docs/results.md, "When FLAIN cannot be trusted")."""
        low = float(self.features64.min())
        if low < 0:
            return [f"the inputs of {self.layer} take negative values on the aux set (down to {low:.3g}): FLAIN "
                    f"assumes non-negative activations (after a ReLU), so a low mean does not mean a silent neuron "
                    f"here; choose a layer that follows a ReLU (--layer), or try --method fine-pruning"]
        means = self.features64.mean(dim=0)
        near = near_silent(means)
        if near < NEAR_SILENT_SHARE * means.numel():
            return [f"only {near} of the {means.numel()} inputs of {self.layer} are near-silent on the aux set (mean "
                    f"at most {NEAR_SILENT_OF_MEDIAN:g} of the median): FLAIN's premise, a backdoor in inputs "
                    f"silent on clean data, is not visible here and its result may keep the backdoor; compare "
                    f"with --method fine-pruning and measure ASR (flain eval)"]
        return []

    def mean_activations(self, shifts: int) -> torch.Tensor:
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
    def shift_divergence(self) -> float:
        """The model's own output scale: the mean KL(original || original on the aux images moved by one pixel),
        over the four one-pixel moves (black border, AuxSet.translations). The kl stop's unit "shift"."""
        teacher = torch.log_softmax(self.original_logits(), 1)
        weight = self.linear.weight.detach().double().to(self.features64.device)
        moves = list(self.aux.translations(1))  # offsets (dy, dx) in [-1, 1]^2, row by row: 3 (dy + 1) + dx + 1
        kls = []
        for moved in (moves[1], moves[7], moves[3], moves[5]):  # up, down, left, right
            logp = torch.log_softmax(self.rest(torch.addmm(self.bias, self.features_of(moved), weight.T)), 1)
            kls.append(float(torch.nn.functional.kl_div(logp, teacher, log_target=True, reduction="batchmean")))
        return sum(kls) / len(kls)

    @torch.no_grad()
    def agreement(self) -> float:
        """Share of the aux images on which the outputs last scored pick the original model's class."""
        if self._logits is None:
            raise RuntimeError("agreement() before any accuracy(): nothing scored yet")
        return float((self._logits.argmax(1) == self.original_logits().argmax(1)).double().mean())

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
    def accuracy_of(self, tensors: dict[str, torch.Tensor]) -> float:
        """Accuracy with the defended layer's weight and bias and any parameters of the layers after it taken from
        ``tensors`` (by the model's names, as :meth:`repair` gives them), float64 from the layer on."""
        device = self.features64.device
        weight = tensors.get(f"{self.layer}.weight", self.linear.weight.detach()).to(device, torch.float64)
        bias = tensors.get(f"{self.layer}.bias")
        bias = self.bias if bias is None else bias.to(device, torch.float64)
        names = dict(self.rest.named_parameters())
        head = {k: v.to(device, torch.float64) for k, v in tensors.items() if k in names}
        self.evaluations += 1
        self._logits = functional_call(self.rest, head, (torch.addmm(bias, self.features64, weight.T),))
        return float((self._logits.argmax(dim=1) == self.labels).double().mean())

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
               activations: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], RepairResult]:
        """The distillation repair on these aux images (:func:`distill_repair`): new named tensors, and the run.

        The teacher is the model as loaded; ``weight`` is the defended layer after the search,
        ``frozen`` its changed columns and ``activations`` the search's mean activations (the
        guard's candidates; default: these images' own).
        """
        teacher = self.original_logits()
        has_bias = self.linear.bias is not None
        result = distill_repair(self.features64, self.labels, teacher, weight.to(self.features64.device),
                                self.bias if has_bias else None, self.rest, frozen.to(self.features64.device),
                                settings, self.mean_activations(0) if activations is None else activations,
                                self.patched_features(settings.patches) if settings.patches else None)
        out = {f"{self.layer}.weight": result.weight.cpu()}
        if result.bias is not None:
            out[f"{self.layer}.bias"] = result.bias.cpu()
        # the head shares the model's modules under their own names (fc2.weight...): see split_model
        return out | {name: value.cpu() for name, value in result.head.items()}, result




class FeatureSets:
    """Several image sets (the aux set, clean test images, triggered ones...) pushed once through the layers
    before ``layer``; the share of each that the model gets right with a new defended layer. `flain sweep` and
    the labs in experiments/ score every candidate this way."""

    def __init__(self, model: torch.nn.Module, layer: str, sets: dict[str, AuxSet], meta: ModelMeta,
                 device: torch.device | str = "cpu") -> None:
        self.sets = {name: AuxFeatures(model, layer, images, meta, device) for name, images in sets.items()}

    def __getitem__(self, name: str) -> AuxFeatures:
        return self.sets[name]

    def scores(self, weight: torch.Tensor, changed: torch.Tensor | None = None, scale: float = 1.0) -> dict[str, float]:
        """Each set's accuracy with the layer's weight ``scale * weight`` (AuxFeatures.accuracy: incremental)."""
        return {name: f.accuracy(weight, changed, scale) for name, f in self.sets.items()}

    def scores_of(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each set's accuracy with the layer and the layers after it from ``tensors`` (AuxFeatures.accuracy_of)."""
        return {name: f.accuracy_of(tensors) for name, f in self.sets.items()}
