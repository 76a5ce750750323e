"""PNG figures: training curves, the FLAIN search curve, the activation histogram.

matplotlib is an optional extra (``pip install 'flain-cli[plot]'``); it is imported only here.
Readers take the files the other commands write: ``train --log`` (JSON lines) or train.json, ``defend --trace``,
``sweep --csv`` and ``scan --csv`` (CSV), and ``experiment``'s results.csv or results.json.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, FlainError, opt
from .events import read_train_log
from .files import atomic_write
from .tables import MEANS_COLUMNS, TRACE_COLUMNS, GridResults, read_csv, read_results


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
        raise ConfigError(f"{len(labels)} {opt('labels')} for {len(runs)} trainings; give one per training, in the "
                          "same order, or none")
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


@dataclass(frozen=True)
class Curve:
    """One defense's ACC and ASR against a grid key, in one panel row; ``over`` values folded into mean/min/max."""
    facet: tuple[tuple[str, str], ...]  # the other grid keys and their values: which panel row
    defense: str
    x: tuple[str, ...]  # the values of the x key, in the grid's order
    acc: tuple[tuple[float, float, float], ...]  # mean, min, max at each x
    asr: tuple[tuple[float, float, float], ...]
    n: tuple[int, ...]  # how many finished cells each point folds (one per ``over`` value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def grid_curves(results: GridResults, x: str | None = None, over: str | None = None,
                defenses: list[str] | None = None) -> tuple[str, str | None, list[Curve]]:
    """The curves `plot_grid` draws: ``x`` (default: the first grid key other than ``over``) on the axis,
    ``over`` (default: ``seed`` when the grid varies it) folded into mean and range, every other key a panel row.

    Returns the x key, the over key and the curves, in the grid's order. Cells that did not finish are left out.
    """
    keys = results.keys
    if over is None and "seed" in keys and x != "seed" and len(keys) > 1:
        over = "seed"
    for name, value in (("over", over), ("x", x)):
        if value is not None and value not in keys:
            raise ConfigError(f"{value} is not a key of this grid; its keys: {', '.join(keys) or 'none'}", param=name)
    if over is not None and over == x:
        raise ConfigError(f"{over} cannot be both the x axis and folded; give another", param="over")
    x = x or next((k for k in keys if k != over), None)
    if x is None:
        raise ConfigError("the results have no grid key to draw against (a grid of one point); nothing to plot",
                          param="x")
    rows = results.finished()
    labels = list(dict.fromkeys(r.defense for r in results.rows))
    if defenses:
        unknown = [d for d in defenses if d not in labels]
        if unknown:
            raise ConfigError(f"{unknown[0]!r} is not a column of these results; they have {', '.join(labels)}",
                              param="defense")
        labels = [d for d in labels if d in defenses]
    if not rows:
        raise ConfigError("the results hold no finished cell yet; run the grid first")
    facets = [k for k in keys if k not in (x, over)]
    xs = list(dict.fromkeys(r.point[x] for r in results.rows))
    curves = []
    for facet in dict.fromkeys(tuple((k, r.point[k]) for k in facets) for r in results.rows):
        for label in labels:
            points: list[str] = []
            n: list[int] = []
            acc: list[tuple[float, float, float]] = []
            asr: list[tuple[float, float, float]] = []
            for value in xs:
                cells = [r for r in rows if r.defense == label and r.point[x] == value
                         and all(r.point[k] == v for k, v in facet)]
                if not cells:
                    continue
                points.append(value)
                n.append(len(cells))
                for target, column in ((acc, [c.acc for c in cells]), (asr, [c.asr for c in cells])):
                    values = [v for v in column if v is not None]
                    target.append((statistics.fmean(values), min(values), max(values)))
            if points:
                curves.append(Curve(facet, label, tuple(points), tuple(acc), tuple(asr), tuple(n)))
    return x, over, curves


def plot_grid(results_path: Path, out: Path, x: str | None = None, over: str | None = None,
              defenses: list[str] | None = None, title: str | None = None) -> None:
    """ACC and ASR of each defense against a grid key, one row of two panels per value of the other keys."""
    x, over, curves = grid_curves(read_results(results_path), x, over, defenses)
    facets = list(dict.fromkeys(c.facet for c in curves))
    xs = list(dict.fromkeys(itertools.chain.from_iterable(c.x for c in curves)))
    numeric = all(_number(v) is not None for v in xs)
    position = {v: float(i) for i, v in enumerate(xs)} | ({v: float(v) for v in xs} if numeric else {})
    plt = _pyplot()
    fig, axes = plt.subplots(len(facets), 2, figsize=(9, 3.2 * len(facets)), squeeze=False)
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(c.defense for c in curves))}
    for row, facet in enumerate(facets):
        where = ", ".join(f"{k}={v}" for k, v in facet)
        for col, (metric, name) in enumerate((("acc", "ACC (clean test)"), ("asr", "ASR (triggered)"))):
            ax = axes[row][col]
            here = [c for c in curves if c.facet == facet]
            for i, curve in enumerate(here):
                stats = getattr(curve, metric)
                # categories: points side by side, not joined; numbers: joined lines
                shift = 0.0 if numeric else (i - (len(here) - 1) / 2) * min(0.1, 0.7 / len(here))
                at = [position[v] + shift for v in curve.x]
                mean = [m for m, _, _ in stats]
                spread = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
                ax.errorbar(at, mean, yerr=spread if over else None, marker="o", ms=4, capsize=3,
                            ls="-" if numeric else "none", color=colours[curve.defense], label=curve.defense)
            ax.set(xlabel=x, ylabel=name, title=f"{name}" + (f": {where}" if where else ""))
            if metric == "asr":  # a share that goes to 0 when the defense works; ACC keeps its own scale
                ax.set_ylim(-0.02, 1.02)
            if not numeric:
                ax.set_xticks(range(len(xs)), xs)
            ax.grid(alpha=0.3)
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    folded = f" (mean and range over {over})" if over else ""
    fig.suptitle(title or f"{results_path.name}: ACC and ASR against {x}{folded}")
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
