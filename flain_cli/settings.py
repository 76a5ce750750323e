"""Settings and their defaults, written once: the post-training defense's, and the size of a grid.

Plain data, no torch: the CLI builds its options and presets from these without importing the
library. The search that uses them is :mod:`flain_cli.defense`, the repair :mod:`flain_cli.repair`.

A defense rule is a :class:`DefenseConfig`. Its field defaults *are* the default preset
(``PRESETS["default"] == DefenseConfig()``); ``PRESETS["paper"]`` is Algorithm 1 as written. Every
caller (`flain defend`, `flain sweep`, the grids of `flain experiment`, the labs) turns a preset and
the settings it changes into a checked config with one function, :func:`defense_config`, whose
keyword names are the options of `flain defend` (``repair_steps`` for ``--repair-steps``). The stop
rule is a :data:`Stop`: the paper's :class:`AccuracyStop` or our :class:`KlStop`, each owning its
budget, its check, its label and its record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from .catalog import METHOD_STEPS, METHODS
from .errors import ConfigError, opt

SELECTS = ("crossing", "last-safe")
REPAIR_OPTIMIZERS = ("adam", "sgd")  # the repair's optimizer (repair.py)
REPAIR_LR = {"adam": 1e-3, "sgd": 0.1}  # each optimizer's learning rate when none is given
SGD_MOMENTUM = 0.9
MAX_PATCHES = 64  # the repair's patched copies per aux image, at most (each is a pass through the conv layers)
PATCH_SIDES = (2, 6)  # the side of a patch, in pixels, drawn uniformly from this range (both ends included)
MAX_SHIFTS = 10  # --shifts: (2 * 10 + 1)^2 = 441 copies of the aux set at most
MAX_POINTS = 100  # grid points of `flain experiment` before --max-points must confirm a larger grid


PAPER_STEP, PAPER_RHO = 0.001, 0.03  # the paper's step, and its largest rho ("no more than 0.03")
KL_BUDGET = 0.07  # the kl stop's budget in nats (docs/lab/default-rule.md; the default until 2026-12-06)
# each unit's budget: in nats (KL_BUDGET), or in units of the model's own one-pixel-shift KL on the aux set
# (AuxFeatures.shift_divergence; the default since 2026-12-06: docs/lab/adaptive-stop.md picked 1.5 on the tuning
# models and judged it on fresh held-out trainings)
KL_UNITS = {"nats": KL_BUDGET, "shift": 1.5}
DEFAULT_KL_UNIT = "shift"


def _finite(value: Any, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value!r}", param=param)


class _Stop:
    """What both stops share: a budget (the field named ``budget_param``) in a range, its label and its record.
    A stop states its name, budget, whether it reads the outputs' divergence and the budget's range as class
    keywords; it adds ``crossed``, the test of line 17."""

    name: ClassVar[str]
    budget_param: ClassVar[str]  # the budget's field and setting: rho or kl
    needs_divergence: ClassVar[bool]  # the search must measure the outputs' divergence at each threshold
    low: ClassVar[float]
    high: ClassVar[float]
    low_allowed: ClassVar[bool]  # whether the budget may be ``low`` itself

    def __init_subclass__(cls, *, name: str, budget_param: str, needs_divergence: bool, low: float, high: float,
                          low_allowed: bool) -> None:
        super().__init_subclass__()
        cls.name, cls.budget_param, cls.needs_divergence = name, budget_param, needs_divergence
        cls.low, cls.high, cls.low_allowed = low, high, low_allowed

    @property
    def budget(self) -> float:
        return float(getattr(self, self.budget_param))

    @property
    def label(self) -> str:
        """The stop in a file stem: ``rho0.03``, ``kl0.07``."""
        return f"{self.budget_param}{self.budget:g}"

    def describe(self) -> str:
        return f"{self.budget_param} {self.budget:g}"

    def record(self) -> dict[str, Any]:
        """The stop in the checkpoint's flat layout: its name, and its budget beside the other stop's (null)."""
        return {"stop": self.name, "rho": None, "kl": None} | {self.budget_param: getattr(self, self.budget_param)}

    def check(self) -> None:
        value = getattr(self, self.budget_param)
        _finite(value, self.budget_param)
        if not (self.low <= value if self.low_allowed else self.low < value) or value > self.high:
            raise ConfigError(f"must be in {'[' if self.low_allowed else '('}{self.low:g}, {self.high:g}], got {value}",
                              param=self.budget_param)


@dataclass(frozen=True)
class AccuracyStop(_Stop, name="accuracy", budget_param="rho", needs_divergence=False, low=0, high=1,
                   low_allowed=True):
    """Line 17 of Algorithm 1: stop at the first threshold whose aux accuracy drop reaches ``rho``."""

    rho: float = PAPER_RHO

    def crossed(self, acc0: float, acc: float, kl: float | None) -> bool:  # noqa: ARG002 - one signature for both
        return self.rho <= acc0 - acc


@dataclass(frozen=True)
class KlStop(_Stop, name="kl", budget_param="kl", needs_divergence=True, low=0, high=10, low_allowed=False):
    """Ours: stop at the first threshold whose mean KL divergence of the outputs from the original model's on
    the aux set, KL(original || candidate), reaches ``kl``. ``unit`` "shift" reads ``kl`` in units of the
    model's own KL between the aux images and the same images moved by one pixel: the search runs on
    :meth:`in_nats` of that measure."""

    kl: float = KL_BUDGET
    unit: str = "nats"

    @property
    def label(self) -> str:
        return f"kl{self.kl:g}" + ("" if self.unit == "nats" else f"x{self.unit}")

    def describe(self) -> str:
        return f"kl {self.kl:g}" + ("" if self.unit == "nats" else f" x the {self.unit} KL")

    def record(self) -> dict[str, Any]:
        """As every stop's, with ``kl_unit`` when it is not nats (records from before it read the same)."""
        return super().record() | ({} if self.unit == "nats" else {"kl_unit": self.unit})

    def check(self) -> None:
        super().check()
        if self.unit not in KL_UNITS:
            raise ConfigError(f"must be one of {', '.join(KL_UNITS)}, got {self.unit!r}", param="kl_unit")

    def in_nats(self, scale: float) -> KlStop:
        """The same stop with its budget in nats, ``scale`` being the measure its unit names (1 for nats)."""
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"the model's {self.unit} KL on the aux set is {scale:.3g}: it gives no budget; the "
                              f"model's outputs do not move when the images do, so pass {opt('kl_unit')} nats")
        return KlStop(self.kl * scale)

    def crossed(self, acc0: float, acc: float, kl: float | None) -> bool:  # noqa: ARG002 - one signature for both
        if kl is None:
            raise ValueError("the kl stop needs the divergence of every threshold it reads")
        return self.kl <= kl


Stop = AccuracyStop | KlStop
STOP_KINDS: dict[str, type[AccuracyStop] | type[KlStop]] = {"accuracy": AccuracyStop, "kl": KlStop}
STOPS = tuple(STOP_KINDS)  # the paper's stop on the aux accuracy drop, or ours on the output divergence


def make_stop(name: str, budget: float | None = None, unit: str | None = None) -> Stop:
    """The stop named ``name`` with ``budget`` (its rho or kl; None: its default, for the kl stop its unit's)
    and, for the kl stop, the budget's ``unit`` (None: nats)."""
    if name not in STOP_KINDS:
        raise ConfigError(f"must be one of {', '.join(STOPS)}, got {name!r}", param="stop")
    if name == "kl" and unit is not None:
        if unit not in KL_UNITS:
            raise ConfigError(f"must be one of {', '.join(KL_UNITS)}, got {unit!r}", param="kl_unit")
        return KlStop(KL_UNITS[unit] if budget is None else budget, unit)
    kind = STOP_KINDS[name]
    return kind() if budget is None else kind(budget)


@dataclass(frozen=True)
class RepairSettings:
    """How the repair trains; the defaults are the default preset's (SGD, the rule chosen in docs/results.md)."""

    steps: int = 100
    # "sgd" (momentum SGD_MOMENTUM) moves each input's weights in proportion to its activation; "adam" moves
    # near-silent inputs' weights as much as busy ones' (repair.py). Each has its own learning rate (REPAIR_LR):
    # change the optimizer with with_optimizer
    optimizer: str = "sgd"
    lr: float = REPAIR_LR["sgd"]
    alpha: float = 0.8  # weight of the distillation term; 1 - alpha goes to the labels
    temperature: float = 4.0
    # the silent-neuron guard (ours, opt-in: weight 0 is off; repair.py): the repaired model must also
    # give the teacher's outputs when random low-activation inputs are switched on
    guard: float = 0.0  # weight of that term
    guard_ratio: float = 2.0  # candidates: the guard_ratio x flipped inputs of lowest mean activation
    guard_rate: float = 0.01  # share of the candidates switched on in each perturbed copy
    # ours, opt-in (0: off): copies of each aux image with one white square (side 2-6, at a random place)
    # that must give the teacher's outputs on the clean image (repair.py, patched_copies)
    patches: int = 0
    # ours (0: off): a run whose loss ends above where it started is run again at a third of the learning rate,
    # up to this many times (repair.backtracking: the repair and fine-tuning)
    backtrack: int = 3

    def with_optimizer(self, optimizer: str) -> RepairSettings:
        """These settings trained by ``optimizer``, at that optimizer's learning rate (REPAIR_LR)."""
        return replace(self, optimizer=optimizer, lr=REPAIR_LR.get(optimizer, self.lr))

    def check(self) -> None:
        if isinstance(self.steps, bool) or not (isinstance(self.steps, int) and 1 <= self.steps <= 100_000):
            raise ConfigError(f"must be a whole number from 1 to 100000, got {self.steps!r}", param="repair_steps")
        for name in ("lr", "alpha", "temperature", "guard", "guard_ratio", "guard_rate"):
            _finite(getattr(self, name), f"repair_{name}")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.lr}", param="repair_lr")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.alpha}", param="repair_alpha")
        if not 0 < self.temperature <= 100:
            raise ConfigError(f"must be in (0, 100], got {self.temperature}", param="repair_temperature")
        if not 0 <= self.guard <= 100:
            raise ConfigError(f"must be in [0, 100] (0: off), got {self.guard}", param="repair_guard")
        if not 0 < self.guard_ratio <= 100:
            raise ConfigError(f"must be in (0, 100], got {self.guard_ratio}", param="repair_guard_ratio")
        if not 0 < self.guard_rate <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.guard_rate}", param="repair_guard_rate")
        if isinstance(self.patches, bool) or not (isinstance(self.patches, int) and 0 <= self.patches <= MAX_PATCHES):
            raise ConfigError(f"must be a whole number from 0 (off) to {MAX_PATCHES}, got {self.patches!r}",
                              param="repair_patches")
        if self.optimizer not in REPAIR_OPTIMIZERS:
            raise ConfigError(f"must be one of {', '.join(REPAIR_OPTIMIZERS)}, got {self.optimizer!r}",
                              param="repair_optimizer")
        if isinstance(self.backtrack, bool) or not (isinstance(self.backtrack, int) and 0 <= self.backtrack <= 10):
            raise ConfigError(f"must be a whole number from 0 (off) to 10, got {self.backtrack!r}",
                              param="repair_backtrack")

    def record(self) -> dict[str, float | int | str]:
        """Its settings; the guard's only when it is on and the patches only when there are some (records
        written before they existed read the same)."""
        values = asdict(self)
        if not self.patches:
            del values["patches"]
        return values if self.guard else {k: v for k, v in values.items() if not k.startswith("guard")}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> RepairSettings:
        """Read :meth:`record` back. Records without an optimizer were written when the repair only had Adam, those
        without backtrack before it existed (0)."""
        older: dict[str, Any] = {"optimizer": "adam", "backtrack": 0}
        return cls(**(older | data))


def training_is_the_defense(method: str) -> bool:
    """Whether ``method``'s training is the defense (fine-tuning, or the repair with no selection); False for a
    name that is not a method (DefenseConfig.check refuses it)."""
    if method not in METHOD_STEPS:
        return False
    select, train = METHOD_STEPS[method][:2]
    return train == "finetune" or (train == "repair" and select == "none")


@dataclass(frozen=True)
class DefenseConfig:
    """Every setting of a post-training defense: the search (Algorithm 1) and the optional repair.

    The field defaults are the default preset. ``stop``: :class:`KlStop` (ours) or :class:`AccuracyStop`
    (line 17 of Algorithm 1). ``holdout`` > 0 (ours): the mean activations come from a share 1-holdout of the
    aux set and the stopping rule's measures from the held-out rest. ``shifts`` > 0 (ours): the mean
    activations over the aux images and their translations by up to that many pixels
    (AuxFeatures.mean_activations); 0 is the paper's mean over the aux images. ``repair`` (ours,
    :mod:`flain_cli.repair`): after the search, distil the original model into the defended one on the aux
    set; None turns it off. ``AccuracyStop()``, ``shifts=0`` and no repair is Algorithm 1 exactly (the paper
    preset).
    """

    method: str = "flain"
    step: float = PAPER_STEP
    stop: Stop = KlStop(KL_UNITS[DEFAULT_KL_UNIT], DEFAULT_KL_UNIT)
    select: str = "crossing"
    holdout: float = 0.0
    shifts: int = 2
    rescale: bool = True  # lines 18-20 of Algorithm 1 (flain only); False is an ablation
    repair: RepairSettings | None = RepairSettings()

    @property
    def rule(self) -> str:
        """A short name: the method, '+shifts' for the translated aux images' mean, '+kl' for the kl stop
        ('+klshift' with its budget in shift units), '+distill' when the repair runs, '+guard' with its guard,
        '+patches' with patched copies, '+sgd' when it trains with SGD."""
        repair = self.repair
        stop = self.stop
        kl = "" if not isinstance(stop, KlStop) else "+kl" if stop.unit == "nats" else f"+kl{stop.unit}"
        return (self.method + ("+shifts" if self.shifts else "") + kl
                + ("+distill" if repair is not None else "")
                + ("+guard" if repair is not None and repair.guard else "")
                + ("+patches" if repair is not None and repair.patches else "")
                + ("+sgd" if repair is not None and repair.optimizer == "sgd" else ""))

    def check(self) -> None:
        """Refuse settings out of range before any work (those that need the activations are checked later)."""
        METHODS.check(self.method)
        for name in ("step", "holdout"):
            _finite(getattr(self, name), name)
        if not self.step > 0:
            raise ConfigError(f"must be > 0, got {self.step}", param="step")
        if not isinstance(self.stop, AccuracyStop | KlStop):
            raise ConfigError(f"must be one of {', '.join(STOPS)}, got {self.stop!r}", param="stop")
        self.stop.check()
        if isinstance(self.shifts, bool) or not isinstance(self.shifts, int) or not 0 <= self.shifts <= MAX_SHIFTS:
            raise ConfigError(f"must be a whole number of pixels from 0 to {MAX_SHIFTS}, got {self.shifts!r}",
                              param="shifts")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.holdout}", param="holdout")
        if self.select not in SELECTS:
            raise ConfigError(f"must be one of {', '.join(SELECTS)}, got {self.select!r}", param="select")
        if not isinstance(self.rescale, bool):
            raise ConfigError(f"must be true or false, got {self.rescale!r}", param="rescale")
        if self.repair is not None:
            self.repair.check()
        if self.trains_only and self.repair is None:
            raise ConfigError(f"{self.method} trains on the aux set: it needs the training settings of "
                              f"{opt('repair')} distill (steps, optimizer, learning rate)", param="method")

    @property
    def searches(self) -> bool:
        """Whether the method picks inputs along the thresholds (its step, stop, select, holdout, shifts count)."""
        return METHOD_STEPS[self.method][0] != "none"

    @property
    def trains(self) -> bool:
        """Whether training follows the selection (its repair settings count)."""
        return METHOD_STEPS[self.method][1] != "none"

    @property
    def trains_only(self) -> bool:
        """Whether its training is the defense (fine-tuning, or the repair with no selection)."""
        return training_is_the_defense(self.method)

    def record(self) -> dict[str, Any]:
        """The settings in the checkpoint's flat layout (docs/checkpoint-format.md)."""
        return ({"rule": self.rule, "method": self.method, "step": self.step} | self.stop.record()
                | {"select": self.select, "holdout": self.holdout, "shifts": self.shifts, "rescale": self.rescale,
                   "repair": None if self.repair is None else self.repair.record()})

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> DefenseConfig:
        """Read :meth:`record` back; records from before the kl stop read as the accuracy stop, from before
        --shifts as shifts 0."""
        name = data.get("stop", "accuracy")
        budget = data.get(STOP_KINDS[name].budget_param) if name in STOP_KINDS else None
        repair = data["repair"]
        return cls(method=data["method"], step=data["step"], stop=make_stop(name, budget, data.get("kl_unit")),
                   select=data["select"], holdout=data["holdout"], shifts=data.get("shifts", 0),
                   rescale=data["rescale"], repair=None if repair is None else RepairSettings.from_record(repair))


# Named settings: "default" is the rule docs/results.md chose (the field defaults above); "paper" is
# Algorithm 1 as written (step 0.001, rho 0.03 on the aux accuracy, the crossing model, rescale, the
# mean over the aux images themselves, no repair).
PRESETS: dict[str, DefenseConfig] = {"default": DefenseConfig(),
                                     "paper": DefenseConfig(stop=AccuracyStop(), shifts=0, repair=None)}
DEFAULT = PRESETS["default"]

REPAIR_CHOICES = ("distill", "none")  # the repair: on (distillation) or off
# the settings defense_config takes besides the preset: `flain defend`'s options by their library names
OVERRIDES = ("method", "step", "stop", "rho", "kl", "kl_unit", "select", "holdout", "shifts", "rescale", "repair",
             *(f"repair_{f}" for f in ("steps", "optimizer", "lr", "alpha", "temperature", "guard", "guard_ratio",
                                       "guard_rate", "patches", "backtrack")))


def defense_config(preset: str = "default", **overrides: Any) -> DefenseConfig:
    """The preset, with every setting given in ``overrides`` in its place, checked.

    Args:
        preset: a name of PRESETS.
        overrides: settings by `flain defend`'s option names (OVERRIDES: ``rho`` for ``--rho``,
            ``repair_steps`` for ``--repair-steps``...); None means "not given".

    A budget without ``stop`` picks its stop: ``rho`` the accuracy stop, ``kl`` (or ``kl_unit``) the kl stop; a
    budget the chosen stop does not read is refused. ``kl`` needs its ``kl_unit``; ``kl_unit`` without ``kl``
    brings that unit's budget (KL_UNITS), the kl stop without either the default's (1.5 shift). ``repair`` is
    "distill" or "none". ``repair_optimizer`` without ``repair_lr`` brings that optimizer's learning rate.
    Raises ConfigError naming the setting at fault.

    Example: ``defense_config("paper", rho=0.02)``; ``defense_config(repair="none")``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDES))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(OVERRIDES)}")
    if preset not in PRESETS:
        raise ConfigError(f"must be one of {', '.join(PRESETS)}, got {preset!r}", param="preset")
    base = PRESETS[preset]
    rho, kl, stop_name = given.pop("rho", None), given.pop("kl", None), given.pop("stop", None)
    unit = given.pop("kl_unit", None)
    if stop_name is None and rho is not None and (kl is not None or unit is not None):
        raise ConfigError(f"{opt('rho')} and {opt('kl')} are the budgets of two different stops; give one, or "
                          f"{opt('stop')} to choose")
    if stop_name is None:
        stop_name = "accuracy" if rho is not None else "kl" if kl is not None or unit is not None else base.stop.name
    if stop_name == "kl" and rho is not None:
        raise ConfigError(f"is the accuracy stop's budget and has no effect with {opt('stop')} kl; drop it or "
                          f"pass {opt('stop')} accuracy", param="rho")
    if stop_name == "accuracy" and (kl is not None or unit is not None):
        raise ConfigError(f"is the kl stop's {'budget' if kl is not None else 'unit'} and has no effect with "
                          f"{opt('stop')} accuracy; drop it or pass {opt('stop')} kl",
                          param="kl" if kl is not None else "kl_unit")
    if stop_name == "kl" and kl is not None and unit is None:  # 0.05 nats and 0.05 x the shift KL are worlds apart
        raise ConfigError(f"needs its unit, the default stop's budget being in shift units: add "
                          f"{opt('kl_unit')} nats (what {opt('kl')} meant before) or {opt('kl_unit')} shift",
                          param="kl")
    stop = make_stop(stop_name, rho if stop_name == "accuracy" else kl, unit or DEFAULT_KL_UNIT)
    if stop_name == base.stop.name and rho is None and kl is None and unit is None:
        stop = base.stop
    choice = given.pop("repair", None)
    repair = _repair(base.repair, choice,
                     {k.removeprefix("repair_"): given.pop(k) for k in list(given) if k.startswith("repair_")})
    if repair is None and choice is None and training_is_the_defense(given.get("method", base.method)):
        repair = RepairSettings()  # a preset without a repair (paper): a method that is training takes the default
    config = replace(base, stop=stop, repair=repair, **given)
    config.check()
    return config


def _repair(base: RepairSettings | None, choice: str | None, given: dict[str, Any]) -> RepairSettings | None:
    """The repair of :func:`defense_config`: ``base`` (the preset's), switched by ``choice``, changed by ``given``."""
    if choice is not None and choice not in REPAIR_CHOICES:
        hint = (f"; the optimizer is {opt('repair_optimizer')} and the patched copies {opt('repair_patches')}"
                if isinstance(choice, str) and choice.startswith("distill-") else "")
        raise ConfigError(f"must be one of {', '.join(REPAIR_CHOICES)}, got {choice!r}{hint}", param="repair")
    on = base is not None if choice is None else choice == "distill"
    if given and not on:
        raise ConfigError(f"has no effect without the repair; drop it or pass {opt('repair')} distill",
                          param=f"repair_{next(iter(given))}")
    if not on:
        return None
    settings = base or RepairSettings()
    if "optimizer" in given:  # with its own learning rate, unless repair_lr gives one
        optimizer = given.pop("optimizer")
        if optimizer not in REPAIR_OPTIMIZERS:
            raise ConfigError(f"must be one of {', '.join(REPAIR_OPTIMIZERS)}, got {optimizer!r}",
                              param="repair_optimizer")
        settings = settings.with_optimizer(optimizer)
    settings = replace(settings, **given)
    if not settings.guard and {"guard_ratio", "guard_rate"} & set(given):
        raise ConfigError(f"{opt('repair_guard_ratio')} and {opt('repair_guard_rate')} shape the guard, which is "
                          f"off; drop them or pass {opt('repair_guard')} 1")
    return settings
