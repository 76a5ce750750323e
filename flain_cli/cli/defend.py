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
Optimizer = Enum("Optimizer", {name: name for name in REPAIR_OPTIMIZERS}, type=str)  # type: ignore[misc]
Repair = Enum("Repair", {name: name for name in REPAIR_CHOICES}, type=str)  # type: ignore[misc]

RULE, REPAIR, OUTPUT = "The rule", "The repair", "Output and diagnostics"
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
        help="The initial checkpoint W0 of the same run (init.safetensors); needed by FLAIN, not by --method prune.",
        show_default=False, rich_help_panel=ESSENTIALS)] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Cleaned checkpoint (default: MODEL's name with .METHOD.safetensors).",
        show_default=False, rich_help_panel=ESSENTIALS)] = None,
    preset: Annotated[Preset, typer.Option(
        help="default: the rule below (docs/flain.md); paper: Algorithm 1 exactly (step 0.001, rho 0.03, no "
             "repair). Every other option changes the preset.", rich_help_panel=ESSENTIALS)] = Preset("default"),
    method: Annotated[str | None, typer.Option(
        help=f"{'|'.join(METHODS.names())}: flip the selected inputs' updates (default: {DEFAULT.method}), zero "
             "them, fine-tune every layer on the aux labels, prune then fine-tune, the repair alone, or RNP's "
             "unlearn-and-recover pruning (docs/flain.md, 'Other methods').", show_default=False,
        rich_help_panel=ESSENTIALS)] = None,
    step: Annotated[float | None, typer.Option(
        help=f"Threshold step (default: {DEFAULT.step}, the paper's).", show_default=False,
        rich_help_panel=RULE)] = None,
    stop: Annotated[Stop | None, typer.Option(
        help="kl: stop where the mean KL divergence of the outputs from the original model's on the aux set "
             "reaches --kl (default). accuracy: stop where the aux accuracy dropped by --rho (Algorithm 1, line 17).",
        show_default=False, rich_help_panel=RULE)] = None,
    kl: Annotated[float | None, typer.Option(
        help=f"Budget of the kl stop (default: {DEFAULT.stop.budget}); alone, it selects that stop.",
        show_default=False, rich_help_panel=RULE)] = None,
    rho: Annotated[float | None, typer.Option(
        help=f"Budget of the accuracy stop: the aux accuracy drop it tolerates (paper: {PAPER_RHO}); alone, it "
             "selects that stop.", show_default=False, rich_help_panel=RULE)] = None,
    shifts: Annotated[int | None, typer.Option(
        help=f"Rank the inputs by their mean over the aux images and their copies moved by up to N pixels "
             f"(default: {DEFAULT.shifts}; 0: the aux images only, the paper's).", metavar="N", show_default=False,
        rich_help_panel=RULE)] = None,
    select: Annotated[Select | None, typer.Option(
        help=f"{'|'.join(SELECTS)}: keep the model at which the stop fired (default, the paper's), or the last "
             "one before it.", show_default=False, rich_help_panel=RULE)] = None,
    holdout: Annotated[float | None, typer.Option(
        help="Take the mean activations from a share 1-F of the aux set and the stop's measures from the "
             "held-out share F (default: 0, one set for both).", show_default=False, rich_help_panel=RULE)] = None,
    rescale: Annotated[bool | None, typer.Option(
        "--rescale/--no-rescale", help="Scale the layer back to its original norm after flipping (Algorithm 1, "
                                       "lines 18-20; default: on).", show_default=False,
        rich_help_panel=RULE)] = None,
    repair: Annotated[Repair | None, typer.Option(
        help="After the search, distil the original model into the defended one on the aux set, the flipped "
             "columns kept as flipped: distill (default) or none (the paper).", show_default=False,
        rich_help_panel=REPAIR)] = None,
    repair_steps: Annotated[int | None, typer.Option(
        help=f"Full-batch steps (default: {_REPAIR.steps}).", show_default=False, rich_help_panel=REPAIR)] = None,
    repair_optimizer: Annotated[Optimizer | None, typer.Option(
        help="sgd (default; momentum 0.9: moves the weights of near-silent inputs less) or adam.",
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
        help="Weight of the silent-neuron guard, which asks for the original outputs also when random "
             "low-activation inputs fire (default: 0, off).", show_default=False, rich_help_panel=REPAIR)] = None,
    repair_guard_ratio: Annotated[float | None, typer.Option(
        help=f"Guard: its candidates are this many times the flipped count of lowest-activation inputs (default: "
             f"{_REPAIR.guard_ratio:g}).", show_default=False, rich_help_panel=REPAIR)] = None,
    repair_guard_rate: Annotated[float | None, typer.Option(
        help=f"Guard: share of the candidates switched on in each perturbed copy (default: {_REPAIR.guard_rate:g}).",
        show_default=False, rich_help_panel=REPAIR)] = None,
    repair_patches: Annotated[int | None, typer.Option(
        help="Copies of each aux image with one white square (side 2-6 pixels, at a random place) that must give "
             "the original outputs on the clean image (default: 0, off).", show_default=False,
        rich_help_panel=REPAIR)] = None,
    repair_backtrack: Annotated[int | None, typer.Option(
        help=f"A run whose loss ends above where it started is run again at a third of the learning rate, up to N "
             f"times; if all diverge, the layer stays as selected (default: {_REPAIR.backtrack}; 0: off).",
        metavar="N", show_default=False, rich_help_panel=REPAIR)] = None,
    layer: LayerOpt = None,
    seed: SeedOpt = 0,
    trace: Annotated[Path | None, typer.Option(
        help="Write the search curve as CSV (lambda, selected, aux_acc, drop, kl): one row per threshold at which the "
             "selection changed, the curve being constant in between (with --plain: every threshold).",
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
                            select=_value(select), holdout=holdout, shifts=shifts, rescale=rescale,
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
               "kl": stored["kl"], "kl_kept": record.kl_kept, "mu": record.mu, "aux_acc_kept": record.aux_acc_kept,
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
    if res is not None:
        rows += [("thresholds (Algorithm 1 steps)", str(record.steps)),
                 ("network evaluations", str(record.evaluations))]
    for key, value in rows + [("seconds", f"{outcome.seconds:.2f}"), ("written", str(target))]:
        table.add_row(key, value)
    out.print(table)


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
