"""PNG figures: training curves, the FLAIN search curve, the activation histogram.

matplotlib is an optional extra (``pip install 'flain-cli[plot]'``); it is imported only here.
Readers take the files the other commands write: ``train --log`` (JSON lines) or train.json, ``defend --trace``,
``sweep --csv`` and ``scan --csv`` (CSV).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError, FlainError
from .events import read_train_log
from .files import atomic_write
from .tables import MEANS_COLUMNS, TRACE_COLUMNS, read_csv


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FlainError("plotting needs matplotlib: pip install 'flain-cli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check_png(out: Path) -> Path:
    """``out`` if its name ends in .png (the one format written)."""
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"{out} must end in .png", param="out")
    return Path(out)


def _save(fig: Any, out: Path) -> None:
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_training(runs: list[Path], out: Path, title: str | None = None, labels: list[str] | None = None) -> None:
    """ACC and ASR per round; several trainings share the axes, one colour each (ACC solid, ASR dashed)."""
    if labels and len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} --label for {len(runs)} trainings; give one per training, in the same "
                          "order, or none")
    histories = [read_train_log(run) for run in runs]
    names = labels or [run.parent.name if run.name == "train.json" else run.name for run in runs]
    single = len(runs) == 1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (rows, name) in enumerate(zip(histories, names)):
        prefix, colours, dash = ("", ("C0", "C1"), "-") if single else (f"{name}: ", (f"C{i}", f"C{i}"), "--")
        rounds = [r["round"] for r in rows]
        ax.plot(rounds, [r["acc"] for r in rows], marker="o", ms=3, color=colours[0], label=f"{prefix}ACC (clean test)")
        if any(r.get("asr") is not None for r in rows):
            ax.plot(rounds, [r.get("asr") for r in rows], marker="s", ms=3, color=colours[1], ls=dash,
                    label=f"{prefix}ASR (triggered)")
    ax.set(xlabel="round", ylabel="share", ylim=(0, 1.02),
           title=title or (f"training: {names[0]}" if single else "training: ACC (solid) and ASR (dashed)"))
    ax.grid(alpha=0.3)
    if single:
        ax.legend(loc="lower right")
    else:  # beside the axes: several curves fill the plot
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    _save(fig, out)
    plt.close(fig)


def plot_trace(trace: Path, out: Path, title: str | None = None) -> None:
    data = read_csv(trace, TRACE_COLUMNS[:3])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.step(data["lambda"], data["aux_acc"], where="post", color="tab:blue", label="aux accuracy")
    ax.set(xlabel="threshold lambda", ylabel="aux accuracy", title=title or f"FLAIN search: {trace.name}")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.step(data["lambda"], data["selected"], where="post", color="tab:red", label="neurons selected")
    twin.set_ylabel("neurons selected")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    _save(fig, out)
    plt.close(fig)


def plot_activations(means_csv: Path, out: Path, bins: int = 60, title: str | None = None) -> None:
    data = read_csv(means_csv, MEANS_COLUMNS)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(data["mean"], bins=bins, color="tab:gray")
    ax.set(xlabel="mean activation on the aux set", ylabel="input neurons", yscale="log",
           title=title or f"activations: {means_csv.name}")
    ax.grid(alpha=0.3)
    _save(fig, out)
    plt.close(fig)


def plot_sweep(sweep_csv: Path, out: Path, title: str | None = None) -> None:
    data = read_csv(sweep_csv, ("changed", "aux_acc", "acc"), ("lambda", "asr", "asr_clean"))
    keep = [i for i, lam in enumerate(data["lambda"]) if lam is not None]  # the unchanged model has none
    if not keep:
        raise ConfigError(f"{sweep_csv} holds no thresholds")
    lam = [data["lambda"][i] for i in keep]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for column, label, style in (("acc", "ACC (clean test)", "o-"), ("aux_acc", "aux accuracy", ".--"),
                                 ("asr", "ASR (triggered)", "s-"), ("asr_clean", "ASR without trigger", ":")):
        values = [data[column][i] for i in keep]
        if all(v is not None for v in values):
            ax.plot(lam, values, style, ms=3, label=label)
    ax.set(xlabel="threshold lambda", ylabel="share", ylim=(0, 1.02), title=title or f"sweep: {sweep_csv.name}")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(lam, [data["changed"][i] for i in keep], color="tab:gray", alpha=0.5, label="neurons changed")
    twin.set_ylabel("neurons changed")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    _save(fig, out)
    plt.close(fig)
