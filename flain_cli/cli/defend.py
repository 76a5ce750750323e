"""`flain defend`: FLAIN (or pruning) on the defended layer; writes a cleaned checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..catalog import METHODS
from ..errors import ConfigError
from ..files import FilePlan
from ..settings import (
    DEFAULT,
    DEFAULT_KL_UNIT,
    KL_UNITS,
    PAPER_RHO,
    PRESETS,
    REPAIR_CHOICES,
    REPAIR_LR,
    REPAIR_OPTIMIZERS,
    SELECTS,
    STOPS,
    defense_config,
)
from ..tables import trace_csv
from .common import (
    ESSENTIALS,
    RUN_PANEL,
    AuxOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    ModelArg,
    SeedOpt,
    SourceOptions,
    resolve_device,
    with_model_source,
)
from .output import err, out, print_json, print_notes

if TYPE_CHECKING:
    from ..defense import SearchResult, SearchStep
    from ..settings import DefenseConfig

# members from the registries; a bad value is a usage error (exit 2). mypy cannot list such members.
Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # type: ignore[misc]
Select = Enum("Select", {name: name for name in SELECTS}, type=str)  # type: ignore[misc]
Stop = Enum("Stop", {name: name for name in STOPS}, type=str)  # type: ignore[misc]
KlUnit = Enum("KlUnit", {name: name for name in KL_UNITS}, type=str)  # type: ignore[misc]
Optimizer = Enum("Optimizer", {name: name for name in REPAIR_OPTIMIZERS}, type=str)  # type: ignore[misc]
Repair = Enum("Repair", {name: name for name in REPAIR_CHOICES}, type=str)  # type: ignore[misc]

RULE, REPAIR, OUTPUT = "The rule", "The repair", RUN_PANEL
_REPAIR = DEFAULT.repair
assert _REPAIR is not None  # the default preset repairs


def default_out(model: Path, method: str) -> Path:
    return model.with_name(f"{model.name.removesuffix('.safetensors')}.{method}.safetensors")


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else str(choice.value)


@with_model_source
def defend(
    model: ModelArg,
    aux: AuxOpt,
    init: Annotated[Path | None, typer.Option(
        help="W0, the same run's model before training (init.safetensors); FLAIN needs it.",
        show_default=False, rich_help_panel=ESSENTIALS)] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Cleaned checkpoint (default: MODEL's name with .METHOD.safetensors).",
        show_default=False, rich_help_panel=ESSENTIALS)] = None,
    preset: Annotated[Preset, typer.Option(
        help="default: the rule below (docs/flain.md); paper: Algorithm 1 exactly (step 0.001, rho 0.03, no "
             "repair). Every other option changes the preset.", rich_help_panel=ESSENTIALS)] = Preset("default"),
    method: Annotated[str | None, typer.Option(
        help=f"{'|'.join(METHODS.names())} (default: {DEFAULT.method}; the others: docs/flain.md, 'Other "
             "methods').", show_default=False,
        rich_help_panel=ESSENTIALS)] = None,
    step: Annotated[float | None, typer.Option(
        help=f"Threshold step (default: {DEFAULT.step}, the paper's).", show_default=False,
        rich_help_panel=RULE)] = None,
    stop: Annotated[Stop | None, typer.Option(
        help="kl (default): where the outputs' mean KL divergence from the original's reaches --kl; accuracy: "
             "where the aux accuracy dropped by --rho (the paper's).",
        show_default=False, rich_help_panel=RULE)] = None,
    kl: Annotated[float | None, typer.Option(
        help=f"Budget of the kl stop, in the unit --kl-unit names (needed with it; default: {DEFAULT.stop.budget} "
             f"{DEFAULT_KL_UNIT}); it selects that stop.",
        show_default=False, rich_help_panel=RULE)] = None,
    kl_unit: Annotated[KlUnit | None, typer.Option(
        help=f"The unit of --kl: shift (default; budget {KL_UNITS['shift']}), the model's own KL between the aux "
             f"images and the same images moved by one pixel (ours), or nats (budget {KL_UNITS['nats']}, the "
             f"earlier default). Alone, it selects the kl stop with that unit's budget.",
        show_default=False, rich_help_panel=RULE)] = None,
    rho: Annotated[float | None, typer.Option(
        help=f"Budget of the accuracy stop (paper: {PAPER_RHO}); alone, it selects that stop.",
        show_default=False, rich_help_panel=RULE)] = None,
    shifts: Annotated[int | None, typer.Option(
        help=f"Rank inputs over the aux images and copies moved by up to N pixels (default: {DEFAULT.shifts}; "
             "0: the paper's).", metavar="N", show_default=False,
        rich_help_panel=RULE)] = None,
    select: Annotated[Select | None, typer.Option(
        help="Keep the model at which the stop fired (default, the paper's), or the last one before it.",
        show_default=False, rich_help_panel=RULE)] = None,
    holdout: Annotated[float | None, typer.Option(
        help="Share F of the aux set kept apart for the stop's measures (default: 0).",
        show_default=False, rich_help_panel=RULE)] = None,
    rescale: Annotated[bool | None, typer.Option(
        "--rescale/--no-rescale", help="Scale the layer back to its original norm (default: on).", show_default=False,
        rich_help_panel=RULE)] = None,
    repair: Annotated[Repair | None, typer.Option(
        help="Distil the original model into the defended one on the aux set, flipped columns frozen "
             "(default: distill; none: the paper's).", show_default=False,
        rich_help_panel=REPAIR)] = None,
    repair_steps: Annotated[int | None, typer.Option(
        help=f"Full-batch steps (default: {_REPAIR.steps}).", show_default=False, rich_help_panel=REPAIR)] = None,
    repair_optimizer: Annotated[Optimizer | None, typer.Option(
        help="sgd (default; momentum 0.9) or adam.",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_lr: Annotated[float | None, typer.Option(
        help=f"Learning rate (default: {REPAIR_LR['sgd']:g} with sgd, {REPAIR_LR['adam']:g} with adam).",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_alpha: Annotated[float | None, typer.Option(
        help=f"Weight of the distillation loss; 1-alpha goes to the labels (default: {_REPAIR.alpha:g}).",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_temperature: Annotated[float | None, typer.Option(
        help=f"Distillation temperature (default: {_REPAIR.temperature:g}).", show_default=False,
        rich_help_panel=REPAIR)] = None,
    repair_guard: Annotated[float | None, typer.Option(
        help="Weight of the guard: original outputs also when silent inputs fire (default: 0, off).",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_guard_ratio: Annotated[float | None, typer.Option(
        help=f"Guard: candidates per flipped input (default: {_REPAIR.guard_ratio:g}).",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_guard_rate: Annotated[float | None, typer.Option(
        help=f"Guard: share of the candidates switched on in each perturbed copy (default: {_REPAIR.guard_rate:g}).",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_patches: Annotated[int | None, typer.Option(
        help="Copies of each aux image with a random white square, asked for the clean outputs (default: 0).",
        show_default=False,
        rich_help_panel=REPAIR)] = None,
    repair_backtrack: Annotated[int | None, typer.Option(
        help=f"Rerun a diverged repair or fine-tuning at a third of the learning rate, up to N times (default: "
             f"{_REPAIR.backtrack}; 0: off).",
        metavar="N", show_default=False, rich_help_panel=REPAIR)] = None,
    layer: LayerOpt = None,
    seed: SeedOpt = 0,
    trace: Annotated[Path | None, typer.Option(
        help="Write the search curve as CSV (lambda, selected, aux_acc, drop, kl).",
        show_default=False, rich_help_panel=OUTPUT)] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Run Algorithm 1 literally (every lambda, whole network): slow, same result.",
        rich_help_panel=OUTPUT)] = False,
    *,
    source: SourceOptions,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a backdoor: flip (or prune) the weight updates of low-activation input neurons."""
    from ..audit import defend_checkpoint
    from ..checkpoint import save_checkpoint

    config = defense_config(preset.value, method=method, step=step, stop=_value(stop), rho=rho, kl=kl,
                            kl_unit=_value(kl_unit), select=_value(select), holdout=holdout, shifts=shifts,
                            rescale=rescale,
                            repair=_value(repair), repair_steps=repair_steps,
                            repair_optimizer=_value(repair_optimizer), repair_lr=repair_lr, repair_alpha=repair_alpha,
                            repair_temperature=repair_temperature, repair_guard=repair_guard,
                            repair_guard_ratio=repair_guard_ratio, repair_guard_rate=repair_guard_rate,
                            repair_patches=repair_patches, repair_backtrack=repair_backtrack)
    method, step = config.method, config.step
    if trace is not None and METHODS.get(method).select != "search":
        raise ConfigError(f"is the search's curve; method {method} does not search its thresholds", param="trace")
    target = out_path or default_out(model, method)
    plan = FilePlan({"MODEL": model, "--init": init, "--aux": aux} | source.inputs(),
                    {"--out": target, "--trace": trace}, force=force)
    torch_device = resolve_device(device)
    with plan.writing() as stage:  # claimed from here; both files appear at the end, or neither
        outcome = defend_checkpoint(model, init, aux, config, layer=layer, source=source.build(), plain=plain,
                                    seed=seed, device=torch_device)
        res, record = outcome.result, outcome.record
        save_checkpoint(stage["--out"], outcome.state, outcome.meta)
        if trace is not None and res is not None:
            stage["--trace"].write_text(trace_csv(res.trace, res.acc0))
    print_notes(outcome.notes)
    for warning in record.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)
    stored = record.to_json()  # the checkpoint's record, in the report's order and names
    summary = {"rule": config.rule, "preset": preset.value, "repair": stored["repair"], "method": method,
               "lambda": record.lam, "flipped": record.flipped, "of": record.of,
               "aux_acc_before": record.aux_acc_before, "aux_acc_after": record.aux_acc_after,
               "steps": record.steps, "out": str(target), "layer": record.layer, "select": config.select,
               "step": step, "stop": stored["stop"], "rho": stored["rho"],
               "kl": stored["kl"], "kl_unit": stored.get("kl_unit", "nats") if stored["kl"] is not None else None,
               "kl_scale": record.kl_scale, "kl_budget": record.kl_budget, "kl_kept": record.kl_kept,
               "mu": record.mu, "aux_acc_kept": record.aux_acc_kept,
               "all_selected": record.all_selected, "evaluations": record.evaluations, "n_aux": record.aux.n,
               "holdout": config.holdout, "shifts": config.shifts, "seconds": round(outcome.seconds, 3),
               "warnings": list(record.warnings),
               "notes": list(outcome.notes)}
    if as_json:
        print_json(summary)
        return
    if res is not None:
        out.print(_curve(res, record.layer, method, step, config))
    table = Table(title=f"flain defend {model} (rule {config.rule}, preset {preset.value})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [("final lambda", f"{record.lam:.6f}")] if record.lam is not None else []
    rows += [("neurons changed", f"{record.flipped} of {record.of}"),
             (f"aux accuracy ({record.aux.n} images)", f"{record.aux_acc_before:.4f} -> "
              + (f"{record.aux_acc_flipped:.4f} ({'selected' if res is None else 'flipped'}) -> "
                 if record.aux_acc_flipped is not None else "") + f"{record.aux_acc_after:.4f}")]
    if record.kl_scale is not None:
        rows.append(("kl budget (nats)", f"{record.kl_budget:.4f} = {config.stop.budget:g} x the shift KL "
                                         f"{record.kl_scale:.4f}"))
    if res is not None:
        rows += [("thresholds (Algorithm 1 steps)", str(record.steps)),
                 ("network evaluations", str(record.evaluations))]
    for key, value in rows + [("seconds", f"{outcome.seconds:.2f}")]:
        table.add_row(key, value)
    out.print(table)
    out.print(f"written: {target}", soft_wrap=True, markup=False, highlight=False)  # whole, on one line: a path


def _curve(res: SearchResult, layer: str, method: str, step: float, config: DefenseConfig) -> Table:
    """The search's thresholds where the selection changed (the first and last ten of a long one)."""
    curve = Table(title=f"search on {layer} ({method}, step {step}, {config.stop.describe()}): "
                        f"thresholds where the selection changed")
    measured_kl = config.stop.needs_divergence
    columns = ("lambda", "neurons", "aux accuracy", "drop") + (("kl",) if measured_kl else ())
    for column in columns:
        curve.add_column(column, justify="right")
    rows: list[SearchStep | None] = [*res.trace] if len(res.trace) <= 24 else [*res.trace[:10], None, *res.trace[-10:]]
    for s in rows:
        if s is None:
            curve.add_row("...", *[""] * (len(columns) - 1))
        else:
            curve.add_row(f"{s.lam:.6f}", str(s.selected), f"{s.acc:.4f}", f"{res.acc0 - s.acc:+.4f}",
                          *([f"{s.kl:.4f}"] if measured_kl else []))
    return curve
