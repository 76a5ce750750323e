"""FLAIN for a Flower deployment: keep W0 and the final global model as flain-cli checkpoints.

`flain defend` flips weight *updates*, so it needs the global model before round 1 (W0) as well
as after the last one. In a Flower ServerApp both pass through the strategy's ``start``; wrap the
strategy the app already uses:

    strategy = SaveForFlain(FedAvg(fraction_train=1.0), "runs/flower", arch="cnn-mnist", dataset="fmnist")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=10)

``runs/flower/init.safetensors`` is written before round 1 and ``final.safetensors`` after the
last round, with the metadata `flain defend`, `flain scan` and `flain eval` read (architecture,
dataset, normalization, the attack when one is simulated, ``parents.init``). The architecture is
the user's to say: a built-in one (``arch``) or their own class (``model_def="models.py:Net"``, whose
code flain-cli runs to rebuild the model). Then::

    flain defend runs/flower/final.safetensors --init runs/flower/init.safetensors --aux AUX

Needs Flower (``pip install 'flain-cli[flower]'``); nothing else in flain-cli imports this module
at import time. examples/flower_flain.py is a whole runnable app.

The module also runs flain-cli's own federation on Flower's simulation engine (`simulate_flower`,
``flain train --engine flower``): a ServerApp whose strategy (`FlainFederation`) samples the clients,
aggregates with flain-cli's FedAvg or RLR and evaluates as `simulation.simulate` does, and a ClientApp
that trains with `simulation.train_client`. Each message names the client (0..clients-1) the node
plays that round, so a node holds no fixed partition; every node rebuilds the same partitions and
poisoned sets from the configuration and its seed. W0, the partitions, the poisoned sets and the
sampled clients are those of the built-in loop; the batch order and dropout are drawn per round
and client (the built-in loop draws them from one generator in client order, which parallel
clients cannot share), so the two engines agree in distribution, not bit for bit (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.simulation import run_simulation

from .aggregation import AGGREGATORS, AggregatorSettings, apply_update
from .attack import AttackTask
from .catalog import TRIGGERS
from .checkpoint import Checkpoint, conform, resolve_model_meta, save_checkpoint
from .datasets import Dataset, load_dataset
from .errors import ConfigError, FlainError, opt
from .events import Listener
from .models import build_model
from .simulation import (
    ClientData,
    Server,
    SimulationResult,
    TrainConfig,
    make_clients,
    train_client,
    with_train_on,
)
from .triggers import make_trigger


class SaveForFlain(Strategy):
    """A Flower strategy that behaves as ``strategy`` and saves W0 and the final model for flain-cli.

    Args:
        strategy: the message-based strategy that does the work (FedAvg, FedProx, a custom one...).
        out_dir: where ``init.safetensors`` and ``final.safetensors`` go (created if missing).
        arch: a built-in architecture (``flain inspect`` lists them), or None with ``model_def``.
        dataset: the dataset the clients train on (input size, normalization, classes).
        model_def: ``FILE.py:NAME``, the user's model class, instead of ``arch``.
        num_classes: when the dataset does not tell it.
        attack: ``SRC:TGT`` when the federation simulates a backdoor, so `flain eval` measures its ASR;
            ``trigger`` names the built-in trigger it stamps.
        strict: refuse arrays the architecture does not have (False: ignore them).
        overwrite: replace checkpoints already in ``out_dir``.

    The arrays are the ``ArrayRecord`` of the strategy's global model, named as the model's
    ``state_dict`` (``ArrayRecord(model.state_dict())``); they are checked against the architecture
    before round 1, so a mismatch fails before any training.
    """

    def __init__(self, strategy: Strategy, out_dir: Path | str, *, arch: str | None = None,
                 dataset: str | None = None, model_def: str | None = None, num_classes: int | None = None,
                 attack: str | None = None, trigger: str = "cba", strict: bool = True,
                 overwrite: bool = False) -> None:
        if (arch is None) == (model_def is None):
            raise ConfigError(f"give the architecture: {opt('arch')} (a built-in) or {opt('model_def')} "
                              "(FILE.py:NAME), one of them")
        TRIGGERS.check(trigger)
        self.strategy, self.out_dir = strategy, Path(out_dir)
        self.arch, self.dataset, self.model_def, self.num_classes = arch, dataset, model_def, num_classes
        self.attack, self.trigger, self.strict, self.overwrite = attack, trigger, strict, overwrite
        self.init_sha256: str | None = None

    def paths(self) -> dict[str, Path]:
        return {role: self.out_dir / f"{role}.safetensors" for role in ("init", "final")}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Save W0, run ``strategy.start`` with the same arguments, save its final arrays; return its result."""
        taken = [p for p in self.paths().values() if p.exists()]
        if taken and not self.overwrite:
            raise ConfigError(f"{taken[0]} already exists; pass {opt('overwrite')} to replace it or choose another "
                              f"{opt('out_dir')}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.init_sha256 = self._save(initial_arrays, "init", {})
        result = self.strategy.start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                     evaluate_fn)
        if len(result.arrays) == 0:  # a Flower strategy keeps no model when no round could be aggregated
            raise FlainError(f"{type(self.strategy).__name__} ended without a global model (no round was "
                             f"aggregated; Flower's log above says why); {self.paths()['final']} is not written")
        self._save(result.arrays, "final", {"parents": {"init": self.init_sha256},
                                            "flower": {"strategy": type(self.strategy).__name__,
                                                       "num_rounds": num_rounds}})
        return result

    def _save(self, arrays: ArrayRecord, role: str, extra: dict[str, Any]) -> str:
        raw = Checkpoint(arrays.to_torch_state_dict(), {}, self.paths()[role])
        meta = resolve_model_meta(raw, arch=self.arch, dataset=self.dataset, num_classes=self.num_classes,
                                  model_def=self.model_def)
        aligned = conform(raw, meta, strict=self.strict)
        attack = None
        if self.attack is not None:
            task = AttackTask.parse(self.attack, meta.num_classes)
            attack = {"task": str(task), "source": task.source, "target": task.target, "trigger": self.trigger}
        return save_checkpoint(self.paths()[role], aligned.tensors,
                               meta.to_json() | {"role": role, "attack": attack} | extra)

    # every round is the wrapped strategy's
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()



BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics: averaged, not voted


class RobustLR(FedAvg):
    """FedAvg with the robust learning rate (RLR, Ozdayi et al. 2021) as flain-cli computes it, for any Flower app.

    Per coordinate, the server step is negated where fewer than ``threshold`` sampled clients agree on
    the sign of their update (default: floor(m/2)+1 of m). ``server_lr`` scales it; arrays whose names
    end in ``buffers`` (BatchNorm statistics) are averaged without a vote. Replies carry each client's
    whole model, as with FedAvg; the update is that model minus the global one sent this round.
    Other arguments are FedAvg's.
    """

    def __init__(self, *, threshold: int | None = None, server_lr: float = 1.0,
                 buffers: tuple[str, ...] = BUFFER_SUFFIXES, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        if threshold is not None and threshold < 1:
            raise ConfigError(f"must be at least 1, got {threshold}", param="threshold")
        self.threshold, self.server_lr, self.buffer_suffixes = threshold, server_lr, buffers
        self._global: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()  # what this round's updates are measured from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        averaged, metrics = super().aggregate_train(server_round, replies)  # FedAvg's checks and metrics
        if averaged is None:
            return None, metrics
        contents = [r.content for r in replies if not r.has_error()]
        updates = [{name: t - self._global[name]
                    for name, t in c.array_records[self.arrayrecord_key].to_torch_state_dict().items()}
                   for c in contents]
        weights = [float(_whole(next(iter(c.metric_records.values()))[self.weighted_by_key])) for c in contents]
        buffers = {name for name in self._global if name.endswith(self.buffer_suffixes)}
        step = AGGREGATORS.get("rlr")(updates, weights, AggregatorSettings(self.server_lr, self.threshold, buffers))
        return ArrayRecord(apply_update(self._global, step)), metrics


# ---- flain-cli's federation on Flower's simulation engine (`flain train --engine flower`)

def _draw_seed(seed: int, rnd: int, client: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout): a function of all three."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


def data_digest(client: ClientData) -> int:
    """A number naming a client's samples and poisoned set: the server checks that each node trained on its own."""
    digest = hashlib.sha256(client.indices.numpy().tobytes())
    if client.poisoned is not None:
        digest.update(client.poisoned.numpy().tobytes())
    digest.update(str(client.trigger_part).encode())
    return int.from_bytes(digest.digest()[:6], "big")  # a whole number a MetricRecord holds exactly


def _whole(value: object) -> int:
    """A record's whole number (records hold a union of kinds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FlainError(f"a Flower message carries {value!r} where a number was expected")
    return int(value)


_NODE: dict[str, tuple[TrainConfig, Dataset, list[ClientData]]] = {}  # per process: a node trains many rounds


def _node_setup(config_json: str, data_dir: str, device: torch.device) -> tuple[TrainConfig, Dataset, list[ClientData]]:
    """The configuration, the dataset (its training split on ``device``) and every client's data, built once."""
    key = f"{config_json}|{data_dir}|{device}"
    if key not in _NODE:
        cfg = TrainConfig(**json.loads(config_json))
        dataset = load_dataset(cfg.dataset, Path(data_dir) if data_dir else None)
        clients = make_clients(cfg, dataset, np.random.default_rng(cfg.seed))  # the server's partitions
        _NODE[key] = (cfg, with_train_on(dataset, device), clients)
    return _NODE[key]


def _train_on_node(msg: Message, context: Context) -> Message:  # noqa: ARG001 - the node's context is not needed
    """ClientApp: local training as the client the message names; replies with its update and sample count."""
    conf = msg.content.config_records["config"]
    device = torch.device(str(conf["device"]))
    cfg, dataset, clients = _node_setup(str(conf["train_config"]), str(conf["data_dir"]), device)
    k, rnd = _whole(conf["client"]), _whole(conf["round"])
    num_classes = dataset.spec.num_classes
    task = cfg.task(num_classes)
    seed = _draw_seed(cfg.seed, rnd, k)
    torch.manual_seed(seed)  # dropout
    model = build_model(cfg.arch, num_classes).to(device)
    state = {name: t.to(device) for name, t in msg.content.array_records["arrays"].to_torch_state_dict().items()}
    trigger = make_trigger(cfg.trigger_spec, *dataset.spec.shape[1:], channels=dataset.spec.shape[0])
    update = train_client(model, state, clients[k], dataset, trigger,
                          task.target if task else None, cfg, torch.Generator().manual_seed(seed), device)
    reply = RecordDict({"update": ArrayRecord({name: t.cpu() for name, t in update.items()}),
                        "metrics": MetricRecord({"client": k, "num-examples": len(clients[k].indices),
                                                 "data-digest": data_digest(clients[k])})})
    return Message(content=reply, reply_to=msg)


class FlainFederation(Strategy):
    """The built-in federation's server as a Flower strategy: sampling, FedAvg or RLR, evaluation.

    ``start`` runs every round and keeps the outcome in ``result`` (a `SimulationResult`, as
    `simulation.simulate` returns). ``data_dir`` and ``device`` are passed to the nodes.
    """

    def __init__(self, cfg: TrainConfig, dataset: Dataset, device: torch.device, data_dir: Path | None,
                 listener: Listener | None = None) -> None:
        self.cfg, self.dataset, self.device, self.data_dir = cfg, dataset, device, data_dir
        self.listener = listener or Listener()
        self.result: SimulationResult | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        cfg, spec = self.cfg, self.dataset.spec
        rng = np.random.default_rng(cfg.seed)
        clients = make_clients(cfg, self.dataset, rng)  # advances rng as the built-in loop does before round 1
        with torch.random.fork_rng(devices=[]):  # the evaluation model's random init must not move the caller's RNG
            model = build_model(cfg.arch, spec.num_classes).to(self.device)
        server = Server(cfg, self.dataset, model, self.device)
        state = {name: t.to(self.device) for name, t in initial_arrays.to_torch_state_dict().items()}
        result = SimulationResult({k: v.cpu() for k, v in state.items()}, {}, clients)
        nodes = self._nodes(grid, cfg.sampled_per_round, timeout)
        for rnd in range(1, num_rounds + 1):
            started = time.perf_counter()
            sampled = server.sample(rng)
            self.listener.round_start(rnd, sampled)
            arrays = ArrayRecord({name: t.cpu() for name, t in state.items()})
            messages = [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({
                "train_config": json.dumps(dataclasses.asdict(cfg)), "client": k, "round": rnd,
                "device": str(self.device), "data_dir": str(self.data_dir or "")})}),
                message_type=MessageType.TRAIN, dst_node_id=node) for k, node in zip(sampled, nodes)]
            replies: dict[int, Message] = {}
            for reply in grid.send_and_receive(messages, timeout=timeout):
                if reply.has_error():
                    raise FlainError(f"a Flower node failed in round {rnd}: {reply.error.reason}")
                metrics = reply.content.metric_records["metrics"]
                k = _whole(metrics["client"])
                if _whole(metrics["data-digest"]) != data_digest(clients[k]):
                    raise FlainError(f"round {rnd}: the Flower node that played client {k} built other samples or "
                                     "another poisoned set than the server's; check that every node runs the same "
                                     "flain-cli and dataset files")
                replies[k] = reply
                self.listener.client_done(rnd, k)
            if sorted(replies) != sampled:
                raise FlainError(f"round {rnd}: {len(replies)} of {len(sampled)} Flower nodes replied within "
                                 f"{timeout:g} s")
            updates = [{name: t.to(self.device)  # in client order, as the built-in loop sums them
                        for name, t in replies[k].content.array_records["update"].to_torch_state_dict().items()}
                       for k in sampled]
            weights = [float(_whole(replies[k].content.metric_records["metrics"]["num-examples"])) for k in sampled]
            train_seconds = time.perf_counter() - started
            state = server.step(state, updates, weights)
            log = server.log(rnd, state, started, train_seconds, weights)
            result.history.append(log)
            self.listener.round_end(log)
        result.final_state = {k: v.cpu() for k, v in state.items()}
        self.result = result
        return Result(arrays=ArrayRecord(result.final_state))

    @staticmethod
    def _nodes(grid: Grid, needed: int, timeout: float) -> list[int]:
        """``needed`` node ids, waiting for the simulation to bring them up."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= needed:
                return nodes[:needed]
            if time.monotonic() > deadline:
                raise FlainError(f"only {len(nodes)} Flower nodes came up, {needed} are needed")
            time.sleep(0.5)

    # `start` does the rounds itself; the per-round hooks of the base class are not used
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        return None


def simulate_flower(cfg: TrainConfig, dataset: Dataset, device: torch.device | str = "cpu",
                    listener: Listener | None = None, *, data_dir: Path | None = None,
                    cpus: int | None = None) -> SimulationResult:
    """`simulation.simulate` on Flower's simulation engine (Ray): one virtual node per sampled client.

    Args: as `simulate`; ``data_dir`` is where the nodes load the dataset from (they load it
    themselves, once per process); ``cpus``: the Ray instance's (default: all); each node takes one,
    and a GPU share when ``device`` is one. Returns the same `SimulationResult`.
    """
    cfg.validate(dataset.spec.num_classes)
    if cfg.precision == "auto":
        raise ConfigError("is auto: resolve it for the device first (resolve_precision)", param="precision")
    if cfg.neurotoxin:
        raise ConfigError("is not run on the flower engine: its nodes are not sent the previous global update it "
                          "masks with; use --engine builtin", param="neurotoxin")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # W0 exactly as the built-in loop draws it
        init = {name: t.detach().clone() for name, t in build_model(cfg.arch, dataset.spec.num_classes)
                .state_dict().items()}
    strategy = FlainFederation(cfg, dataset, device, data_dir, listener)
    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def _server(grid: Grid, context: Context) -> None:  # noqa: ARG001
        strategy.start(grid, ArrayRecord(init), cfg.rounds)

    client_app.train()(_train_on_node)
    # Ray's future default (keep the GPU list of nodes that ask for no GPU) and no FutureWarning about it
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    gpus = 1.0 / max(1, cfg.sampled_per_round) if device.type == "cuda" else 0.0
    init_args: dict[str, Any] = {"include_dashboard": False} | ({"num_cpus": cpus} if cpus else {})
    backend: Any = {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": init_args}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)
    try:
        run_simulation(server_app, client_app, num_supernodes=cfg.sampled_per_round,
                       backend_config=backend)
    finally:
        flwr_log.setLevel(level)
    if strategy.result is None or len(strategy.result.history) != cfg.rounds:
        raise FlainError("the Flower simulation stopped before its last round (its log above says why)")
    return strategy.result
