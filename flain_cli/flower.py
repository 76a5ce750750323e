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

Needs Flower (``pip install 'flain-cli[flower]'``); nothing else in flain-cli imports this module.
examples/flower_flain.py is a whole runnable app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .attack import AttackTask
from .catalog import TRIGGERS
from .checkpoint import Checkpoint, conform, resolve_model_meta, save_checkpoint
from .errors import ConfigError, opt


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
