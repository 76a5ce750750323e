"""FLAIN (Algorithm 1 of the paper) and the pruning baseline, as pure functions over tensors.

Notation follows the paper: ``W`` is the defended layer's weight at the end of training, ``W0``
its initial weight, ``dW = W - W0``; ``x`` holds the mean activation of each *input* neuron of the
layer over the aux set (the ReLU'd inputs of eq. 6). In torch a Linear weight is ``[out, in]``,
so the paper's column ``w^[i]`` of neuron ``i`` is ``W[:, i]``.

Thresholds are ``lambda_k = mu + k * step`` for k = 1, 2, ... (line 4 and line 23 of Algorithm 1),
computed by multiplication rather than repeated addition so that no rounding drift accumulates.

Stopping (line 17): the paper stops at the first lambda whose aux accuracy drop reaches ``rho``
(``stop="accuracy"``). Ours, ``stop="kl"``: at the first lambda whose mean KL divergence of the
outputs from the original model's on the aux set, KL(original || candidate), reaches ``kl``: a
continuous measure of the damage that 200 images resolve far better than their accuracy (one
image is 0.5 points), measured by the caller's ``divergence`` for the weight last evaluated.

Two search loops return identical results:
- :func:`search_plain` follows Algorithm 1 step by step and evaluates at every lambda;
- :func:`search_fast` evaluates only where the set {i : x_i <= lambda_k} changes, since every
  lambda between two consecutive x_i gives the same model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .catalog import METHOD_STEPS, METHODS
from .errors import ConfigError
from .methods import flipped_updates, pruned
from .settings import DefenseConfig

# (weight of the defended layer, changed) -> aux accuracy. ``changed``, when not None, holds the
# only columns in which ``weight`` can differ from the weight of the previous call (a hint that
# lets an evaluator update instead of recompute); the callee must not keep ``weight`` itself.
Evaluate = Callable[[torch.Tensor, torch.Tensor | None], float]
Divergence = Callable[[], float]  # KL(original || the weight last given to Evaluate) on the aux set
MAX_THRESHOLDS = 10_000_000  # thresholds lambda_k a search may need to cover the activations


def replacement_of(weight: torch.Tensor, init: torch.Tensor, config: DefenseConfig) -> torch.Tensor:
    """The values the method's selected columns take (catalog.METHODS: W0 - dW for flain, 0 for pruning)."""
    method = METHODS.get(config.method)
    if method.columns is None:
        changing = ", ".join(name for name in METHOD_STEPS if METHODS.get(name).columns is not None)
        raise ConfigError(f"{config.method} changes no columns: it has no thresholds to search or sweep "
                          f"(these do: {changing})", param="method")
    return method.columns(weight, init)


def apply_mask(weight: torch.Tensor, replacement: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Columns in ``mask`` from ``replacement``, the others kept as they are (W0 + dW = W, exactly)."""
    return torch.where(mask.view(1, -1), replacement, weight)


def flip_updates(weight: torch.Tensor, init: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7: columns in ``mask`` become W0 - dW, the others keep W0 + dW."""
    return apply_mask(weight, flipped_updates(weight, init), mask)


def prune_columns(weight: torch.Tensor, init: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The selected input neurons' columns set to zero."""
    return apply_mask(weight, pruned(weight, init), mask)


def rescale_factor(weight: torch.Tensor, norm: float) -> float:
    """The factor that brings ``weight`` to the Frobenius norm ``norm`` (1 for an all-zero weight)."""
    current = float(torch.linalg.matrix_norm(weight.double()))
    return 1.0 if current == 0.0 else norm / current


def rescale(weight: torch.Tensor, norm: float) -> torch.Tensor:
    """Lines 18-20: scale the layer back to the original Frobenius norm ``norm``."""
    return scaled(weight, rescale_factor(weight, norm))


def scaled(weight: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * weight``, computed in float64 and given back in ``weight``'s dtype (``weight`` itself for 1)."""
    return weight if factor == 1.0 else (weight.double() * factor).to(weight.dtype)


def candidate_parts(weight: torch.Tensor, init: torch.Tensor, mask: torch.Tensor,
                    config: DefenseConfig) -> tuple[torch.Tensor, float]:
    """The model a defense keeps for ``mask``, as the masked weight and the factor it is then scaled by.

    The columns in ``mask`` take the method's values (W0 - dW for flain, 0 for prune); for flain with
    ``config.rescale`` and at least one column changed, the layer is scaled back to the Frobenius norm of
    ``weight`` (lines 18-20 of Algorithm 1); otherwise the factor is 1. Callers that score many masks keep
    the two apart (the factor costs nothing to apply to an output); :func:`candidate` joins them.
    """
    masked = apply_mask(weight, replacement_of(weight, init, config), mask)
    if config.method == "flain" and config.rescale and bool(mask.any()):
        return masked, rescale_factor(masked, float(torch.linalg.matrix_norm(weight.double())))
    return masked, 1.0


def candidate(weight: torch.Tensor, init: torch.Tensor, mask: torch.Tensor, config: DefenseConfig) -> torch.Tensor:
    """The defended layer's weight for ``mask``: what `flain defend` keeps before any repair (candidate_parts)."""
    return scaled(*candidate_parts(weight, init, mask, config))


@dataclass(frozen=True)
class Candidate:
    """The layer a defense keeps at one threshold (``lam``; None: the layer as it was), before any repair."""

    lam: float | None
    mask: torch.Tensor  # bool [in]: the columns changed
    added: torch.Tensor  # indices of the columns changed here and not at the previous candidate
    masked: torch.Tensor  # the weight with those columns changed, before the rescale
    factor: float  # the rescale (candidate_parts): the weight is factor * masked

    @property
    def weight(self) -> torch.Tensor:
        return scaled(self.masked, self.factor)


def candidates(weight: torch.Tensor, init: torch.Tensor, x: torch.Tensor, config: DefenseConfig,
               points: int) -> Iterator[Candidate]:
    """The layer unchanged, then the layer a defense keeps at each of ``points`` thresholds mu + k * step,
    k = 0, 1, ... (k = 0: mu itself; the search starts at k = 1): `flain sweep`'s curve, each entry exactly
    the weight :func:`search_fast` would keep there (:func:`candidate`)."""
    xd = x.double()
    mask = torch.zeros_like(xd, dtype=torch.bool)
    yield Candidate(None, mask, torch.zeros(0, dtype=torch.long), weight, 1.0)
    mu = float(xd.min())
    for k in range(points):
        lam = threshold(mu, k, config.step)  # the search's own lambdas
        new = xd <= lam
        added = torch.nonzero(new & ~mask).flatten()
        mask = new
        yield Candidate(lam, mask, added, *candidate_parts(weight, init, mask, config))


@dataclass(frozen=True)
class SearchStep:
    lam: float
    selected: int
    acc: float
    kl: float | None = None  # measured when the search stops on the divergence


@dataclass(frozen=True)
class SearchResult:
    config: DefenseConfig  # the settings the search ran with (its repair plays no part here)
    mu: float
    acc0: float
    lam: float  # threshold of the kept model (mu for last-safe when even the first step crossed)
    mask: torch.Tensor  # bool [in_features]: the neurons changed
    weight: torch.Tensor  # the new weight (rescaled for flain)
    acc_kept: float  # aux accuracy of the kept model before the rescale
    all_selected: bool  # every neuron was selected before the stop rule fired
    evaluations: int  # network evaluations, acc0 included
    trace: list[SearchStep] = field(default_factory=list)
    kl_kept: float | None = None  # the kept model's divergence (stop="kl"; None when it is the original)

    @property
    def changed(self) -> int:
        return int(self.mask.sum())

    @property
    def steps(self) -> int:
        """Thresholds Algorithm 1 visits (k of the last lambda evaluated), whichever loop ran."""
        return round((self.trace[-1].lam - self.mu) / self.config.step)


def _check(weight: torch.Tensor, init: torch.Tensor, x: torch.Tensor, config: DefenseConfig,
           divergence: Divergence | None) -> None:
    """The settings (``config.check``), then what they are applied to: shapes, finite activations, the step's reach."""
    config.check()
    step = config.step
    if config.stop.needs_divergence and divergence is None:
        raise ConfigError("is needed for the kl stop: a function giving the divergence of the last scored outputs",
                          param="divergence")
    if weight.shape != init.shape or weight.dim() != 2:
        raise ConfigError(f"the defended weight {tuple(weight.shape)} and the initial weight "
                          f"{tuple(init.shape)} must be the same 2-D shape")
    if x.shape != (weight.shape[1],):
        raise ConfigError(f"{tuple(x.shape)} activations for a layer with {weight.shape[1]} inputs")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("the mean activations hold NaN or Inf; the model's layers before the defended one "
                          "are not finite on the aux set")
    span = float(x.double().max() - x.double().min())
    if span / step > MAX_THRESHOLDS:
        raise ConfigError(f"{step:g} would take {span / step:.3g} thresholds to cover the mean activations "
                          f"(from {float(x.min()):.4g} to {float(x.max()):.4g}); at most {MAX_THRESHOLDS:,} are "
                          f"allowed: choose a larger step", param="step")
    if 0 < span <= step:
        raise ConfigError(f"{step:g} selects all {x.numel()} inputs at the first threshold (the mean "
                          f"activations span {span:.4g}); choose a step well below that, e.g. the paper's 0.001",
                          param="step")


def threshold(mu: float, k: int, step: float) -> float:
    """lambda_k of Algorithm 1, ``mu + k * step``, computed the one way the search and the sweep use."""
    return mu + k * step


def _finish(weight: torch.Tensor, init: torch.Tensor, x: torch.Tensor, config: DefenseConfig, trace: list[SearchStep],
            acc0: float, mu: float, crossed: bool, k_last: int, evaluations: int) -> SearchResult:
    """Pick the kept model, rebuild it and rescale it (flain only).

    ``crossing`` keeps the model at ``lambda_{k_last}``; ``last-safe`` (when rho was crossed) the
    one at ``lambda_{k_last - 1}``, the largest threshold whose drop stayed below rho.
    """
    step = config.step
    if crossed and config.select == "last-safe":
        if k_last == 1:  # the very first threshold already cost rho: keep the model as it was
            lam, acc_kept, kl_kept, mask = mu, acc0, None, torch.zeros_like(x, dtype=torch.bool)
        else:
            lam, acc_kept, kl_kept = threshold(mu, k_last - 1, step), trace[-2].acc, trace[-2].kl
            mask = x.double() <= lam
    else:
        lam, acc_kept, kl_kept = trace[-1].lam, trace[-1].acc, trace[-1].kl
        mask = x.double() <= lam
    new = candidate(weight, init, mask, config)
    return SearchResult(config, mu, acc0, lam, mask, new, acc_kept, not crossed, evaluations, trace, kl_kept)


def search_plain(weight: torch.Tensor, init: torch.Tensor, x: torch.Tensor, evaluate: Evaluate,
                 config: DefenseConfig, *, divergence: Divergence | None = None,
                 max_steps: int = MAX_THRESHOLDS) -> SearchResult:
    """Algorithm 1, one lambda at a time (the reference for :func:`search_fast`).

    Args: the defended layer's ``weight`` and ``init`` (W0), the mean activations ``x`` of its inputs,
    ``evaluate`` (aux accuracy of a weight); ``config``: method, step, stop, select and rescale (its shifts,
    holdout and repair are the caller's: PRESETS["paper"] is Algorithm 1); ``divergence``: needed by the kl
    stop (ours), which replaces line 17's accuracy test by ``divergence() >= kl``. Returns the kept model
    and the curve.

    Example: ``search_plain(W, W0, x, evaluate, dataclasses.replace(PRESETS["paper"], step=0.01))``.
    """
    _check(weight, init, x, config, divergence)
    step, stop = config.step, config.stop
    measure = divergence if stop.needs_divergence else None
    replacement = replacement_of(weight, init, config)
    xd = x.double()
    mu = float(xd.min())
    acc0 = evaluate(weight, None)  # line 5
    evaluations, trace, crossed = 1, [], False
    for k in range(1, max_steps + 1):
        lam = threshold(mu, k, step)
        mask = xd <= lam  # lines 7-13
        acc1 = evaluate(apply_mask(weight, replacement, mask), None)  # lines 15-16
        evaluations += 1
        trace.append(SearchStep(lam, int(mask.sum()), acc1, measure() if measure else None))
        if stop.crossed(acc0, acc1, trace[-1].kl):  # line 17
            crossed = True
            break
        if bool(mask.all()):  # every neuron selected and rho never reached: stop
            break
    return _finish(weight, init, x, config, trace, acc0, mu, crossed, k, evaluations)


def first_k_covering(mu: float, value: float, step: float) -> int:
    """The smallest k >= 1 with mu + k * step >= value (exactly as threshold computes it)."""
    k = max(1, math.ceil((value - mu) / step))
    while threshold(mu, k, step) < value:
        k += 1
    while k > 1 and threshold(mu, k - 1, step) >= value:
        k -= 1
    return k


def search_fast(weight: torch.Tensor, init: torch.Tensor, x: torch.Tensor, evaluate: Evaluate,
                config: DefenseConfig, *, divergence: Divergence | None = None) -> SearchResult:
    """Algorithm 1, evaluating only the thresholds at which the selected set grows (arguments as search_plain's)."""
    _check(weight, init, x, config, divergence)
    step, stop = config.step, config.stop
    measure = divergence if stop.needs_divergence else None
    replacement = replacement_of(weight, init, config)
    xd = x.double()
    values = torch.sort(xd).values.tolist()
    mu = values[0]
    acc0 = evaluate(weight, None)
    evaluations, trace, crossed = 1, [], False
    k, z = 1, len(values)
    current, previous = weight.clone(), torch.zeros_like(xd, dtype=torch.bool)
    while True:
        lam = threshold(mu, k, step)
        mask = xd <= lam
        count = int(mask.sum())
        new = torch.nonzero(mask & ~previous).flatten()  # the neurons this threshold takes in
        current[:, new] = replacement[:, new]  # = apply_mask(weight, replacement, mask), column by column
        previous = mask
        acc1 = evaluate(current, new)
        evaluations += 1
        trace.append(SearchStep(lam, count, acc1, measure() if measure else None))
        if stop.crossed(acc0, acc1, trace[-1].kl):
            crossed = True
            break
        if count == z:
            break
        k = first_k_covering(mu, values[count], step)  # the next lambda that takes in a new neuron
    return _finish(weight, init, x, config, trace, acc0, mu, crossed, k, evaluations)
