"""`flain defend`: FLAIN (or pruning) on the defended layer; writes a cleaned checkpoint."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ..catalog import METHODS
from ..errors import ConfigError
from ..files import FilePlan
from ..settings import (
    KL_BUDGET,
    PAPER_RHO,
    PAPER_STEP,
    PRESETS,
    REPAIR_LR,
    REPAIR_OPTIMIZERS,
    SELECTS,
    STOPS,
    DefenseConfig,
    RepairSettings,
)
from ..tables import trace_csv
from .common import (
    ArchOpt,
    AuxOpt,
    ClassNamesOpt,
    DatasetOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    MeanOpt,
    ModelArg,
    ModelDefOpt,
    SeedOpt,
    StdOpt,
    StrictOpt,
    err,
    model_source,
    out,
    print_json,
    print_notes,
    resolve_device,
)

if TYPE_CHECKING:
    from ..defense import SearchStep

# members from the registries; a bad value is a usage error (exit 2). mypy cannot list such members.
Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # type: ignore[misc]
Select = Enum("Select", {name: name for name in SELECTS}, type=str)  # type: ignore[misc]
Stop = Enum("Stop", {name: name for name in STOPS}, type=str)  # type: ignore[misc]
Optimizer = Enum("Optimizer", {name: name for name in REPAIR_OPTIMIZERS}, type=str)  # type: ignore[misc]


_REPAIR = RepairSettings()  # the repair's defaults, for the help


class Repair(str, Enum):
    distill = "distill"
    none = "none"


def build_config(preset: str, method: str | None, step: float | None, rho: float | None, select: str | None,
                 holdout: float | None, rescale: bool | None, repair: str | None,
                 repair_settings: dict[str, float | int | str | None], stop: str | None = None,
                 kl: float | None = None, shifts: int | None = None) -> DefenseConfig:
    """The preset, with every option the user gave in its place.

    A budget without ``--stop`` picks its stop: ``--rho`` the accuracy stop, ``--kl`` the kl stop.
    ``--repair-optimizer`` without ``--repair-lr`` brings that optimizer's learning rate.
    """
    base = PRESETS[preset]
    if stop is None and rho is not None and kl is not None:
        raise ConfigError("--rho and --kl are the budgets of two different stops; give one, or --stop to choose")
    if stop is None and (rho is not None or kl is not None):
        stop = "accuracy" if rho is not None else "kl"
    given: dict[str, Any] = {k: v for k, v in repair_settings.items() if v is not None}
    repair_on = base.repair is not None if repair is None else repair == "distill"
    if given and not repair_on:
        raise ConfigError(f"--repair-{next(iter(given)).replace('_', '-')} has no effect without the repair; "
                          "drop it or pass --repair distill")
    chosen_repair = base.repair or RepairSettings()
    if "optimizer" in given:  # with its own learning rate, unless --repair-lr gives one
        chosen_repair = chosen_repair.with_optimizer(given.pop("optimizer"))
    settings = dataclasses.replace(chosen_repair, **given) if repair_on else None
    if settings is not None and not settings.guard and {"guard_ratio", "guard_rate"} & set(given):
        raise ConfigError("--repair-guard-ratio and --repair-guard-rate shape the guard, which is off; "
                          "drop them or pass --repair-guard 1")
    chosen: dict[str, Any] = {"method": method, "step": step, "rho": rho, "select": select, "holdout": holdout,
                              "rescale": rescale, "stop": stop, "kl": kl, "shifts": shifts}
    config = dataclasses.replace(base, repair=settings, **{k: v for k, v in chosen.items() if v is not None})
    if config.stop == "kl" and rho is not None:
        raise ConfigError("--rho is the accuracy stop's budget and has no effect with --stop kl; "
                          "drop it or pass --stop accuracy")
    if config.stop == "accuracy" and kl is not None:
        raise ConfigError("--kl is the kl stop's budget and has no effect with --stop accuracy; "
                          "drop it or pass --stop kl")
    return config


def default_out(model: Path, method: str) -> Path:
    return model.with_name(f"{model.name.removesuffix('.safetensors')}.{method}.safetensors")


def defend(
    model: ModelArg,
    aux: AuxOpt,
    init: Annotated[Path | None, typer.Option(
        help="The initial checkpoint W0 of the same run (init.safetensors); needed by FLAIN, not by --method prune.",
        show_default=False)] = None,
    preset: Annotated[Preset, typer.Option(
        help=f"default: Algorithm 1's search (step {PAPER_STEP}, crossing) on the means over the aux images and "
             f"their moves (--shifts 2), stopped at --kl {KL_BUDGET}, then the distillation repair (SGD), which keeps "
             f"more clean accuracy; paper: Algorithm 1 exactly (rho {PAPER_RHO}), no repair. The options below "
             "override the preset.")
    ] = Preset("default"),
    method: Annotated[str | None, typer.Option(help=f"{'|'.join(METHODS.names())}: flip the selected neurons' "
                                                    "updates, or zero their weights (preset: flain).",
                                               show_default=False)] = None,
    step: Annotated[float | None, typer.Option(help=f"Threshold step (preset: {PAPER_STEP}, the paper's).",
                                               show_default=False)] = None,
    stop: Annotated[Stop | None, typer.Option(
        help="kl (not in the paper; preset default): stop where the mean KL divergence of the outputs from the "
             "original model's on the aux set reaches --kl. accuracy: stop where the aux accuracy dropped by --rho "
             "(line 17 of Algorithm 1; preset paper).", show_default=False)] = None,
    rho: Annotated[float | None, typer.Option(
        help=f"Tolerated aux accuracy drop of the accuracy stop ({PAPER_RHO}, the paper's largest); "
             "without --stop it selects that stop.", show_default=False)] = None,
    kl: Annotated[float | None, typer.Option(
        help=f"Tolerated mean KL divergence from the original outputs, for the kl stop ({KL_BUDGET}, chosen on our "
             "tuning trainings); without --stop it selects that stop.", show_default=False)] = None,
    select: Annotated[Select | None, typer.Option(help=f"{'|'.join(SELECTS)}: keep the model at which the stop rule "
                                                    "first fired (preset, the paper), or the last one before it.",
                                               show_default=False)] = None,
    holdout: Annotated[float | None, typer.Option(
        help="Not in the paper: take the mean activations from a share 1-F of the aux set and the stopping "
             "rule's accuracies from the held-out share F (preset: 0, one set for both).", show_default=False)] = None,
    shifts: Annotated[int | None, typer.Option(
        help="Not in the paper: take the mean activations over the aux images and their copies moved by up to N "
             "pixels in each direction ((2N+1)^2 positions, black border), so that inputs clean images use near "
             "where the aux images have them are not taken for silent (default preset: 2; paper preset: 0, the "
             "aux images only; docs/flain.md).", metavar="N", show_default=False)] = None,
    rescale: Annotated[bool | None, typer.Option(
        "--rescale/--no-rescale", help="Scale the layer back to its original norm after flipping (Algorithm 1 lines "
                                       "18-20; preset: on). --no-rescale is an ablation.", show_default=False)] = None,
    repair: Annotated[Repair | None, typer.Option(
        help="Not in the paper: after the search, distil the original model into the defended one on the aux set "
             "(the flipped columns stay as flipped): distill (preset default) or none (preset paper).",
        show_default=False)] = None,
    repair_steps: Annotated[int | None, typer.Option(help=f"Repair: full-batch steps (default {_REPAIR.steps}).",
                                                     show_default=False)] = None,
    repair_optimizer: Annotated[Optimizer | None, typer.Option(
        help="Repair: sgd (the default preset's; momentum 0.9: it moves the weights of near-silent inputs less, "
             "so less of a backdoor comes back) or adam (the default until 2026-11-30 evening, and with --preset paper "
             "--repair distill; docs/results.md).",
        show_default=False)] = None,
    repair_lr: Annotated[float | None, typer.Option(
        help=f"Repair: learning rate (default {REPAIR_LR['adam']:g} with adam, {REPAIR_LR['sgd']:g} with sgd).",
        show_default=False)] = None,
    repair_alpha: Annotated[float | None, typer.Option(
        help=f"Repair: weight of the distillation loss, 1-alpha on the labels (default {_REPAIR.alpha:g}).",
        show_default=False)] = None,
    repair_temperature: Annotated[float | None, typer.Option(
        help=f"Repair: distillation temperature (default {_REPAIR.temperature:g}).", show_default=False)] = None,
    repair_guard: Annotated[float | None, typer.Option(
        help="Repair, not in the paper: weight of the silent-neuron guard, which asks for the original outputs also "
             "when random low-activation inputs fire (default 0: off; 1 is the setting measured in "
             "docs/results.md).", show_default=False)] = None,
    repair_guard_ratio: Annotated[float | None, typer.Option(
        help=f"Guard: candidates are this many times the flipped count of lowest-activation inputs (default "
             f"{_REPAIR.guard_ratio:g}).",
        show_default=False)] = None,
    repair_guard_rate: Annotated[float | None, typer.Option(
        help=f"Guard: share of the candidates switched on in each perturbed copy (default {_REPAIR.guard_rate:g}).",
        show_default=False)] = None,
    repair_patches: Annotated[int | None, typer.Option(
        help="Repair, not in the paper: this many copies of each aux image with one white square (side 2-6 pixels, "
             "at a random place) must give the original model's outputs on the clean image: it teaches the model to "
             "ignore small bright patches, which a pixel trigger is (default 0: off; 2 is the setting measured in "
             "docs/results.md, 'Patched copies').", show_default=False)] = None,
    seed: SeedOpt = 0,
    layer: LayerOpt = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Cleaned checkpoint (default: MODEL's name with .METHOD.safetensors).",
        show_default=False)] = None,
    trace: Annotated[Path | None, typer.Option(
        help="Write the search curve as CSV (lambda, selected, aux_acc, drop, kl): one row per threshold at which the "
             "selection changed, the curve being constant in between (with --plain: every threshold).",
        show_default=False)] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Run Algorithm 1 literally (every lambda, whole network): slow, same result.")] = False,
    arch: ArchOpt = None,
    dataset: DatasetOpt = None,
    strict: StrictOpt = True,
    model_def: ModelDefOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    class_names: ClassNamesOpt = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a backdoor: flip (or prune) the weight updates of low-activation input neurons."""
    from ..audit import defend_checkpoint
    from ..checkpoint import save_checkpoint
    from ..modeldef import model_def_file

    config = build_config(preset.value, method, step, rho, select and select.value, holdout, rescale,
                          repair and repair.value,
                          {"steps": repair_steps, "optimizer": repair_optimizer and repair_optimizer.value,
                           "lr": repair_lr, "alpha": repair_alpha,
                           "temperature": repair_temperature, "guard": repair_guard,
                           "guard_ratio": repair_guard_ratio, "guard_rate": repair_guard_rate,
                           "patches": repair_patches},
                          stop and stop.value, kl, shifts)
    config.check()
    method, step, rho = config.method, config.step, config.rho
    target = out_path or default_out(model, method)
    plan = FilePlan({"MODEL": model, "--init": init, "--aux": aux,
                     "--model-def": model_def_file(model_def),
                     "--class-names": class_names},
                    {"--out": target, "--trace": trace}, force=force)
    torch_device = resolve_device(device)
    source = model_source(arch, dataset, model_def, strict, mean, std, class_names)
    with plan.writing() as stage:  # claimed from here; both files appear at the end, or neither
        outcome = defend_checkpoint(model, init, aux, config, layer=layer, source=source, plain=plain, seed=seed,
                                    device=torch_device)
        res, record = outcome.result, outcome.record
        save_checkpoint(stage["--out"], outcome.state, outcome.meta)
        if trace is not None:
            stage["--trace"].write_text(trace_csv(res.trace, res.acc0))
    print_notes(outcome.notes)
    for warning in record.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)
    stored = record.to_json()  # the checkpoint's record, in the report's order and names
    summary = {"rule": config.rule, "preset": preset.value, "repair": stored["repair"], "method": method,
               "lambda": record.lam, "flipped": record.flipped, "of": record.of,
               "aux_acc_before": record.aux_acc_before, "aux_acc_after": record.aux_acc_after,
               "steps": record.steps, "out": str(target), "layer": record.layer, "select": config.select,
               "step": step, "stop": config.stop, "rho": rho if config.stop == "accuracy" else None,
               "kl": stored["kl"], "kl_kept": record.kl_kept, "mu": record.mu, "aux_acc_kept": record.aux_acc_kept,
               "all_selected": record.all_selected, "evaluations": record.evaluations, "n_aux": record.aux.n,
               "holdout": config.holdout, "shifts": config.shifts, "seconds": round(outcome.seconds, 3),
               "warnings": list(record.warnings),
               "notes": list(outcome.notes)}
    if as_json:
        print_json(summary)
        return
    budget = f"rho {rho}" if config.stop == "accuracy" else f"kl {config.kl}"
    curve = Table(title=f"search on {record.layer} ({method}, step {step}, {budget}): "
                        f"thresholds where the selection changed")
    columns = ("lambda", "neurons", "aux accuracy", "drop") + (("kl",) if config.stop == "kl" else ())
    for column in columns:
        curve.add_column(column, justify="right")
    rows: list[SearchStep | None] = [*res.trace] if len(res.trace) <= 24 else [*res.trace[:10], None, *res.trace[-10:]]
    for s in rows:
        if s is None:
            curve.add_row("...", *[""] * (len(columns) - 1))
        else:
            curve.add_row(f"{s.lam:.6f}", str(s.selected), f"{s.acc:.4f}", f"{res.acc0 - s.acc:+.4f}",
                          *([f"{s.kl:.4f}"] if config.stop == "kl" else []))
    out.print(curve)
    table = Table(title=f"flain defend {model} (rule {config.rule}, preset {preset.value})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in (("final lambda", f"{res.lam:.6f}"),
                       ("neurons changed", f"{res.changed} of {res.mask.numel()}"),
                       (f"aux accuracy ({record.aux.n} images)", f"{res.acc0:.4f} -> "
                        + (f"{record.aux_acc_flipped:.4f} (flipped) -> " if record.aux_acc_flipped is not None
                           else "")
                        + f"{record.aux_acc_after:.4f}"),
                       ("thresholds (Algorithm 1 steps)", str(res.steps)),
                       ("network evaluations", str(res.evaluations)),
                       ("seconds", f"{outcome.seconds:.2f}"), ("written", str(target))):
        table.add_row(key, value)
    out.print(table)
