"""Run a federation and write its checkpoints: what `flain train` and `flain experiment` share."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import model_meta, save_checkpoint
from .datasets import Dataset
from .simulation import Listener, SimulationResult, TrainConfig, simulate


@dataclass(frozen=True)
class TrainOutcome:
    init_path: Path
    final_path: Path
    init_sha256: str
    final_sha256: str
    result: SimulationResult
    seconds: float

    def summary(self, cfg: TrainConfig) -> dict[str, Any]:
        history = self.result.history
        train_seconds = sum(h.train_seconds for h in history)
        samples = sum(h.samples for h in history)
        return {"init": str(self.init_path), "final": str(self.final_path), "init_sha256": self.init_sha256,
                "final_sha256": self.final_sha256, "acc": history[-1].acc, "asr": history[-1].asr,
                "rounds": cfg.rounds, "seconds": round(self.seconds, 2),
                "samples_per_second": round(samples / max(train_seconds, 1e-9), 1),
                "malicious_clients": cfg.malicious,
                "poisoned_samples": sum(c.n_poisoned for c in self.result.clients),
                "history": [{"round": h.round, "acc": h.acc, "asr": h.asr, "seconds": round(h.seconds, 3)}
                            for h in history]}


def attack_meta(cfg: TrainConfig, num_classes: int) -> dict[str, Any] | None:
    task = cfg.task(num_classes)
    if task is None:
        return None
    return {"task": str(task), "source": task.source, "target": task.target, "trigger": cfg.trigger,
            "pdr": cfg.pdr, "mcr": cfg.mcr, "malicious_clients": cfg.malicious}


def train_to_dir(cfg: TrainConfig, data: Dataset, out_dir: Path, device: torch.device | str = "cpu",
                 listener: Listener | None = None) -> TrainOutcome:
    """Simulate, then write ``out_dir/init.safetensors`` and ``out_dir/final.safetensors``."""
    started = time.perf_counter()
    result = simulate(cfg, data, device, listener)
    spec = data.spec
    base = model_meta(cfg.arch, spec.num_classes, spec.name) | {
        "train_config": cfg.to_dict(), "seed": cfg.seed, "attack": attack_meta(cfg, spec.num_classes)}
    init_path, final_path = out_dir / "init.safetensors", out_dir / "final.safetensors"
    init_sha = save_checkpoint(init_path, result.init_state, base | {"role": "init"})
    last = result.history[-1]
    final_sha = save_checkpoint(final_path, result.final_state, base | {
        "role": "final", "parents": {"init": init_sha}, "metrics": {"acc": last.acc, "asr": last.asr}})
    return TrainOutcome(init_path, final_path, init_sha, final_sha, result, time.perf_counter() - started)
