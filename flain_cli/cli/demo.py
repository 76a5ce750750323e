"""`flain demo`: scan -> defend -> eval on a shipped sample model, with a before/after table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..files import FilePlan
from .common import DeviceOpt, ForceOpt, JsonOpt, resolve_device
from .output import fmt, out, print_json


def demo(
    sample: Annotated[str, typer.Option(help="Sample model folder under --samples-dir.")] = "fmnist-cba-iid",
    samples_dir: Annotated[Path, typer.Option(help="Where the sample models are.")] = Path("sample_models"),
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the defended checkpoint.")] = Path("runs/demo"),
    test_subset: Annotated[bool, typer.Option(
        "--test-subset",
        help="Evaluate on the shipped 2,000-image test subset even if the dataset is installed.")] = False,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove the backdoor of a shipped sample model and show ACC and ASR before and after."""
    from ..demo import PEER, paper_path, peer_path, run_demo

    target = out_dir / f"{sample}.flain.safetensors"
    torch_device = resolve_device(device)
    plan = FilePlan({"--samples-dir": samples_dir}, {"--out": target, "--out (paper preset)": paper_path(target),
                                                     f"--out ({PEER})": peer_path(target)}, force=force)
    with plan.writing() as stage:
        report = run_demo(samples_dir, sample, stage["--out"], paper_out=stage["--out (paper preset)"],
                          peer_out=stage[f"--out ({PEER})"], use_subset=test_subset, device=torch_device)
    seconds = {k: round(v, 2) for k, v in report.seconds.items()}
    if as_json:
        print_json({"sample": report.sample, "test": report.test_source, "n_test": report.n_test,
                    "before": report.before, "after": report.after, "paper": report.paper, "peer": report.peer,
                    "defense": report.defense, "seconds": seconds, "out": str(target),
                    "paper_out": str(paper_path(target)), "peer_out": str(peer_path(target))})
        return
    table = Table(title=f"FLAIN on sample model {report.sample} ({report.n_test} test images: {report.test_source})")
    table.add_column("model", no_wrap=True)  # 80 columns hold every row on one line (tests/test_width.py)
    for column in ("ACC", "ASR", "aux acc", "flipped", "seconds"):
        table.add_column(column, justify="right", no_wrap=True)
    d = report.defense
    table.add_row("backdoored (final)", fmt(report.before["acc"]), fmt(report.before["asr"]),
                  fmt(report.before["aux_acc"]), "-", f"{seconds['scan']}")
    table.add_row("FLAIN --preset paper", fmt(report.paper["acc"]), fmt(report.paper["asr"]),
                  fmt(report.paper["aux_acc"]), f"{report.paper['flipped']} of {d['of']}",
                  f"{seconds['defend_paper']}")
    table.add_row("FLAIN (default rule)", fmt(report.after["acc"]), fmt(report.after["asr"]),
                  fmt(report.after["aux_acc"]), f"{report.after['flipped']} of {d['of']}",
                  f"{seconds['defend']}")
    table.add_row(f"{PEER} (best peer)", fmt(report.peer["acc"]), fmt(report.peer["asr"]),
                  fmt(report.peer["aux_acc"]), f"{report.peer['flipped']} of {d['of']}", f"{seconds['defend_peer']}")
    out.print(table)
    out.print("seconds: the scan's on the first row, each defense's below. The default rule's aux accuracy is on "
              "the images its repair trained on; judge it by ACC and ASR. The peer is the other method with the best "
              "mean DER on backdoors FLAIN was not tuned on (docs/results.md).")
    out.print(f"lambda {report.paper['lambda']:.4f} (paper), {d['lambda']:.4f} (default); "
              f"{d['silent_neurons']} inputs of fc1 are never active on the aux set; "
              f"evaluation took {seconds['eval']} s; wrote {target}, {paper_path(target)} and {peer_path(target)}")
