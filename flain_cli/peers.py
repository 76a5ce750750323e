"""The post-training defenses users compare FLAIN with, adapted to one model and a small clean aux set.

Pure functions over a model and its (normalized) aux inputs; nothing here reads files or prints. Each
trains or selects in eval mode (no dropout, BatchNorm statistics as trained) with full-batch steps, so
a result is a function of its inputs. Every selection uses the aux set only, never test data.

- :func:`fine_tune`: Liu et al. (2018) and BackdoorBench's FT: every layer trained on the aux labels.
- :func:`rnp_mask`: RNP (Li et al., ICML 2023), adapted to the defended layer: unlearn the model on the
  aux set by gradient ascent until its aux accuracy is down to ``RNP_UNLEARNED``, then learn a mask over
  the defended layer's inputs that recovers the unlearned model's aux accuracy; the inputs whose mask
  value ends lowest are the backdoor's. RNP prunes those below a fixed value (0.2); on a defended layer of
  thousands of inputs that took half of them on our sample model (-17 ACC points), so `flain defend
  --method rnp` prunes them in the order of their mask value along Algorithm 1's thresholds, until the
  rule's stop fires: the same aux-only stop as every other method (``RnpResult.selected`` keeps RNP's own
  cut, for comparison).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from .modeldef import get_linear
from .repair import backtracking
from .settings import SGD_MOMENTUM, RepairSettings
from .signals import stop_if_signalled

# RNP's settings (the authors' defaults, for full-batch steps on a small aux set)
RNP_UNLEARN_LR, RNP_UNLEARN_STEPS, RNP_UNLEARNED = 0.01, 200, 0.2  # unlearn until aux accuracy <= 0.2
RNP_MASK_LR, RNP_MASK_STEPS, RNP_THRESHOLD = 0.2, 100, 0.2  # recover; prune inputs whose mask ends below 0.2


def _accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(inputs).argmax(1) == labels).double().mean())


@dataclass(frozen=True)
class TuneResult:
    state: dict[str, torch.Tensor]  # the model's new state dict (the one given when every run diverged)
    loss_before: float  # cross-entropy on the aux labels
    loss_after: float
    lr: float = 0.0  # the learning rate of the kept run (0.0: every run diverged, nothing was kept)
    diverged: tuple[tuple[float, float], ...] = ()  # (lr, loss after) of each run that ended above loss_before


def fine_tune(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, settings: RepairSettings,
              frozen: dict[str, torch.Tensor] | None = None) -> TuneResult:
    """Every parameter of a copy of ``model`` trained ``settings.steps`` full-batch steps on the cross-entropy of
    the aux labels, with ``settings.optimizer`` at ``settings.lr`` (its alpha and temperature play no part).
    ``frozen``: bool masks by parameter name of entries that keep their value (fine-pruning's pruned columns).

    Backtracking (``settings.backtrack``, ours; on by default, as for the repair): a run whose aux loss ends above
    where it started has diverged and is run again from the same start at a third of the learning rate
    (repair.backtracking). When every run diverges the model is given back as it came. At lr 0.1 the whole of
    ResNet-small diverged to one class (ACC 0.11) without it (docs/results.md)."""
    result, lr, diverged = backtracking(lambda rate: _tune_once(model, inputs, labels, replace(settings, lr=rate),
                                                                frozen), settings)
    if lr:
        return replace(result, lr=lr, diverged=diverged)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TuneResult(state, result.loss_before, result.loss_before, 0.0, diverged)


def _tune_once(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, settings: RepairSettings,
               frozen: dict[str, torch.Tensor] | None) -> TuneResult:
    """One run of fine_tune at ``settings.lr``."""
    student = copy.deepcopy(model).eval()
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    opt = (torch.optim.SGD(params, lr=settings.lr, momentum=SGD_MOMENTUM) if settings.optimizer == "sgd"
           else torch.optim.Adam(params, lr=settings.lr))
    named = dict(student.named_parameters())
    with torch.no_grad():
        before = float(F.cross_entropy(student(inputs), labels))
    for _ in range(settings.steps):
        stop_if_signalled()
        opt.zero_grad()
        F.cross_entropy(student(inputs), labels).backward()
        for name, mask in (frozen or {}).items():
            grad = named[name].grad
            if grad is not None:
                grad.masked_fill_(mask, 0.0)
        opt.step()
    with torch.no_grad():
        after = float(F.cross_entropy(student(inputs), labels))
    return TuneResult({k: v.detach() for k, v in student.state_dict().items()}, before, after)


@dataclass(frozen=True)
class RnpResult:
    mask: torch.Tensor  # float [in]: the recovered mask over the defended layer's inputs
    selected: torch.Tensor  # bool [in]: RNP's own cut (mask below RNP_THRESHOLD)
    unlearned_acc: float  # aux accuracy of the unlearned model
    unlearn_steps: int
    zero_at: torch.Tensor  # float [in]: the mask step at which each input's mask first reached 0 (inf: never)

    @property
    def ranking(self) -> torch.Tensor:
        """The order in which RNP would prune, as one number per input (lowest first): the mask value, and below
        0 the inputs whose mask reached 0, those that reached it first lowest (many end at exactly 0)."""
        return torch.where(self.mask == 0, -1.0 + self.zero_at / RNP_MASK_STEPS, self.mask)


def rnp_mask(model: nn.Module, layer: str, inputs: torch.Tensor, labels: torch.Tensor) -> RnpResult:
    """RNP's selection on the defended layer ``layer``: unlearn, then recover a mask over its inputs (see the
    module's docstring). The model itself is not changed."""
    unlearned = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(unlearned.parameters(), lr=RNP_UNLEARN_LR, momentum=SGD_MOMENTUM)
    steps = 0
    while steps < RNP_UNLEARN_STEPS and _accuracy(unlearned, inputs, labels) > RNP_UNLEARNED:
        stop_if_signalled()
        opt.zero_grad()
        (-F.cross_entropy(unlearned(inputs), labels)).backward()  # gradient ascent: forget the clean task
        opt.step()
        steps += 1
    for p in unlearned.parameters():
        p.requires_grad_(False)
    linear = get_linear(unlearned, layer)
    mask = torch.ones(linear.in_features, dtype=torch.float32, device=inputs.device, requires_grad=True)
    handle = linear.register_forward_pre_hook(lambda module, args: (args[0] * mask,))
    zero_at = torch.full_like(mask, float("inf"), requires_grad=False)
    try:
        opt = torch.optim.SGD([mask], lr=RNP_MASK_LR, momentum=SGD_MOMENTUM)
        for step in range(RNP_MASK_STEPS):
            stop_if_signalled()
            opt.zero_grad()
            F.cross_entropy(unlearned(inputs), labels).backward()
            opt.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
                zero_at = torch.where((mask == 0) & torch.isinf(zero_at), float(step), zero_at)
    finally:
        handle.remove()
    unlearned_acc = _accuracy(unlearned, inputs, labels)
    final = mask.detach()
    return RnpResult(final, final < RNP_THRESHOLD, unlearned_acc, steps, zero_at.cpu())
