"""Batch experiments: attack once, evaluate many defenses, cached on disk.

A TOML file describes a grid (see experiments/*.toml and docs/experiments.md):

    name = "table1-fmnist"
    [train]            # fixed `flain train` options (names with _ or -)
    dataset = "fmnist"
    rounds = 30
    [grid]             # lists; their cartesian product is the set of training configurations
    attack = ["0:5", "0:6", "0:7"]
    [defense]
    methods = ["none", "prune", "flain", "rlr"]   # rlr trains again with the RLR aggregator
    aux_per_class = 20
    preset = "default"            # `flain defend --preset` (the default); every other key below is one
    rho = [0.03, 0.0]             # of `flain defend`'s options by its name (repair_optimizer for
    repair = ["none", "distill"]  # --repair-optimizer), and any of them, preset and aux_per_class may be
    stop = ["accuracy", "kl"]     # lists: prune and flain run once per combination

Each combination is one call of :func:`flain_cli.settings.defense_config`, as `flain defend` makes it,
so a grid without a [defense] rule defends with `flain defend`'s default. A setting a combination's
rule does not read (rho under the kl stop, kl and kl_unit under the accuracy stop, repair_* without the repair)
is left out of it, and combinations that come to the same rule are one column.

Every distinct training configuration is trained once into ``CACHE/train-<hash>/`` (CACHE: the
file's ``cache``, by default its results folder ``out``; several grid files may share one); the
post-training defenses are applied to that same final checkpoint. Each finished step leaves a JSON record
(written last, atomically), so a re-run skips what is done and an interrupted grid resumes; the
results files are rewritten after every cell. A cell that fails is recorded with its error and
the grid goes on. A training another process has under way (its folder's lock is held, e.g. by a
second `flain experiment` on the same grid) is left to it: its cells run at the end, once it is done. The
same lock is held while a defense is computed, so two workers never compute the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .audit import defend_checkpoint
from .auxdata import export_aux
from .catalog import METHOD_STEPS
from .checkpoint import save_checkpoint
from .datasets import DATASETS, Dataset, load_dataset
from .errors import ConfigError, FlainError, opt
from .evaluation import evaluate_checkpoint
from .events import ExperimentListener
from .files import atomic_write, read_text
from .metrics import EvalResult, der
from .settings import MAX_POINTS, OVERRIDES, DefenseConfig, RepairSettings, defense_config
from .simulation import TrainConfig
from .tables import FINISHED, results_csv
from .training import RunBusy, run_lock, train_to_dir

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
POST_TRAINING = tuple(METHOD_STEPS)  # flain defend's methods; the others: none (the model as trained) and rlr
DEFENSES = ("none", *POST_TRAINING, "rlr")
DEFAULT_METHODS = ("none", "prune", "flain", "rlr")  # a grid's columns when its [defense] names none
RULE_KEYS = ("preset", *(k for k in OVERRIDES if k != "method"))  # the post-training rule's [defense] keys
# [defense] keys that may list values, in the order column labels name them
VARIED = ("preset", "step", "rho", "stop", "kl", "kl_unit", "select", "holdout", "shifts", "rescale",
          "aux_per_class",
          *(k for k in RULE_KEYS if k.startswith("repair")))
TOP_KEYS = {"name", "out", "cache", "train", "grid", "cells", "defense"}
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,199}")  # a grid's name: one path component
# in a file stem: each repair setting that differs from its optimizer's defaults, by a short name
REPAIR_SHORT = {"steps": "s", "lr": "lr", "alpha": "a", "temperature": "t", "guard": "g", "guard_ratio": "gr",
                "guard_rate": "gq", "patches": "p"}


def repair_label(repair: RepairSettings | None) -> str:
    """'none', or the repair's optimizer, each setting that differs from that optimizer's defaults, and its
    backtracking (``bt3``; named whenever it is on, so the stems from before it existed name what they hold)."""
    if repair is None:
        return "none"
    base = RepairSettings().with_optimizer(repair.optimizer)
    return "-".join([repair.optimizer, *(f"{short}{getattr(repair, name):g}" for name, short in REPAIR_SHORT.items()
                                        if getattr(repair, name) != getattr(base, name))]
                    + ([f"bt{repair.backtrack}"] if repair.backtrack else []))


def stem(config: DefenseConfig, aux_per_class: int, aux_seed: int) -> str:
    """File stem of a defended checkpoint in the cache: every setting that changes it, aux set included.

    Without the repair the stem is what it was before the repair existed (``flain-step0.001-rho0.03-crossing-
    aux20x-seed0``), so those cached defenses stay valid. The repair is named ``-repair-<optimizer>...``:
    before 2026-12-05 it was ``-distill`` (Adam), ``-distill-sgd`` and ``-distill-patches``, names no stem
    takes now, so an old cache entry is never read as a rule it does not hold (docs/experiments.md). Fine-tuning's
    settings are named ``-tune-<optimizer>...``: before 2026-12-06 they were ``-repair-...`` and fine-tuning had
    no backtracking, so those entries are not read as fine-tuning with it.
    """
    held = f"-holdout{config.holdout:g}" if config.holdout else ""
    moved = f"-shifts{config.shifts}" if config.shifts else ""
    search = f"-step{config.step:g}-{config.stop.label}-{config.select}{held}{moved}" if config.searches else ""
    training = "tune" if METHOD_STEPS[config.method][1] == "finetune" else "repair"
    repaired = f"-{training}-{repair_label(config.repair)}" if config.repair is not None and config.trains else ""
    unscaled = "-norescale" if config.method == "flain" and not config.rescale else ""
    return f"{config.method}{search}{repaired}{unscaled}-aux{aux_per_class}x-seed{aux_seed}"


SEARCH_KEYS = ("step", "rho", "stop", "kl", "kl_unit", "select", "holdout", "shifts", "rescale")


def unread(settings: dict[str, Any], method: str = "flain") -> set[str]:
    """The rule settings that a combination's own rule does not read: the other stop's budget, the repair's
    settings without the repair, and what the method does not use (the search's for a method that selects
    nothing, the repair's for one that does not train, the preset for one that is only training)."""
    ignored = {"accuracy": {"kl", "kl_unit"}, "kl": {"rho"}}.get(str(settings.get("stop")), set())
    if settings.get("repair") == "none":
        ignored |= {k for k in settings if k.startswith("repair_")}
    select, train, _ = METHOD_STEPS[method]
    if select == "none":
        ignored |= {*SEARCH_KEYS, "preset"}
    if train == "none":
        ignored |= {k for k in settings if k.startswith("repair")}
    return ignored


@dataclass(frozen=True)
class DefenseSettings:
    """One combination of a grid's [defense] settings: the methods, the aux set, and the post-training rule as a
    preset and the `flain defend` settings that change it (``rule``: name -> value pairs)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    aux_per_class: int = 20
    aux_seed: int = 0
    preset: str = "default"
    rule: tuple[tuple[str, Any], ...] = ()

    def setting(self, key: str) -> Any:
        """A [defense] setting's value in this combination (None: not given)."""
        return getattr(self, key) if key in ("preset", "aux_per_class") else dict(self.rule).get(key)

    def config(self, method: str) -> DefenseConfig:
        """The rule of ``method`` (prune or flain): `flain defend --preset PRESET --method METHOD ...`."""
        given = dict(self.rule)
        ignored = unread(given, method)
        return defense_config(self.preset, method=method, **{k: v for k, v in given.items() if k not in ignored})

    def tag(self, method: str) -> str:
        return stem(self.config(method), self.aux_per_class, self.aux_seed)

    def check(self) -> None:
        """Refuse a setting out of range (one `Error:` line) before anything trains."""
        for name in ("aux_per_class", "aux_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "aux_per_class"):
                raise ConfigError(f"[defense] {name} must be a whole number of at least "
                                  f"{int(name == 'aux_per_class')}, got {value!r}")
        for method in self.methods:
            if method in POST_TRAINING:
                try:
                    self.config(method)
                except ConfigError as exc:
                    raise ConfigError(f"[defense] {exc}") from None


@dataclass(frozen=True)
class Defense:
    """One column of the results: a method and, for prune/flain, the settings it ran with."""
    label: str
    method: str
    settings: DefenseSettings

    @property
    def aggregator(self) -> str:
        """The training this column reads: RLR is a defense during training, every other one after FedAvg."""
        return "rlr" if self.method == "rlr" else "fedavg"


def _label(value: object) -> str:
    """A varied setting in a column label: numbers as %g (0.03, not 0.030000), names as they are."""
    return f"{value:g}" if isinstance(value, float | int) and not isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Experiment:
    name: str
    out: Path  # results
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: tuple[DefenseSettings, ...]  # one per combination of listed step/rho/holdout/aux_per_class values
    cache: Path  # trainings (train-<hash>/), aux sets and defended checkpoints; may be shared by experiments
    cells: tuple[dict[str, Any], ...] = ()  # [[cells]]: the points listed one by one (then grid is empty)

    @property
    def keys(self) -> list[str]:
        """The keys that name a point: the grid's, or every key the listed cells use, in first-seen order."""
        if not self.cells:
            return list(self.grid)
        return list(dict.fromkeys(k for cell in self.cells for k in cell))

    @property
    def defense(self) -> DefenseSettings:
        """The first variant: the methods and aux seed, which all variants share."""
        return self.variants[0]

    @property
    def defenses(self) -> list[Defense]:
        """none and rlr once; prune and flain once per distinct defense, labelled by what varies.

        A setting the variant's rule does not read (`unread`) is left out of its label, and variants that
        differ only there are one defense: one column.
        """
        variants = self.variants
        varying = [k for k in VARIED if len({json.dumps(v.setting(k)) for v in variants}) > 1]
        out: list[Defense] = []
        for method in self.defense.methods:
            seen: set[str] = set()  # the defended checkpoints' stems: one column per distinct defense
            if method not in POST_TRAINING:  # none and rlr: no post-training rule, one column
                out.append(Defense(method, method, variants[0]))
                continue
            for v in variants:
                if (tag := v.tag(method)) in seen:
                    continue
                seen.add(tag)
                ignored = unread(dict(v.rule), method)
                out.append(Defense(method + "".join(f" {k}={_label(v.setting(k))}" for k in varying
                                                    if k not in ignored), method, v))
        return out

    def run_dir(self, cfg: TrainConfig) -> Path:
        """Where the training of ``cfg`` lives in the cache."""
        return self.cache / f"train-{config_hash(cfg)}"

    def trained(self, cfg: TrainConfig) -> bool:
        """Whether the cache holds the finished training of ``cfg`` (its record is written last)."""
        run_dir = self.run_dir(cfg)
        return _read(run_dir / "train.json") is not None and (run_dir / "final.safetensors").is_file()

    def points(self) -> list[dict[str, Any]]:
        if self.cells:
            return [dict(cell) for cell in self.cells]
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def config(self, point: dict[str, Any], aggregator: str = "fedavg") -> TrainConfig:
        values = self.base | {k: v for k, v in point.items() if k != "role"} | {"aggregator": aggregator}
        if "arch" not in values:
            values["arch"] = DATASETS.get(values.get("dataset", "fmnist")).default_arch
        return TrainConfig(**values)


def _keys(table: dict[str, Any], where: str) -> dict[str, Any]:
    out = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(out) - TRAIN_FIELDS)
    if unknown:
        raise ConfigError(f"[{where}] has unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(TRAIN_FIELDS))}")
    return out


def load_experiment(path: Path, out: Path | None = None, cache: Path | None = None, *,
                    max_points: int = MAX_POINTS) -> Experiment:
    """Read and check a grid file (docs/experiments.md) before anything runs.

    Args: the TOML file; ``out``/``cache`` override its ``out``/``cache`` keys (cache defaults to
    out); a grid of more than ``max_points`` points is refused (each point is one or two trainings).
    Returns the `Experiment`: its points, its defense columns and where results and cache go.
    Raises ConfigError naming the key at fault.

    Example: ``run_experiment(load_experiment(Path("experiments/table1-fmnist.toml")))``.
    """
    try:
        raw = tomllib.loads(read_text(path, "experiment file", max_bytes=1 << 20))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key or table {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    for key in ("train", "grid", "defense"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{path}: {key} must be a table ([{key}]), got {raw[key]!r}")
    for key in ("name", "out", "cache"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} must be a string, got {raw[key]!r}")
    base, grid = _keys(raw.get("train", {}), "train"), _keys(raw.get("grid", {}), "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key} must be a non-empty list, got {values!r}")
    cells = _cells(raw.get("cells"), path)
    if cells and grid:
        raise ConfigError(f"{path}: give the points as a [grid] or as [[cells]], not both")
    if "aggregator" in base or "aggregator" in grid or any("aggregator" in c for c in cells):
        raise ConfigError("set the aggregator through [defense] methods (\"rlr\"), not [train] or [grid]")
    variants = _defense_variants(raw.get("defense", {}))
    name = raw.get("name", Path(path).stem)
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{path}: name {name!r:.80} must be one folder name (letters, digits, '.', '_', '-', '+', "
                          "'=', not starting with '.'): it names the results folder runs/experiments/NAME")
    out = Path(out or raw.get("out") or Path("runs/experiments") / name)
    experiment = Experiment(name, out, base, grid, variants, Path(cache or raw.get("cache") or out), cells)
    size = len(cells) if cells else math.prod(len(v) for v in grid.values())
    if size > max_points:
        raise ConfigError(f"{path}: the grid has {size:,} points, more than {max_points:,}; "
                          f"shrink it, or raise the limit with {opt('max_points')} if you mean it")
    for point in experiment.points():  # fail early on a bad option, before hours of training
        try:
            cfg = experiment.config(point)
            cfg.validate(DATASETS.get(cfg.dataset).num_classes)
        except (TypeError, ConfigError) as exc:  # a TOML key, not an option: "rounds must be ..."
            raise ConfigError(f"{path}: {exc}") from None
        if cfg.precision == "auto":  # the cache key must not depend on which machine trains the cell
            raise ConfigError(f"{path}: precision auto would train differently on the machines that share this "
                              "cache; give fp32, bf16 or fp16")
    for variant in variants:  # the defense settings too: a typo there must not wait for the trainings
        variant.check()
    return experiment


ROLES = ("tuning", "held-out", "reference")  # a listed cell's role: what a rule may be tuned on, or not


def _cells(raw: Any, path: Path) -> tuple[dict[str, Any], ...]:
    """[[cells]]: each a table of `flain train` options and an optional ``role`` (ROLES), checked."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
        raise ConfigError(f"{path}: cells must be a non-empty list of tables ([[cells]])")
    cells = []
    for i, cell in enumerate(raw, start=1):
        role = cell.get("role")
        if role is not None and role not in ROLES:
            raise ConfigError(f"{path}: cell {i} has role {role!r}; give one of {', '.join(ROLES)}")
        cells.append(_keys({k: v for k, v in cell.items() if k != "role"}, f"cells {i}")
                     | ({"role": role} if role is not None else {}))
    if len({json.dumps(c, sort_keys=True) for c in cells}) != len(cells):
        raise ConfigError(f"{path}: two cells are the same; list each once")
    return tuple(cells)


def _defense_variants(dset: dict[str, Any]) -> tuple[DefenseSettings, ...]:
    known = ("methods", "aux_per_class", "aux_seed", *RULE_KEYS)
    unknown = sorted(set(dset) - set(known))
    if unknown:
        raise ConfigError(f"[defense] has unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    lists = {k: dset[k] if isinstance(dset[k], list) else [dset[k]] for k in VARIED if k in dset}
    for key, values in lists.items():
        if not values or len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"[defense] {key} must list distinct values, got {values!r}")
    methods = dset.get("methods", list(DEFAULT_METHODS))
    if not isinstance(methods, list):
        raise ConfigError(f"[defense] methods must be a list, got {methods!r}")
    bad = [m for m in methods if m not in DEFENSES]
    if bad:
        raise ConfigError(f"[defense] methods {bad} unknown; choose from {', '.join(DEFENSES)}")
    fixed = {"methods": tuple(methods)} | {k: dset[k] for k in ("aux_seed",) if k in dset}
    keys = list(lists)
    variants = []
    for values in itertools.product(*(lists[k] for k in keys)):
        chosen = dict(zip(keys, values))
        own = {k: chosen.pop(k) for k in ("preset", "aux_per_class") if k in chosen}
        rule = tuple((k, chosen[k]) for k in RULE_KEYS if k in chosen)
        variants.append(DefenseSettings(**fixed, **own, rule=rule))
    return tuple(variants)


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write(path: Path, record: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))


@dataclass
class Cell:
    point: dict[str, Any]
    defense: str  # the Defense's label
    status: str = "pending"  # done | cached | failed | busy (its training under way in another process)
    acc: float | None = None
    asr: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def row(self) -> dict[str, Any]:
        return self.point | {"defense": self.defense, "acc": self.acc, "asr": self.asr, "status": self.status,
                             "error": self.error} | self.detail


def run_experiment(exp: Experiment, *, device: torch.device | str = "cpu", data_dir: Path | None = None,
                   listener: ExperimentListener | None = None,
                   datasets: dict[str, Dataset] | None = None) -> list[Cell]:
    """Run every cell of a grid (from :func:`load_experiment`), reusing cached trainings and defenses.

    Args:
        exp: the grid.
        device: where to train and evaluate.
        data_dir: where the datasets are (see :func:`flain_cli.datasets.load_dataset`).
        listener: progress events (the CLI draws them).
        datasets: already loaded datasets by name, filled as they are loaded.

    Returns:
        The cells in grid order, each with its status (done, failed with its error, busy
        elsewhere); results.csv/results.json in ``exp.out`` are rewritten after every cell.

    Example: ``run_experiment(load_experiment(Path("experiments/table1-fmnist.toml")))``.
    """
    listener = listener or ExperimentListener()
    start_results(exp)
    datasets = datasets if datasets is not None else {}
    for name in sorted({exp.config(p).dataset for p in exp.points()}):  # a missing dataset fails once, up front
        _dataset(name, data_dir, datasets)
    cells: list[Cell] = []
    deferred: list[tuple[int, Defense, str]] = []
    for point in exp.points():
        for defense in exp.defenses:
            cell = Cell(point, defense.label)
            label = ", ".join(f"{k}={v}" for k, v in point.items()) + f", {defense.label}"
            cells.append(cell)
            finished = attempt_cell(exp, cell, defense, device, data_dir, datasets, listener, wait=False)
            write_results(exp, cells)  # an interrupted grid still leaves what it finished
            if finished:
                listener.cell(label, cell.status)
            else:
                deferred.append((len(cells) - 1, defense, label))
                listener.waiting(label, cell.error or "")
    # trainings another process (e.g. a second `flain experiment` on the same grid) had under way:
    # wait for each, then take its checkpoint from the cache
    for index, defense, label in deferred:
        cells[index] = Cell(cells[index].point, defense.label)
        attempt_cell(exp, cells[index], defense, device, data_dir, datasets, listener, wait=True)
        write_results(exp, cells)
        listener.cell(label, cells[index].status)
    return cells


def start_results(exp: Experiment) -> None:
    """Create the results folder and record the grid's definition in it (experiment.json)."""
    exp.out.mkdir(parents=True, exist_ok=True)
    _write(exp.out / "experiment.json", _definition(exp) | {"cache": str(exp.cache)})


def attempt_cell(exp: Experiment, cell: Cell, defense: Defense, device: torch.device | str, data_dir: Path | None,
             datasets: dict[str, Dataset], listener: ExperimentListener, *, wait: bool) -> bool:
    """Run one cell, recording a failure on it; False when its training is busy elsewhere."""
    try:
        _run_cell(exp, cell, defense, device, data_dir, datasets, listener, wait)
    except RunBusy as exc:
        cell.status, cell.error = "busy", f"its training (or this defense of it) is under way in {exc.holder}"
        return False
    except FlainError as exc:
        cell.status, cell.error = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the grid
        cell.status, cell.error = "failed", f"{type(exc).__name__}: {exc}"
    return True


def _dataset(name: str, data_dir: Path | None, cache: dict[str, Dataset]) -> Dataset:
    if name not in cache:
        cache[name] = load_dataset(name, data_dir)
    return cache[name]


def _trained(exp: Experiment, cfg: TrainConfig, device: torch.device | str, data_dir: Path | None,
             datasets: dict[str, Dataset], listener: ExperimentListener, wait: bool) -> tuple[Path, bool]:
    run_dir = exp.run_dir(cfg)
    if exp.trained(cfg):
        return run_dir, True
    with run_lock(run_dir, wait=wait):
        if exp.trained(cfg):  # another process finished it while this one waited for the lock
            return run_dir, True
        outcome = train_to_dir(cfg, _dataset(cfg.dataset, data_dir, datasets), run_dir, device, listener)
        _write(run_dir / "train.json", {"config": cfg.to_dict()} | outcome.summary(cfg))
    return run_dir, False


def _aux(exp: Experiment, d: DefenseSettings, dataset: str, data_dir: Path | None) -> Path:
    path = exp.cache / f"aux-{dataset}-{d.aux_per_class}x-seed{d.aux_seed}"
    if not (path / "aux.json").is_file():
        try:  # a folder without its manifest is incomplete: replace it
            export_aux(dataset, d.aux_per_class, path, seed=d.aux_seed, data_dir=data_dir, overwrite=path.exists())
        except (ConfigError, OSError):
            if not (path / "aux.json").is_file():
                raise
            # else a second worker on the grid put the same (seeded) set in place first; use that one
    return path


def _run_cell(exp: Experiment, cell: Cell, defense: Defense, device: torch.device | str, data_dir: Path | None,
              datasets: dict[str, Dataset], listener: ExperimentListener, wait: bool = False) -> None:
    cfg = exp.config(cell.point, defense.aggregator)
    run_dir, cached = _trained(exp, cfg, device, data_dir, datasets, listener, wait)
    model = run_dir / "final.safetensors"
    cell.detail = {"method": defense.method}
    if defense.method in POST_TRAINING:
        d = defense.settings
        config = d.config(defense.method)
        tag = stem(config, d.aux_per_class, d.aux_seed)
        model = run_dir / f"{tag}.safetensors"
        record = _read(run_dir / f"{tag}.json")
        if record is None or not model.is_file():
            # the training folder's lock, so that two workers on one grid never compute the same defense: the
            # second defers the cell (or, at the end, waits) and then reads the first one's record
            with run_lock(run_dir, wait=wait):
                record = _read(run_dir / f"{tag}.json")
                if record is None or not model.is_file():
                    cached = False
                    record = _defended(exp, cfg, run_dir, model, config, d, data_dir, device)
                    _write(run_dir / f"{tag}.json", record)
        settings = {k: v for k, v in config.record().items() if k not in ("method", "repair")}
        cell.detail |= settings | {"repair": repair_label(config.repair), "aux_per_class": d.aux_per_class} | record
    report, fresh = _evaluated(model, cfg, device, data_dir, datasets)
    cell.acc, cell.asr = report["acc"], report["asr"]
    cell.detail = cell.detail | {k: report[k] for k in EVAL_KEYS[2:]} | {"checkpoint": str(model)}
    if defense.method in POST_TRAINING:  # the change against the undefended model, and BackdoorBench's DER
        before, fresh_before = _evaluated(run_dir / "final.safetensors", cfg, device, data_dir, datasets)
        fresh = fresh or fresh_before
        ratings = {name: der(_result(before), _result(report), all_classes) for name, all_classes in
                   (("der", False), ("der_all", True))}
        cell.detail |= {"d_acc": report["acc"] - before["acc"]} | ratings
    cell.status = "cached" if cached and not fresh else "done"


def _defended(exp: Experiment, cfg: TrainConfig, run_dir: Path, model: Path, config: DefenseConfig,
              d: DefenseSettings, data_dir: Path | None, device: torch.device | str) -> dict[str, Any]:
    """Defend the training in ``run_dir`` into ``model``; the record a cell keeps of it."""
    outcome = defend_checkpoint(run_dir / "final.safetensors", run_dir / "init.safetensors",
                                _aux(exp, d, cfg.dataset, data_dir), config, seed=d.aux_seed, device=device)
    save_checkpoint(model, outcome.state, outcome.meta)
    done = outcome.record
    return {"lambda": done.lam, "flipped": done.flipped, "of": done.of, "aux_acc_before": done.aux_acc_before,
            "aux_acc_after": done.aux_acc_after, "all_selected": done.all_selected} \
        | ({} if done.kl_scale is None else {"kl_scale": done.kl_scale, "kl_budget": done.kl_budget})


EVAL_KEYS = ("acc", "asr", "asr_clean", "asr_all", "ra")  # what a cell keeps of `flain eval`, in .eval.json


def _evaluated(model: Path, cfg: TrainConfig, device: torch.device | str, data_dir: Path | None,
               datasets: dict[str, Dataset]) -> tuple[dict[str, Any], bool]:
    """The model's `flain eval` figures, from its .eval.json (written here the first time); and whether they were
    computed now. Records without every key of EVAL_KEYS (written before they existed) are redone."""
    eval_path = model.with_suffix(".eval.json")
    report = _read(eval_path)
    if report is not None and all(k in report for k in EVAL_KEYS):
        return report, False
    res = evaluate_checkpoint(model, device=device, test=_dataset(cfg.dataset, data_dir, datasets).test).result
    report = {k: getattr(res, k) for k in EVAL_KEYS}
    _write(eval_path, report)
    return report, True


def _result(report: dict[str, Any]) -> EvalResult:
    return EvalResult(report["acc"], report["asr"], 0, 0, (), report["asr_clean"], report["asr_all"], report["ra"])


def varying_keys(exp: Experiment) -> list[str]:
    if exp.cells:
        return [k for k in exp.keys if len({json.dumps(c.get(k)) for c in exp.cells}) > 1] or exp.keys[:1]
    return [k for k, v in exp.grid.items() if len(v) > 1] or list(exp.grid)[:1]


def markdown_table(exp: Experiment, cells: list[Cell]) -> str:
    """Rows: grid point and defense; columns ASR and ACC, as in the paper's tables, and the ASR's floor."""
    keys = varying_keys(exp)
    header = "| " + " | ".join(keys + ["defense", "ASR", "ACC", "ASR without trigger"]) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 4)]
    def value(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for cell in cells:
        numbers = ([value(cell.asr), value(cell.acc), value(cell.detail.get("asr_clean"))]
                   if cell.status != "failed" else ["failed"] * 3)
        lines.append("| " + " | ".join([str(cell.point.get(k, "")) for k in keys] + [cell.defense] + numbers) + " |")
    return "\n".join(lines) + "\n"


def result_paths(exp: Experiment) -> dict[str, Path]:
    return {"md": exp.out / "results.md", "csv": exp.out / "results.csv", "json": exp.out / "results.json"}


def _definition(exp: Experiment) -> dict[str, Any]:
    """The grid as experiment.json records it (without where its cache is)."""
    listed = {"cells": list(exp.cells)} if exp.cells else {}
    return {"name": exp.name, "train": exp.base, "grid": exp.grid} | listed | {
        "defenses": [{"label": d.label} | dataclasses.asdict(d.settings) for d in exp.defenses]}


def _fingerprint(exp: Experiment) -> str:
    """Names the grid definition, so that results written for another definition of it are never merged."""
    return hashlib.sha256(json.dumps(_definition(exp), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _with_others(exp: Experiment, cells: list[Cell]) -> list[Cell]:
    """``cells`` completed by what other workers on the same grid already wrote to its results.

    A worker rewrites the results after each of its cells; without this, one that is behind (or is
    stopped while it waits for another's training) would overwrite a table that a faster worker had
    finished with its own view, where those cells are still busy or not reached.
    """
    try:
        written = json.loads(result_paths(exp)["json"].read_text())
    except (OSError, ValueError):
        return cells
    if not isinstance(written, dict) or written.get("fingerprint") != _fingerprint(exp):
        return cells

    def key(point: dict[str, Any], defense: Any) -> str:
        return json.dumps([point.get(k) for k in exp.keys] + [defense], default=str)

    theirs = {key(row, row.get("defense")): row for row in written.get("rows", []) if isinstance(row, dict)}
    mine = {key(cell.point, cell.defense): cell for cell in cells}
    merged = []
    for point in exp.points():
        for defense in exp.defenses:
            cell, row = mine.get(key(point, defense.label)), theirs.get(key(point, defense.label))
            if row is not None and row.get("status") in FINISHED and (cell is None or cell.status == "busy"):
                detail = {k: v for k, v in row.items()
                          if k not in point and k not in ("defense", "acc", "asr", "status", "error")}
                cell = Cell(point, defense.label, "cached", row.get("acc"), row.get("asr"), detail)
            if cell is not None:
                merged.append(cell)
    return merged


def write_results(exp: Experiment, cells: list[Cell]) -> dict[str, Path]:
    """Rewrite the grid's results (json, csv, md) atomically: ``cells``, and the finished cells that another
    worker on the same grid has written and these do not have yet."""
    cells = _with_others(exp, cells)
    rows = [cell.row() for cell in cells]
    paths = result_paths(exp)
    _write(paths["json"], {"name": exp.name, "fingerprint": _fingerprint(exp), "rows": rows})
    text = results_csv(rows)
    atomic_write(paths["csv"], lambda tmp: tmp.write_text(text))
    md = f"## {exp.name}\n\n" + markdown_table(exp, cells)
    atomic_write(paths["md"], lambda tmp: tmp.write_text(md))
    return paths
