"""`flain defend`: FLAIN (or pruning) on the defended layer; writes a cleaned checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..audit import defend_checkpoint
from ..checkpoint import atomic_write, save_checkpoint
from ..defense import METHODS, SELECTS
from .common import (ArchOpt, AuxOpt, DatasetOpt, DeviceOpt, ForceOpt, JsonOpt, LayerOpt, ModelArg,
                     SeedOpt, check_outputs, err, out, print_json, resolve_device)


def default_out(model: Path, method: str) -> Path:
    return model.with_name(f"{model.name.removesuffix('.safetensors')}.{method}.safetensors")


def defend(
    model: ModelArg,
    init: Annotated[Path, typer.Option(help="The initial checkpoint W0 of the same run (init.safetensors).",
                                       show_default=False)],
    aux: AuxOpt,
    method: Annotated[str, typer.Option(help=f"{'|'.join(METHODS.names())}: flip the selected neurons' "
                                             "updates, or zero their weights.")] = "flain",
    step: Annotated[float, typer.Option(help="Threshold step (the paper: 0.001).")] = 0.001,
    rho: Annotated[float, typer.Option(help="Tolerated aux accuracy drop (the paper: at most 0.03).")] = 0.03,
    select: Annotated[str, typer.Option(help=f"{'|'.join(SELECTS)}: keep the model at which the drop "
                                             "first reached rho (the paper), or the last one below it.")] = "crossing",
    holdout: Annotated[float, typer.Option(
        help="Not in the paper: take the mean activations from a share 1-F of the aux set and the stopping "
             "rule's accuracies from the held-out share F (0: the paper, one set for both).")] = 0.0,
    seed: SeedOpt = 0,
    layer: LayerOpt = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Cleaned checkpoint (default: MODEL's name with .METHOD.safetensors).", show_default=False)] = None,
    trace: Annotated[Path | None, typer.Option(
        help="Write the search curve as CSV (lambda, selected, aux_acc, drop): one row per threshold at which the "
             "selection changed, the curve being constant in between (with --plain: every threshold).",
        show_default=False)] = None,
    plain: Annotated[bool, typer.Option(
        "--plain", help="Run Algorithm 1 literally (every lambda, whole network): slow, same result.")] = False,
    arch: ArchOpt = None,
    dataset: DatasetOpt = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove a backdoor: flip (or prune) the weight updates of low-activation input neurons."""
    target = out_path or default_out(model, method)
    check_outputs([target] + ([trace] if trace else []), [model, init, aux], force)
    outcome = defend_checkpoint(model, init, aux, method=method, step=step, rho=rho, select=select, layer=layer,
                                arch=arch, dataset=dataset, plain=plain, holdout=holdout, seed=seed,
                                device=resolve_device(device))
    res = outcome.result
    save_checkpoint(target, outcome.state, outcome.meta)
    if trace is not None:
        rows = "".join(f"{s.lam:.9g},{s.selected},{s.acc:.6f},{res.acc0 - s.acc:.6f}\n" for s in res.trace)
        atomic_write(trace, lambda tmp: tmp.write_text("lambda,selected,aux_acc,drop\n" + rows))
    if res.all_selected:
        err.print(f"warning: all {res.mask.numel()} neurons were selected before the aux accuracy dropped by "
                  f"rho={rho}; the whole layer was {'flipped' if method == 'flain' else 'pruned'}")
    summary = {"method": method, "lambda": res.lam, "flipped": res.changed, "of": int(res.mask.numel()),
               "aux_acc_before": res.acc0, "aux_acc_after": outcome.aux_acc_after, "steps": res.steps,
               "out": str(target), "layer": outcome.layer, "select": select, "step": step, "rho": rho,
               "mu": res.mu, "aux_acc_kept": res.acc_kept, "all_selected": res.all_selected,
               "evaluations": res.evaluations, "n_aux": outcome.n_aux, "holdout": holdout,
               "seconds": round(outcome.seconds, 3)}
    if as_json:
        print_json(summary)
        return
    curve = Table(title=f"search on {outcome.layer} ({method}, step {step}, rho {rho}): "
                        f"thresholds where the selection changed")
    for column in ("lambda", "neurons", "aux accuracy", "drop"):
        curve.add_column(column, justify="right")
    rows = res.trace if len(res.trace) <= 24 else res.trace[:10] + [None] + res.trace[-10:]
    for s in rows:
        if s is None:
            curve.add_row("...", "", "", "")
        else:
            curve.add_row(f"{s.lam:.6f}", str(s.selected), f"{s.acc:.4f}", f"{res.acc0 - s.acc:+.4f}")
    out.print(curve)
    table = Table(title=f"flain defend {model}")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in (("final lambda", f"{res.lam:.6f}"),
                       ("neurons changed", f"{res.changed} of {res.mask.numel()}"),
                       (f"aux accuracy ({outcome.n_aux} images)", f"{res.acc0:.4f} -> {outcome.aux_acc_after:.4f}"),
                       ("thresholds (Algorithm 1 steps)", str(res.steps)),
                       ("network evaluations", str(res.evaluations)),
                       ("seconds", f"{outcome.seconds:.2f}"), ("written", str(target))):
        table.add_row(key, value)
    out.print(table)
