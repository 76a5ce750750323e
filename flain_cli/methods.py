"""Defense methods by name (catalog.METHODS), each described by what it does in three steps, so that adding a
method is one entry here (and, for a new kind of step, its function):

1. ``select``: which inputs of the defended layer it changes: ``search`` (Algorithm 1's thresholds on the
   inputs' mean activation, with the rule's stop), ``rnp`` (the same thresholds and stop on RNP's recovered
   mask value instead of the mean activation), or ``none``;
2. ``columns``: the values the selected columns take (W0 - dW for flain, 0 for pruning);
3. ``train``: what training follows: ``repair`` (the distillation repair of the rule, if it has one),
   ``finetune`` (every layer on the aux labels, the selected columns kept), or ``none``.

`flain defend --method NAME` runs it (audit.defend_checkpoint); docs/flain.md describes each with its source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .catalog import METHOD_STEPS, METHODS

Columns = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (W, W0) -> the selected columns' values


def flipped_updates(weight: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Eq. 7, first case: W0 - dW."""
    return init - (weight - init)


def pruned(weight: torch.Tensor, init: torch.Tensor) -> torch.Tensor:  # noqa: ARG001 - one signature
    """Pruning: zero weights."""
    return torch.zeros_like(weight)


@dataclass(frozen=True)
class Method:
    name: str
    select: str  # "search", "rnp" or "none"
    columns: Columns | None  # None: no column changes (select "none")
    train: str  # "repair", "finetune" or "none"
    needs_init: bool  # reads W0 (the flip does)
    source: str  # where the method comes from, for the docs and the record

    @property
    def searches(self) -> bool:
        """Whether it picks its inputs along Algorithm 1's thresholds (what `flain sweep` can draw)."""
        return self.select in ("search", "rnp")


# what the selected columns become, and where each method comes from; its steps are catalog.METHOD_STEPS
for _name, _columns, _source in (
    ("flain", flipped_updates, "Ding et al., FLAIN (Algorithm 1)"),
    ("prune", pruned, "the pruning baseline of the paper"),
    ("finetune", None, "fine-tuning (Liu et al. 2018; BackdoorBench's FT)"),
    ("fine-pruning", pruned, "fine-pruning (Liu et al. 2018)"),
    ("distill", None, "the default rule's repair alone, no flip (an ablation)"),
    ("rnp", pruned, "reconstructive neuron pruning (Li et al. 2023), on the defended layer's inputs"),
):
    _select, _train, _needs_init = METHOD_STEPS[_name]
    METHODS.register(_name)(Method(_name, _select, _columns, _train, _needs_init, _source))
