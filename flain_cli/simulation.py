"""Federated learning with malicious clients (FedAvg or RLR), as the paper sets it up.

Clients hold index views into the one in-memory training set; malicious clients (ids
0..floor(N * MCR) - 1) stamp their trigger part on a fixed share PDR of their source-class
samples and relabel them to the target. Each round every sampled client trains a copy of the
global model with a fresh Adam optimizer and sends back its state_dict delta (BatchNorm
buffers included); the server aggregates the deltas with the chosen rule.

After every round ``simulate`` can hand out a ``Snapshot`` (global weights, history and every
random state); passing it back as ``resume`` continues the run bit for bit as if it had never
stopped. training.py stores it on disk; this module does no I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import AGGREGATORS, AggregatorSettings, Update, apply_update
from .attack import AttackTask, adaptive_penalty, boosted, choose_poisoned, neurotoxin_masks, projected, trigger_inputs
from .catalog import PRECISIONS
from .datasets import Dataset, Split
from .errors import ConfigError
from .events import Listener, RoundLog
from .metrics import evaluate
from .models import ARCHITECTURES, LayerStack, build_model
from .signals import stop_if_signalled
from .splits import SPLITS, balanced_subset
from .triggers import TRIGGERS, Trigger, TriggerSpec, make_trigger, parse_pos, stamp_rows


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fmnist"
    arch: str = "cnn-fmnist"
    clients: int = 10
    mcr: float = 0.4
    pdr: float = 0.3
    attack: str | None = "0:5"  # SRC:TGT, all:TGT, or None for a clean run
    trigger: str = "cba"
    split: str = "iid"
    alpha: float = 0.5
    rounds: int = 20
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    sample_rate: float = 1.0
    server_lr: float = 1.0
    aggregator: str = "fedavg"
    rlr_threshold: int | None = None
    train_samples: int | None = None
    seed: int = 0
    eval_every: int = 1
    precision: str = "fp32"  # the client training's (catalog.PRECISIONS); "auto" is resolved before a run
    # the trigger's settings (triggers.TriggerSpec): blend's weight and pattern image, the checkerboard's place
    trigger_alpha: float | None = None
    trigger_image: str | None = None
    trigger_pos: str | None = None  # "ROW,COL"
    # stronger attackers (attack.py), on the malicious clients' updates: boosting by K, Neurotoxin's share of
    # coordinates left alone (%), the L2 radius they are projected onto, the FLAIN-aware term's weight
    boost: float = 1.0
    neurotoxin: float = 0.0
    norm_bound: float | None = None
    adaptive: float = 0.0

    @property
    def trigger_spec(self) -> TriggerSpec:
        return TriggerSpec(self.trigger, self.trigger_alpha, self.trigger_image, parse_pos(self.trigger_pos))

    @property
    def attacker(self) -> str:
        """The malicious clients' strategy in words: plain, or what they do to their updates."""
        parts = ([f"boost {self.boost:g}"] if self.boost != 1 else []) + (
            [f"neurotoxin {self.neurotoxin:g}%"] if self.neurotoxin else []) + (
            [f"norm bound {self.norm_bound:g}"] if self.norm_bound is not None else []) + (
            [f"adaptive {self.adaptive:g}"] if self.adaptive else [])
        return ", ".join(parts) or "plain"

    @property
    def malicious(self) -> list[int]:
        return list(range(math.floor(self.clients * self.mcr + 1e-9))) if self.attack else []

    @property
    def sampled_per_round(self) -> int:
        return max(1, round(self.clients * self.sample_rate))

    def task(self, num_classes: int) -> AttackTask | None:
        return AttackTask.parse(self.attack, num_classes) if self.attack else None

    def validate(self, num_classes: int) -> None:
        self._check_types()
        checks = [
            (self.clients >= 1, "clients", f"must be at least 1, got {self.clients}"),
            (0.0 <= self.mcr <= 1.0, "mcr", f"must be in [0, 1], got {self.mcr}"),
            (0.0 <= self.pdr <= 1.0, "pdr", f"must be in [0, 1], got {self.pdr}"),
            (self.rounds >= 1, "rounds", f"must be at least 1, got {self.rounds}"),
            (self.local_epochs >= 1, "local_epochs", f"must be at least 1, got {self.local_epochs}"),
            (self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}"),
            (self.lr > 0, "lr", f"must be > 0, got {self.lr}"),
            (self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}"),
            (self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}"),
            (self.seed >= 0, "seed", f"must be 0 or more, got {self.seed}"),
            (self.train_samples is None or self.train_samples >= num_classes,
             "train_samples", f"must be at least one per class ({num_classes}), got {self.train_samples}"),
            (self.rlr_threshold is None or self.rlr_threshold >= 1,
             "rlr_threshold", f"must be at least 1, got {self.rlr_threshold}"),
            (0.0 < self.sample_rate <= 1.0, "sample_rate", f"must be in (0, 1], got {self.sample_rate}"),
            (self.eval_every >= 1, "eval_every", f"must be at least 1, got {self.eval_every}"),
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, "
                                                        f"got {self.precision!r}"),
            (0 < self.boost <= 1000, "boost", f"must be in (0, 1000], got {self.boost}"),
            (0 <= self.neurotoxin < 100, "neurotoxin", f"must be a share in [0, 100) percent, got {self.neurotoxin}"),
            (self.norm_bound is None or self.norm_bound > 0, "norm_bound", f"must be > 0, got {self.norm_bound}"),
            (0 <= self.adaptive <= 1000, "adaptive", f"must be in [0, 1000] (0: off), got {self.adaptive}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise ConfigError(message, param=param)
        for registry, name in ((SPLITS, self.split), (AGGREGATORS, self.aggregator), (TRIGGERS, self.trigger),
                               (ARCHITECTURES, self.arch)):
            registry.get(name)
        self.trigger_spec.check()
        if self.trigger_image is not None and not Path(self.trigger_image).is_file():
            raise ConfigError(f"{self.trigger_image} is not a file", param="trigger_image")
        if self.attacker != "plain" and not self.malicious:
            raise ConfigError(f"the attacker's options ({self.attacker}) need malicious clients: give an attack and "
                              "an MCR above 0")
        self.task(num_classes)

    def _check_types(self) -> None:
        """Every field holds its declared kind (a TOML grid can put anything there); floats are finite."""
        for f in fields(self):
            value, kinds = getattr(self, f.name), str(f.type).split(" | ")
            if value is None and "None" in kinds:
                continue
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value),
                  "str": isinstance(value, str)}[kinds[0]]
            if not ok:
                what = {"int": "a whole number", "float": "a finite number", "str": "a name"}[kinds[0]]
                raise ConfigError(f"must be {what}, got {value!r}", param=f.name)

    def to_dict(self) -> dict:
        """The settings; those at their default that came after the first records (precision fp32, the trigger's
        and the attacker's settings) are left out, so records and cache keys read as before they existed."""
        values = asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if values[name] == default:
                del values[name]
        return values


LATER_DEFAULTS = {"precision": "fp32", "trigger_alpha": None, "trigger_image": None, "trigger_pos": None,
                  "boost": 1.0, "neurotoxin": 0.0, "norm_bound": None, "adaptive": 0.0}


@dataclass(frozen=True)
class ClientData:
    indices: torch.Tensor  # into the training split
    poisoned: torch.Tensor | None = None  # bool mask over ``indices``
    trigger_part: int | None = None

    @property
    def n_poisoned(self) -> int:
        return 0 if self.poisoned is None else int(self.poisoned.sum())


@dataclass
class SimulationResult:
    init_state: dict[str, torch.Tensor]
    final_state: dict[str, torch.Tensor]
    clients: list[ClientData]
    history: list[RoundLog] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """A run after round ``round``: everything needed to continue it exactly."""
    config: dict
    round: int
    init_state: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    history: list[RoundLog]
    numpy_rng: Mapping[str, Any]  # np.random.Generator.bit_generator.state: client sampling
    torch_gen: torch.Tensor  # batch order
    torch_rng: torch.Tensor  # the CPU default generator: dropout
    cuda_rng: torch.Tensor | None = None  # dropout on a CUDA device
    previous: dict[str, torch.Tensor] | None = None  # the last global update (Neurotoxin's attackers read it)


def make_clients(cfg: TrainConfig, dataset: Dataset, rng: np.random.Generator) -> list[ClientData]:
    labels = dataset.train.labels
    pool = (balanced_subset(labels, cfg.train_samples, rng) if cfg.train_samples
            else torch.arange(len(labels)))
    parts = SPLITS.get(cfg.split)(labels[pool], cfg.clients, rng, alpha=cfg.alpha)
    task = cfg.task(dataset.spec.num_classes)
    trigger = make_trigger(cfg.trigger_spec, *dataset.spec.shape[1:], channels=dataset.spec.shape[0])
    clients = []
    for k, part in enumerate(parts):
        indices = pool[part]
        if k in cfg.malicious and task is not None:  # TrainConfig checks that malicious clients have a task
            poisoned = choose_poisoned(labels[indices], task, cfg.pdr, rng)
            clients.append(ClientData(indices, poisoned, trigger.part_for(k)))
        else:
            clients.append(ClientData(indices))
    return clients


def client_batches(client: ClientData, dataset: Dataset, trigger: Trigger, target: int | None,
                   batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (uint8 images, labels) batches; poisoned samples stamped and relabelled.

    The batches are gathered where ``dataset.train`` lives (`simulate` puts it on the training
    device once). The batch order is drawn on the CPU generator (the same order on any device) and
    crosses to the device once per epoch with the client's poisoned flags and the trigger's tensors;
    each batch is then gathered, stamped and relabelled there elementwise, so on a GPU the host
    never waits for the device between batches.
    """
    where = dataset.train.images.device
    perm = torch.randperm(len(client.indices), generator=gen)
    order = client.indices[perm].to(where)  # the client's samples in batch order
    hits, label = None, -1  # per position in ``order``: poisoned? (on the host: clean batches skip it, no sync)
    if client.poisoned is not None and target is not None and bool(client.poisoned.any()):
        hits, label = client.poisoned[perm], target
        hits_there, stamper = hits.to(where), trigger.stamper(client.trigger_part, where)
    for start in range(0, len(perm), batch_size):
        idx = order[start:start + batch_size]
        x, y = dataset.train.images[idx], dataset.train.labels[idx]
        if hits is not None and bool(hits[start:start + batch_size].any()):
            hit = hits_there[start:start + batch_size]
            x = stamp_rows(x, hit, stamper)
            y = torch.where(hit, label, y)
        yield x, y


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 where ``device`` computes it natively (a CUDA GPU that supports it, a CPU with
    AVX-512 BF16 or AMX), else fp32; any other value as given."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (Linux: AVX-512 BF16 or AMX in /proc/cpuinfo's flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_client(model: nn.Module, global_state: Update, client: ClientData, dataset: Dataset,
                 trigger: Trigger, target: int | None, cfg: TrainConfig, gen: torch.Generator,
                 device: torch.device, previous: Update | None = None) -> Update:
    """Local training from the global model; returns the state_dict delta.

    With ``cfg.precision`` bf16 or fp16 the forward pass and loss run under autocast (weights,
    gradients and Adam's state stay float32); fp16 scales the loss against underflow. A malicious
    client (one with poisoned samples) follows ``cfg``'s attacker (attack.py): the FLAIN-aware term in
    its loss (``adaptive``), Neurotoxin's mask on its gradients and update (from ``previous``, the last
    global update; none in round 1), then boosting and the projection onto the L2 ball.
    """
    model.load_state_dict(global_state)
    malicious = client.poisoned is not None and target is not None and client.n_poisoned > 0
    names = [name for name, _ in model.named_parameters()]
    masks = (neurotoxin_masks(previous, cfg.neurotoxin, names)
             if malicious and cfg.neurotoxin and previous is not None else None)
    guard = _adaptive_target(model, client, dataset, trigger, cfg, device) if malicious and cfg.adaptive else None
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    dtype = AUTOCAST.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    with _layer_inputs(model, cfg.arch, guard is not None) as seen:
        for _ in range(cfg.local_epochs):
            for x, y in client_batches(client, dataset, trigger, target, cfg.batch_size, gen):
                x, y = dataset.spec.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                    if guard is not None:  # on the rows not labelled with the target: clean images
                        chosen, level = guard
                        loss = loss + cfg.adaptive * adaptive_penalty(seen[-1][y != target].float(), chosen, level)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if masks is not None:
                    for name, param in model.named_parameters():
                        if param.grad is not None:
                            param.grad.mul_(masks[name])
                scaler.step(optimizer)
                scaler.update()
    update = {name: t.detach() - global_state[name] for name, t in model.state_dict().items()}
    if malicious:
        if masks is not None:
            update = {n: t * masks[n] if n in masks else t for n, t in update.items()}
        if cfg.boost != 1:
            update = boosted(update, cfg.boost, names)
        if cfg.norm_bound is not None:
            update = projected(update, cfg.norm_bound, names)
    return update


@contextlib.contextmanager
def _layer_inputs(model: nn.Module, arch: str, on: bool) -> Iterator[list[torch.Tensor]]:
    """While on: the inputs of ``arch``'s defended layer at each forward pass, the last one at [-1]."""
    seen: list[torch.Tensor] = []
    if not on:
        yield seen
        return
    layer = cast(LayerStack, model).linear(ARCHITECTURES.get(arch).defended_layer)

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:  # noqa: ARG001 - the hook's signature
        seen[:] = [inputs[0]]

    handle = layer.register_forward_pre_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


ADAPTIVE_PROBE = 512  # samples of each kind the FLAIN-aware attacker pushes through the model to choose its inputs


@torch.no_grad()
def _adaptive_target(model: nn.Module, client: ClientData, dataset: Dataset, trigger: Trigger, cfg: TrainConfig,
                     device: torch.device) -> tuple[torch.Tensor, float]:
    """The FLAIN-aware attacker's plan for this round, on the global model: the defended layer's inputs its trigger
    raises most (attack.trigger_inputs, over up to ADAPTIVE_PROBE of its poisoned samples with the trigger and
    as many of its clean ones), and the level their clean mean should reach: the median input's clean mean."""
    assert client.poisoned is not None
    images = dataset.train.images
    poisoned = client.indices[client.poisoned][:ADAPTIVE_PROBE].to(images.device)
    clean = client.indices[~client.poisoned][:ADAPTIVE_PROBE].to(images.device)
    stamper = trigger.stamper(client.trigger_part, images.device)
    model.eval()
    with _layer_inputs(model, cfg.arch, True) as seen:
        model(dataset.spec.normalize(images[clean].to(device)))
        on_clean = seen[-1].float()
        model(dataset.spec.normalize(stamper(images[poisoned]).to(device)))
        on_triggered = seen[-1].float()
    return trigger_inputs(on_clean, on_triggered), float(on_clean.mean(0).median())


def with_train_on(dataset: Dataset, device: torch.device) -> Dataset:
    """``dataset`` with its training split (uint8) on ``device``, once: batches are gathered, stamped and
    normalized there (`client_batches`); on the CPU it is the same tensors."""
    return dataclasses.replace(dataset, train=Split(dataset.train.images.to(device), dataset.train.labels.to(device)))


class Server:
    """The server's side of every round, for the built-in loop and the Flower engine alike: which clients
    train, how their updates are aggregated (FedAvg or RLR, BatchNorm buffers averaged), when ACC/ASR are measured.
    """

    def __init__(self, cfg: TrainConfig, dataset: Dataset, model: nn.Module, device: torch.device) -> None:
        self.cfg, self.dataset, self.model, self.device = cfg, dataset, model, device
        self.task = cfg.task(dataset.spec.num_classes)
        self.trigger = make_trigger(cfg.trigger_spec, *dataset.spec.shape[1:], channels=dataset.spec.shape[0])
        self.aggregate = AGGREGATORS.get(cfg.aggregator)
        self.settings = AggregatorSettings(cfg.server_lr, cfg.rlr_threshold, {n for n, _ in model.named_buffers()})

    @property
    def target(self) -> int | None:
        return self.task.target if self.task else None

    def sample(self, rng: np.random.Generator) -> list[int]:
        """This round's clients, in index order."""
        return sorted(rng.choice(self.cfg.clients, size=self.cfg.sampled_per_round, replace=False).tolist())

    def step(self, state: Update, updates: list[Update], weights: list[float]) -> Update:
        """The next global model: the updates (in client order) aggregated and applied."""
        return apply_update(state, self.aggregate(updates, weights, self.settings))

    def log(self, rnd: int, state: Update, started: float, train_seconds: float, weights: list[float]) -> RoundLog:
        """The round's record, with ACC/ASR on the test split when this round is evaluated."""
        acc = asr = None
        if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds:
            self.model.load_state_dict(state)
            res = evaluate(self.model, self.dataset.test, self.dataset.spec, self.task, self.trigger, self.device,
                           all_classes=False)
            acc, asr = res.acc, res.asr
        return RoundLog(rnd, acc, asr, time.perf_counter() - started, train_seconds,
                        int(sum(weights)) * self.cfg.local_epochs)


def simulate(cfg: TrainConfig, dataset: Dataset, device: torch.device | str = "cpu",
             listener: Listener | None = None, *, resume: Snapshot | None = None,
             on_round: Callable[[Snapshot], None] | None = None) -> SimulationResult:
    """Run the whole federation; bit-reproducible for a seed on one machine.

    ``on_round`` receives a Snapshot after every round; ``resume`` continues from one (it must
    come from the same configuration).
    """
    cfg.validate(dataset.spec.num_classes)
    if cfg.precision == "auto":
        raise ConfigError("is auto: resolve it for the device first (resolve_precision), so that the run records "
                          "the precision it used", param="precision")
    listener = listener or Listener()
    device = torch.device(device)
    rng = np.random.default_rng(cfg.seed)
    clients = make_clients(cfg, dataset, rng)
    local = with_train_on(dataset, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # seeded init and dropout, without touching the caller's RNG
        model = build_model(cfg.arch, dataset.spec.num_classes).to(device)
        server = Server(cfg, dataset, model, device)
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        result = SimulationResult({k: v.cpu() for k, v in state.items()}, {}, clients)
        previous: Update | None = None  # the last global update: what Neurotoxin's attackers avoid
        if resume is not None:
            state = _restore(resume, cfg, result, rng, gen, device)
            if resume.previous is not None:
                previous = {k: v.to(device) for k, v in resume.previous.items()}
            listener.resumed(list(result.history))
        for rnd in range(len(result.history) + 1, cfg.rounds + 1):
            started = time.perf_counter()
            sampled = server.sample(rng)
            listener.round_start(rnd, sampled)
            updates, weights = [], []
            for k in sampled:
                updates.append(train_client(model, state, clients[k], local, server.trigger, server.target, cfg, gen,
                                            device, previous))
                weights.append(float(len(clients[k].indices)))
                listener.client_done(rnd, k)
                stop_if_signalled()
            if device.type == "cuda":  # kernels run asynchronously: the round's training is done when they are
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - started
            before, state = state, server.step(state, updates, weights)
            if cfg.neurotoxin:
                previous = {k: state[k] - before[k] for k in state}
            log = server.log(rnd, state, started, train_seconds, weights)
            result.history.append(log)
            if on_round is not None:
                on_round(Snapshot(cfg.to_dict(), rnd, result.init_state, {k: v.cpu() for k, v in state.items()},
                                  list(result.history), rng.bit_generator.state, gen.get_state(),
                                  torch.get_rng_state(),
                                  torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                  None if previous is None else {k: v.cpu() for k, v in previous.items()}))
            listener.round_end(log)
        result.final_state = {k: v.cpu() for k, v in state.items()}
    return result


def _restore(snap: Snapshot, cfg: TrainConfig, result: SimulationResult, rng: np.random.Generator,
             gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Check that ``snap`` belongs to this run, load its random states; return the global state."""
    differ = sorted(k for k, v in cfg.to_dict().items() if snap.config.get(k) != v)
    if differ:
        raise ConfigError("the interrupted run had other settings ("
                          + ", ".join(f"{k}: {snap.config.get(k)!r} there, {getattr(cfg, k)!r} here" for k in differ)
                          + "); run with those settings, or start over")
    fits = (0 < snap.round <= cfg.rounds and len(snap.history) == snap.round
            and set(snap.state) == set(snap.init_state) == set(result.init_state)
            and all(torch.equal(snap.init_state[k], v) for k, v in result.init_state.items()))
    if not fits:
        raise ConfigError(f"the interrupted run (round {snap.round}) does not fit this configuration "
                          "(other initial weights or rounds); start over")
    if (snap.cuda_rng is None) != (device.type != "cuda"):
        raise ConfigError("the interrupted run used another kind of device; resume it on the same one")
    rng.bit_generator.state = snap.numpy_rng
    gen.set_state(snap.torch_gen)
    torch.set_rng_state(snap.torch_rng)
    if snap.cuda_rng is not None:
        torch.cuda.set_rng_state(snap.cuda_rng, device)
    result.history.extend(snap.history)
    return {k: v.to(device) for k, v in snap.state.items()}
