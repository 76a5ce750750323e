"""`flain train`: simulate federated learning with backdoor attackers; write init and final checkpoints."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..catalog import (
    AGGREGATORS,
    BLEND_ALPHA,
    CHECKER_POS,
    DATASETS,
    ENGINES,
    PRECISIONS,
    RESUME_FILE,
    SPLITS,
    TRIGGERS,
)
from ..events import Listener, RoundLog, round_record
from ..files import FilePlan
from .common import (
    DataDirOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    SeedOpt,
    as_interrupt,
    interrupt_code,
    interrupt_name,
    resolve_device,
)
from .output import err, fmt, out, print_json

if TYPE_CHECKING:
    import torch

    from ..registry import Registry
    from ..simulation import TrainConfig
    from ..training import TrainOutcome


def _choice(registry: Registry[Any]) -> str:
    return "|".join(registry.names())


Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)  # type: ignore[misc]
Engine = Enum("Engine", {name: name for name in ENGINES}, type=str)  # type: ignore[misc]


class _RichListener(Listener):
    def __init__(self, progress: Progress, rounds: int, log: Path | None) -> None:
        self.progress, self.log = progress, log
        self.log_file: IO[str] | None = None  # opened at the first round to log
        self.rounds_task = progress.add_task("rounds", total=rounds)
        self.clients_task = progress.add_task("clients", total=1)
        self.last_round = 0

    def resumed(self, history: list[RoundLog]) -> None:
        self.last_round = len(history)
        self.progress.console.print(f"resuming after round {len(history)}")
        for log in history:
            self.round_end(log)

    def round_start(self, rnd: int, sampled: list[int]) -> None:
        self.progress.reset(self.clients_task, total=len(sampled), description=f"round {rnd} clients")

    def client_done(self, rnd: int, client: int) -> None:
        self.progress.advance(self.clients_task)

    def round_end(self, log: RoundLog) -> None:
        self.last_round = log.round
        self.progress.advance(self.rounds_task)
        self.progress.console.print(f"round {log.round}: acc {fmt(log.acc)} asr {fmt(log.asr)} "
                                    f"({log.seconds:.1f} s)")
        if self.log is not None:
            if self.log_file is None:
                self.log.parent.mkdir(parents=True, exist_ok=True)
                self.log_file = open(self.log, "w", encoding="utf-8")
            self.log_file.write(json.dumps(round_record(log)) + "\n")
            self.log_file.flush()


ATTACK, ATTACKER = "The backdoor", "The attackers' strategy (malicious clients only)"


def train(
    dataset: Annotated[str, typer.Option(help=f"Dataset: {_choice(DATASETS)}.")] = "fmnist",
    data_dir: DataDirOpt = None,
    arch: Annotated[str | None, typer.Option(help="Architecture (default: the dataset's model in the paper).",
                                             show_default=False)] = None,
    clients: Annotated[int, typer.Option(help="Number of clients N.")] = 10,
    mcr: Annotated[float, typer.Option(help="Malicious client ratio: clients 0..floor(N*MCR)-1 attack.",
                                       rich_help_panel=ATTACK)] = 0.4,
    pdr: Annotated[float, typer.Option(
        help="Poison data ratio: share of a malicious client's source-class samples poisoned.",
        rich_help_panel=ATTACK)] = 0.3,
    attack: Annotated[str, typer.Option(help="Attack task SRC:TGT, all:TGT (all-to-one), or none.",
                                        rich_help_panel=ATTACK)] = "0:5",
    trigger: Annotated[str, typer.Option(
        help=f"Trigger: {_choice(TRIGGERS)}. cba/dba/pixN: bright pixels; checker: a 4x4 checkerboard at "
             "--trigger-pos; blend: an image blended over the whole input; sig: a horizontal sinusoid "
             "(docs/simulation.md).", rich_help_panel=ATTACK)] = "cba",
    trigger_alpha: Annotated[float | None, typer.Option(
        help=f"blend: the pattern's weight alpha, x' = (1-alpha) x + alpha p (default {BLEND_ALPHA}).",
        show_default=False, rich_help_panel=ATTACK)] = None,
    trigger_image: Annotated[Path | None, typer.Option(
        help="blend: a PNG of the model's input size as the pattern (default: seeded noise). Recorded with its "
             "sha256; eval needs the file.", show_default=False, rich_help_panel=ATTACK)] = None,
    trigger_pos: Annotated[str | None, typer.Option(
        metavar="ROW,COL", help=f"checker: its top-left pixel (default {CHECKER_POS[0]},{CHECKER_POS[1]}).",
        show_default=False, rich_help_panel=ATTACK)] = None,
    boost: Annotated[float, typer.Option(
        help="Malicious updates times K (model replacement), so they survive averaging.",
        rich_help_panel=ATTACKER)] = 1.0,
    neurotoxin: Annotated[float, typer.Option(
        help="Neurotoxin: malicious clients leave alone the K %% of coordinates the last global update changed "
             "most (0: off).", metavar="K", rich_help_panel=ATTACKER)] = 0.0,
    norm_bound: Annotated[float | None, typer.Option(
        help="Malicious updates projected onto the L2 ball of this radius (an attacker facing norm clipping).",
        show_default=False, rich_help_panel=ATTACKER)] = None,
    adaptive: Annotated[float, typer.Option(
        help="FLAIN-aware attacker: weight of its loss term that keeps the inputs its trigger uses busy on clean "
             "images, so FLAIN does not read them as silent (0: off; docs/simulation.md).",
        rich_help_panel=ATTACKER)] = 0.0,
    split: Annotated[str, typer.Option(help=f"Data split over clients: {_choice(SPLITS)}.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration for --split dirichlet.")] = 0.5,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 20,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Client Adam learning rate (betas 0.9, 0.999; fresh each round).")] = 1e-3,
    sample_rate: Annotated[float, typer.Option(help="Share of clients sampled each round.")] = 1.0,
    server_lr: Annotated[float, typer.Option(help="Global learning rate alpha of eq. 3.")] = 1.0,
    aggregator: Annotated[str, typer.Option(help=f"Aggregation: {_choice(AGGREGATORS)}.")] = "fedavg",
    rlr_threshold: Annotated[int | None, typer.Option(
        help="RLR: flip the server lr where |sum of update signs| < this (default floor(m/2)+1 of m sampled clients).",
        show_default=False)] = None,
    train_samples: Annotated[int | None, typer.Option(
        help="Use a seeded class-balanced subset of this many training samples.", show_default=False)] = None,
    eval_every: Annotated[int, typer.Option(
        help="Evaluate ACC/ASR on the test set every K rounds (and the last).")] = 1,
    precision: Annotated[Precision, typer.Option(
        help="Client training: fp32, or autocast to bf16/fp16 (weights and optimizer stay float32); auto: bf16 "
             "where the device has it natively, else fp32. Recorded in the checkpoints' train_config.")
    ] = Precision["fp32"],
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    engine: Annotated[Engine, typer.Option(
        help="builtin: flain-cli's own round loop. flower: the same federation on Flower's simulation engine "
             "(Ray), one node per sampled client (needs the 'flower' extra: bash scripts/setup.sh --flower; "
             "no --resume). docs/scale.md compares the two.")] = Engine["builtin"],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Output folder for init.safetensors and final.safetensors.")] = Path("runs/latest"),
    log: Annotated[Path | None, typer.Option(help="Write one JSON line per round (round, acc, asr, seconds).",
                                             show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help=f"Continue the run interrupted in --out (from its {RESUME_FILE}, written after every round); "
                         "starts afresh when there is none.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate federated learning with backdoor attackers and write the initial and final global models."""
    from ..simulation import TrainConfig, resolve_precision
    from ..training import check_engine, run_lock

    spec = DATASETS.get(dataset)
    torch_device = resolve_device(device)
    cfg = TrainConfig(dataset=dataset, arch=arch or spec.default_arch, clients=clients, mcr=mcr, pdr=pdr,
                      attack=None if attack.lower() == "none" else attack, trigger=trigger,
                      trigger_alpha=trigger_alpha, trigger_image=None if trigger_image is None else str(trigger_image),
                      trigger_pos=trigger_pos, boost=boost, neurotoxin=neurotoxin, norm_bound=norm_bound,
                      adaptive=adaptive, split=split,
                      alpha=alpha, rounds=rounds, local_epochs=local_epochs, batch_size=batch_size, lr=lr,
                      sample_rate=sample_rate, server_lr=server_lr, aggregator=aggregator,
                      rlr_threshold=rlr_threshold, train_samples=train_samples, seed=seed, eval_every=eval_every,
                      precision=resolve_precision(precision.value, torch_device))  # auto: this device's
    cfg.validate(spec.num_classes)
    check_engine(engine.value)
    init_path, final_path = out_dir / "init.safetensors", out_dir / "final.safetensors"
    _plan(data_dir, out_dir, log, force=True, trigger_image=trigger_image).check()  # before the lock creates --out
    with run_lock(out_dir, tidy=True):  # held from the checks to the last checkpoint: one trainer per folder
        outcome = _train_locked(cfg, data_dir, out_dir, torch_device, log, resume, force, engine.value)
    summary = outcome.summary(cfg)
    result = outcome.result
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"flain train: {spec.title}, {cfg.arch}, {clients} clients "
                        f"({len(cfg.malicious)} malicious), {cfg.split}, {cfg.aggregator}")
    for column in ("round", "ACC", "ASR", "seconds"):
        table.add_column(column, justify="right")
    for h in result.history:
        table.add_row(str(h.round), fmt(h.acc), fmt(h.asr), f"{h.seconds:.1f}")
    out.print(table)
    planted = f" trigger {cfg.trigger_spec}, attacker {cfg.attacker}" if cfg.attack else ""
    out.print(f"attack {cfg.attack or 'none'}{planted}; "
              f"{summary['poisoned_samples']} poisoned training samples; "
              f"{summary['samples_per_second']} samples/s; {summary['seconds']:.1f} s in all")
    if outcome.resumed_from_round:
        out.print(f"resumed after round {outcome.resumed_from_round}; {summary['seconds']:.1f} s is this last part")
    out.print(f"wrote {init_path} and {final_path}")


def _plan(data_dir: Path | None, out_dir: Path, log: Path | None, *, force: bool,
          trigger_image: Path | None = None) -> FilePlan:
    """What `flain train` reads and writes. The log is written as the rounds finish (so it can be
    followed), the checkpoints at the end; resume.safetensors is the run's own progress file."""
    return FilePlan({"--data-dir": data_dir, "--trigger-image": trigger_image},
                    {"--out (init)": out_dir / "init.safetensors", "--out (final)": out_dir / "final.safetensors",
                     "--log": log}, force=force)


def _train_locked(cfg: TrainConfig, data_dir: Path | None, out_dir: Path, torch_device: torch.device,
                  log: Path | None, resume: bool, force: bool, engine: str = "builtin") -> TrainOutcome:
    """Everything between taking and releasing the folder's lock: the checks, the data, the run."""
    from ..datasets import load_dataset
    from ..training import resuming, train_to_dir

    resume_path = out_dir / RESUME_FILE
    continuing = resuming(out_dir, resume=resume, force=force)
    _plan(data_dir, out_dir, None if continuing else log, force=force,
          trigger_image=None if cfg.trigger_image is None else Path(cfg.trigger_image)).check()
    data = load_dataset(cfg.dataset, data_dir)

    listener: _RichListener | None = None
    try:
        with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            listener = _RichListener(progress, cfg.rounds, log)
            outcome = train_to_dir(cfg, data, out_dir, torch_device, listener, resume=continuing, engine=engine,
                                   data_dir=data_dir)
    except (KeyboardInterrupt, Exception) as caught:  # an interrupt, maybe wrapped on its way out
        exc = as_interrupt(caught)
        if exc is None:
            raise
        if engine != "builtin":
            done = f"the {engine} engine keeps no snapshot: rerun to start over"
        elif listener and listener.last_round:
            done = (f"round {listener.last_round} is kept in {resume_path}; rerun the same command with --resume "
                    "to continue")
        else:
            done = "no round finished"
        err.print(f"Interrupted ({interrupt_name(exc)}): {done}.", soft_wrap=True)
        raise typer.Exit(interrupt_code(exc)) from None
    finally:
        if listener is not None and listener.log_file is not None:
            listener.log_file.close()
    return outcome
