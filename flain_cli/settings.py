"""Settings and their defaults, written once: the post-training defense's, and the size of a grid.

Plain data, no torch: the CLI builds its options and presets from these without importing the
library. The search that uses them is :mod:`flain_cli.defense`, the repair :mod:`flain_cli.repair`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .catalog import METHODS
from .errors import ConfigError

SELECTS = ("crossing", "last-safe")
STOPS = ("accuracy", "kl")  # the paper's stop on the aux accuracy drop, or ours on the output divergence
REPAIR_OPTIMIZERS = ("adam", "sgd")  # the repair's optimizer (repair.py)
REPAIR_LR = {"adam": 1e-3, "sgd": 0.1}  # each optimizer's learning rate when none is given
SGD_MOMENTUM = 0.9
MAX_PATCHES = 64  # the repair's patched copies per aux image, at most (each is a pass through the conv layers)
PATCH_SIDES = (2, 6)  # the side of a patch, in pixels, drawn uniformly from this range (both ends included)
MAX_SHIFTS = 10  # --shifts: (2 * 10 + 1)^2 = 441 copies of the aux set at most
MAX_POINTS = 100  # grid points of `flain experiment` before --max-points must confirm a larger grid


@dataclass(frozen=True)
class RepairSettings:
    """How the repair trains (the defaults are the setting fixed on the tuning trainings)."""

    steps: int = 100
    lr: float = REPAIR_LR["adam"]
    alpha: float = 0.8  # weight of the distillation term; 1 - alpha goes to the labels
    temperature: float = 4.0
    # the silent-neuron guard (ours, opt-in: weight 0 is off; repair.py): the repaired model must also
    # give the teacher's outputs when random low-activation inputs are switched on
    guard: float = 0.0  # weight of that term
    guard_ratio: float = 2.0  # candidates: the guard_ratio x flipped inputs of lowest mean activation
    guard_rate: float = 0.01  # share of the candidates switched on in each perturbed copy
    # ours, opt-in: "sgd" (momentum SGD_MOMENTUM) moves each input's weights in proportion to its
    # activation, where Adam moves near-silent inputs' weights as much as busy ones' (repair.py);
    # give it its own learning rate: with_optimizer (the CLI uses it when --repair-lr is not given)
    optimizer: str = "adam"
    # ours, opt-in (0: off): copies of each aux image with one white square (side 2-6, at a random place)
    # that must give the teacher's outputs on the clean image (repair.py, patched_copies)
    patches: int = 0

    def with_optimizer(self, optimizer: str) -> RepairSettings:
        """These settings trained by ``optimizer``, at that optimizer's learning rate (REPAIR_LR)."""
        return replace(self, optimizer=optimizer, lr=REPAIR_LR.get(optimizer, self.lr))

    def check(self) -> None:
        if not (isinstance(self.steps, int) and 1 <= self.steps <= 100_000):
            raise ConfigError(f"repair steps must be an integer from 1 to 100000, got {self.steps}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ConfigError(f"repair lr must be in (0, 1], got {self.lr}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"repair alpha must be in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= 100):
            raise ConfigError(f"repair temperature must be in (0, 100], got {self.temperature}")
        if not (math.isfinite(self.guard) and 0 <= self.guard <= 100):
            raise ConfigError(f"repair guard must be in [0, 100] (0: off), got {self.guard}")
        if not (math.isfinite(self.guard_ratio) and 0 < self.guard_ratio <= 100):
            raise ConfigError(f"repair guard_ratio must be in (0, 100], got {self.guard_ratio}")
        if not 0 < self.guard_rate <= 1:
            raise ConfigError(f"repair guard_rate must be in (0, 1], got {self.guard_rate}")
        if isinstance(self.patches, bool) or not (isinstance(self.patches, int) and 0 <= self.patches <= MAX_PATCHES):
            raise ConfigError(f"repair patches must be a whole number from 0 (off) to {MAX_PATCHES}, "
                              f"got {self.patches}")
        if self.optimizer not in REPAIR_OPTIMIZERS:
            raise ConfigError(f"repair optimizer must be one of {', '.join(REPAIR_OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")

    def record(self) -> dict[str, float | int | str]:
        """Its settings; the guard's only when it is on, the optimizer only when it is not Adam and the
        patches only when there are some, so records without them read (and key caches) as before they existed."""
        values = asdict(self)
        if self.optimizer == "adam":
            del values["optimizer"]
        if not self.patches:
            del values["patches"]
        return values if self.guard else {k: v for k, v in values.items() if not k.startswith("guard")}


PAPER_STEP, PAPER_RHO = 0.001, 0.03  # the paper's step, and its largest rho ("no more than 0.03")
KL_BUDGET = 0.07  # the kl stop's budget, chosen on the tuning trainings (docs/results.md)


@dataclass(frozen=True)
class DefenseConfig:
    """Every setting of a post-training defense: the search (Algorithm 1) and the optional repair.

    ``stop="kl"`` (ours, the default): the search stops where the mean KL divergence of the outputs from
    the original model's on the aux set reaches ``kl``, instead of where the aux accuracy has dropped by
    ``rho`` ("accuracy", line 17 of Algorithm 1). Each stop ignores the other's budget.
    ``holdout`` > 0 (ours): the mean activations come from a share 1-holdout of the aux set and the
    stopping rule's measures from the held-out rest. ``shifts`` > 0 (ours): the mean activations over
    the aux images and their translations by up to that many pixels (AuxFeatures.mean_activations).
    ``repair`` (ours, :mod:`flain_cli.repair`): after the search, distil the original model into the
    defended one on the aux set; None turns it off. ``stop="accuracy"`` without the repair is Algorithm 1
    exactly (the paper preset).
    """

    method: str = "flain"
    step: float = PAPER_STEP
    rho: float = PAPER_RHO
    select: str = "crossing"
    stop: str = "kl"
    kl: float = KL_BUDGET
    holdout: float = 0.0
    shifts: int = 0  # 0: the mean over the aux images themselves, the paper's
    rescale: bool = True  # lines 18-20 of Algorithm 1 (flain only); False is an ablation
    repair: RepairSettings | None = RepairSettings()

    @property
    def rule(self) -> str:
        """A short name: the method, '+shifts' for the translated aux images' mean, '+kl' for the kl stop,
        '+distill' when the repair runs, '+guard' with its guard, '+patches' with patched copies, '+sgd'
        when it trains with SGD."""
        repair = self.repair
        return (self.method + ("+shifts" if self.shifts else "") + ("+kl" if self.stop == "kl" else "")
                + ("+distill" if repair is not None else "")
                + ("+guard" if repair is not None and repair.guard else "")
                + ("+patches" if repair is not None and repair.patches else "")
                + ("+sgd" if repair is not None and repair.optimizer == "sgd" else ""))

    def check(self) -> None:
        """Refuse settings out of range before any work (those that need the activations are checked later)."""
        METHODS.check(self.method)
        for name, value in (("step", self.step), ("rho", self.rho), ("kl", self.kl), ("holdout", self.holdout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"must be a finite number, got {value!r}", param=name)
        if not self.step > 0:
            raise ConfigError(f"must be > 0, got {self.step}", param="step")
        if not 0 <= self.rho <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.rho}", param="rho")
        if not 0 < self.kl <= 10:
            raise ConfigError(f"must be in (0, 10], got {self.kl}", param="kl")
        if self.stop not in STOPS:
            raise ConfigError(f"must be one of {', '.join(STOPS)}, got {self.stop!r}", param="stop")
        if isinstance(self.shifts, bool) or not isinstance(self.shifts, int) or not 0 <= self.shifts <= MAX_SHIFTS:
            raise ConfigError(f"must be a whole number of pixels from 0 to {MAX_SHIFTS}, got {self.shifts!r}",
                              param="shifts")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.holdout}", param="holdout")
        if self.select not in SELECTS:
            raise ConfigError(f"must be one of {', '.join(SELECTS)}, got {self.select!r}", param="select")
        if self.repair is not None:
            self.repair.check()

    def record(self) -> dict:
        return {"rule": self.rule, "method": self.method, "step": self.step, "rho": self.rho, "select": self.select,
                "stop": self.stop, "kl": self.kl if self.stop == "kl" else None, "holdout": self.holdout,
                "shifts": self.shifts, "rescale": self.rescale,
                "repair": None if self.repair is None else self.repair.record()}


# Named settings. "paper": Algorithm 1 as written (step 0.001, rho 0.03 on the aux accuracy, the
# crossing model, rescale, no repair). "default": the same search on the means over the aux images
# and their moves by up to 2 pixels (shifts 2), stopped on the outputs' divergence (kl 0.07) and
# followed by the distillation repair trained with SGD: the rule that kept the most tuning cells
# within target (docs/results.md, "FLAIN that keeps accuracy"). The defaults before it: shifts 0 and
# the Adam repair (`--shifts 0 --repair-optimizer adam`, until 2026-11-30 evening), and before that
# the paper's stop then the Adam repair (add `--stop accuracy`).
PRESETS: dict[str, DefenseConfig] = {"default": DefenseConfig(shifts=2, repair=RepairSettings().with_optimizer("sgd")),
                                     "paper": DefenseConfig(stop="accuracy", repair=None)}
