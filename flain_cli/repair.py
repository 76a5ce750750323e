"""Repair after flipping (not in the paper): win back clean accuracy on the aux set, keep the flip.

FLAIN's flip removes the backdoor, but the flipped columns still see small clean activations,
and on 200 aux images the stopping rule cannot see the damage that does to the test set
(docs/results.md). The repair distils the original model into the flipped one on the same aux
images, as fine-pruning fine-tunes after pruning:

- trainable: the defended layer's weight (except the flipped columns, which stay exactly as the
  flip left them), its bias, and every layer after it; the layers before it are not touched;
- loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``, the
  teacher being the model before the defense (it classifies clean images well; the trigger,
  which the aux set does not hold, is what it must not pass on);
- ``steps`` full-batch steps at ``lr``, in eval mode (no dropout) and float64: no data order and
  no randomness, so the result is a function of its inputs;
- the optimizer: Adam (the default), or SGD with momentum (``optimizer="sgd"``, ours, opt-in).
  Adam scales each parameter's step by its own gradient history, so the weights of an input that
  is nearly silent on the aux set move as much as those of a busy one; those near-silent inputs
  the search left unflipped are where a backdoor can come back. Under SGD each input's weights
  move in proportion to its activation (docs/results.md, "The repair's optimizer");
- the guard (opt-in, ``guard`` > 0): a second term, ``guard * T^2 * KL``, asks for the teacher's
  outputs also on perturbed copies of the aux inputs in which random low-activation inputs (the
  ``guard_ratio`` x flipped inputs of lowest mean activation, each with probability
  ``guard_rate``) are switched on at a typical strong activation (the median over inputs of their
  maximum on the aux set). A trigger is such a pattern; no trigger is known or used. Without it,
  the repair can bring part of a backdoor back through the inputs the search left unflipped
  (docs/results.md). The copies are drawn once from a fixed seed, so the result stays a function
  of the inputs.

Everything runs on the defended layer's inputs, computed once; nothing here reads files.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .settings import SGD_MOMENTUM, RepairSettings
from .signals import stop_if_signalled


@dataclass(frozen=True)
class RepairResult:
    weight: torch.Tensor  # the defended layer's new weight (float64)
    bias: torch.Tensor | None
    head: dict[str, torch.Tensor]  # the new parameters of the layers after it, by their names in ``head``
    loss_before: float
    loss_after: float
    lr: float = 0.0  # the learning rate the kept run trained at (backtracking may have lowered it)
    diverged: tuple[tuple[float, float], ...] = ()  # (lr, loss after) of each run that ended above loss_before

    @property
    def kept(self) -> bool:
        """Whether a run converged (else every run diverged and the layers are as they were given)."""
        return self.lr > 0


def repair_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                settings: RepairSettings) -> torch.Tensor:
    t = settings.temperature
    distill = F.kl_div(torch.log_softmax(logits / t, 1), torch.log_softmax(teacher / t, 1), log_target=True,
                       reduction="batchmean")
    return settings.alpha * t * t * distill + (1 - settings.alpha) * F.cross_entropy(logits, labels)


GUARD_COPIES, GUARD_SEED = 2, 0  # perturbed copies of each aux image, and their seed


def guard_inputs(features: torch.Tensor, activations: torch.Tensor, flipped: int,
                 settings: RepairSettings) -> torch.Tensor:
    """The guard's perturbed inputs: ``GUARD_COPIES`` copies of ``features`` with random candidates on."""
    order = torch.argsort(activations.to(features.device), stable=True)
    candidates = torch.zeros(features.shape[1], dtype=torch.bool, device=features.device)
    candidates[order[:min(len(order), int(round(settings.guard_ratio * flipped)))]] = True
    strong = float(features.max(0).values.median())
    gen = torch.Generator().manual_seed(GUARD_SEED)
    copies = []
    for _ in range(GUARD_COPIES):  # drawn on the CPU, so the same on every device
        on = (torch.rand(features.shape, generator=gen, dtype=torch.float64) < settings.guard_rate)
        copies.append(features + strong * (on.to(features.device) & candidates.view(1, -1)).to(features.dtype))
    return torch.cat(copies)


def distill_repair(features: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, head: nn.Module, frozen: torch.Tensor,
                   settings: RepairSettings = RepairSettings(),
                   activations: torch.Tensor | None = None, patched: torch.Tensor | None = None) -> RepairResult:
    """Fine-tune ``weight`` (columns in ``frozen`` excepted), ``bias`` and ``head`` towards ``teacher``.

    Args:
        features: the defended layer's inputs on the aux set, ``[N, in]``.
        labels: the aux labels, ``[N]``.
        teacher: the original model's logits on the aux set, ``[N, classes]``.
        weight, bias: the defended layer after the flip, ``[out, in]`` and ``[out]`` (None: a layer
            without bias, which keeps none).
        head: the layers after the defended layer (an activation first); copied, never changed.
        frozen: bool ``[in]``, the flipped columns, which keep their values bit for bit.
        settings: steps, optimizer, learning rate, alpha and temperature, and the guard's.
        activations: the mean activation of each input on the aux set, ``[in]`` (the search's);
            needed by the guard only.
        patched: the layer's inputs on ``settings.patches`` patched copies of the aux images
            (auxdata.patched_copies: ``[patches * N, in]``, copy after copy), asked for the teacher's
            outputs on the clean images; needed when ``settings.patches`` is set.

    Returns:
        The new weight, bias and head parameters (float64), and the loss before and after.

    Backtracking (``settings.backtrack`` > 0, ours; the default rule's): a run whose loss ends above where it
    started (or not finite) has diverged; it is run again from the same start at a third of the learning
    rate, up to ``backtrack`` times. If every run diverges, the layers are given back as they came (the flip
    without the repair). A run that converges the first time is the only one.
    """
    settings.check()
    result, lr, diverged = backtracking(lambda rate: _distill_once(
        features, labels, teacher, weight, bias, head, frozen, dataclasses.replace(settings, lr=rate), activations,
        patched), settings)
    if lr:
        return dataclasses.replace(result, lr=lr, diverged=diverged)
    head_params = {k: v.detach().double() for k, v in head.named_parameters()}
    return RepairResult(weight.detach().double(), None if bias is None else bias.detach().double(), head_params,
                        result.loss_before, result.loss_before, 0.0, diverged)


class _Run(Protocol):
    @property
    def loss_before(self) -> float: ...

    @property
    def loss_after(self) -> float: ...


RunT = TypeVar("RunT", bound=_Run)


def backtracking(run: Callable[[float], RunT], settings: RepairSettings
                 ) -> tuple[RunT, float, tuple[tuple[float, float], ...]]:
    """``run(lr)`` at ``settings.lr``, then, while a run's loss ends above where it started (or is not finite), again
    at a third of the learning rate, up to ``settings.backtrack`` times: the repair's and fine-tuning's one
    definition of divergence. Returns the last run, the learning rate it converged at (0.0: none did) and
    (lr, loss after) of each run that diverged. With ``backtrack`` 0 the one run is kept whatever its loss."""
    if not settings.backtrack:
        return run(settings.lr), settings.lr, ()
    lr, diverged = settings.lr, list[tuple[float, float]]()
    for _ in range(settings.backtrack + 1):
        result = run(lr)
        if math.isfinite(result.loss_after) and result.loss_after <= result.loss_before:
            return result, lr, tuple(diverged)
        diverged.append((lr, result.loss_after))
        lr /= 3
    return result, 0.0, tuple(diverged)


def _distill_once(features: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, head: nn.Module, frozen: torch.Tensor, settings: RepairSettings,
                  activations: torch.Tensor | None, patched: torch.Tensor | None) -> RepairResult:
    """One run of the repair at ``settings.lr`` (distill_repair's arguments)."""
    if frozen.shape != (weight.shape[1],) or features.shape[1] != weight.shape[1]:
        raise ConfigError(f"repair: {tuple(features.shape)} features and a {tuple(frozen.shape)} mask "
                          f"for a layer of shape {tuple(weight.shape)}")
    if settings.guard and (activations is None or activations.shape != (weight.shape[1],)):
        raise ConfigError("the repair's guard needs the mean activation of each input of the layer")
    if settings.patches and (patched is None or patched.shape != (settings.patches * len(features), weight.shape[1])):
        raise ConfigError(f"the repair's {settings.patches} patched copies need the layer's inputs on "
                          f"{settings.patches} x {len(features)} patched images")
    features, teacher = features.double(), teacher.double()
    head = copy.deepcopy(head).double().eval()
    w = weight.detach().double().clone().requires_grad_(True)
    b = (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None
         else bias.detach().double().clone()).requires_grad_(bias is not None)
    params = [w, *([b] if bias is not None else []), *head.parameters()]
    opt = (torch.optim.SGD(params, lr=settings.lr, momentum=SGD_MOMENTUM) if settings.optimizer == "sgd"
           else torch.optim.Adam(params, lr=settings.lr))

    # distillation-only terms on copies of the aux inputs: (weight, inputs, targets, labels)
    extras: list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if settings.patches and patched is not None:  # patched images, asked for the teacher's outputs on the clean ones
        extras.append((1.0, patched.double(), teacher.repeat(settings.patches, 1), labels.repeat(settings.patches)))
    if settings.guard and activations is not None:
        perturbed = guard_inputs(features, activations, int(frozen.sum()), settings)
        extras.append((settings.guard, perturbed, teacher.repeat(GUARD_COPIES, 1), labels.repeat(GUARD_COPIES)))
    only_distill = dataclasses.replace(settings, alpha=1.0)

    def loss() -> torch.Tensor:
        value = repair_loss(head(torch.addmm(b, features, w.T)), teacher, labels, settings)
        for weight_of, inputs, targets, extra_labels in extras:
            value = value + weight_of * repair_loss(head(torch.addmm(b, inputs, w.T)), targets, extra_labels,
                                                    only_distill)
        return value

    with torch.no_grad():
        before = float(loss())
    for _ in range(settings.steps):
        stop_if_signalled()
        opt.zero_grad()
        value = loss()
        value.backward()
        # Adam and momentum SGD leave a parameter whose gradient (hence moments) stays zero exactly where it is
        if w.grad is not None:  # always set by backward(); the check is for the type checker
            w.grad.masked_fill_(frozen.view(1, -1), 0.0)
        opt.step()
    with torch.no_grad():
        after = float(loss())
    return RepairResult(w.detach(), None if bias is None else b.detach(),
                        {k: v.detach() for k, v in head.named_parameters()}, before, after)
