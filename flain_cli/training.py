"""Run a federation and write its checkpoints: what `flain train` and `flain experiment` share.

While it runs, ``OUT/resume.safetensors`` holds the state after the last finished round
(global and initial weights as tensors, the round history and random states as metadata), so an
interrupted run continues from there, bit for bit; the file is removed once the final checkpoint
is written. ``OUT/train.lock`` keeps two processes from training into one folder at once (an
advisory ``flock``: the system drops it when its process ends, however it ends).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .catalog import ENGINES, LOCK_FILE, RESUME_FILE
from .checkpoint import model_meta, save_checkpoint
from .datasets import Dataset
from .errors import CheckpointError, ConfigError, FlainError, opt
from .events import Listener, RoundLog, round_record
from .files import atomic_write, missing_folders, remove_empty
from .formats import canonical_safetensors
from .simulation import SimulationResult, Snapshot, TrainConfig, simulate

RESUME_FORMAT = "flain-cli/resume-1"
_RNG = {"torch_gen": "rng/batch_order", "torch_rng": "rng/cpu", "cuda_rng": "rng/cuda"}


@dataclass(frozen=True)
class TrainOutcome:
    init_path: Path
    final_path: Path
    init_sha256: str
    final_sha256: str
    result: SimulationResult
    seconds: float
    resumed_from_round: int = 0
    engine: str = "builtin"

    def summary(self, cfg: TrainConfig) -> dict[str, Any]:
        history = self.result.history
        train_seconds = sum(h.train_seconds for h in history)
        samples = sum(h.samples for h in history)
        return {"init": str(self.init_path), "final": str(self.final_path), "init_sha256": self.init_sha256,
                "final_sha256": self.final_sha256, "acc": history[-1].acc, "asr": history[-1].asr,
                "rounds": cfg.rounds, "seconds": round(self.seconds, 2), "resumed_from_round": self.resumed_from_round,
                "engine": self.engine,
                "samples_per_second": round(samples / max(train_seconds, 1e-9), 1),
                "malicious_clients": cfg.malicious,
                "poisoned_samples": sum(c.n_poisoned for c in self.result.clients),
                "history": [round_record(h) for h in history]}


def attack_meta(cfg: TrainConfig, num_classes: int) -> dict[str, Any] | None:
    task = cfg.task(num_classes)
    if task is None:
        return None
    return ({"task": str(task), "source": task.source, "target": task.target, "trigger": cfg.trigger}
            | cfg.trigger_spec.record()
            | {"pdr": cfg.pdr, "mcr": cfg.mcr, "malicious_clients": cfg.malicious}
            | ({"attacker": cfg.attacker} if cfg.attacker != "plain" else {}))


def save_snapshot(path: Path, snap: Snapshot) -> None:
    tensors = ({f"state/{k}": v for k, v in snap.state.items()} | {f"init/{k}": v for k, v in snap.init_state.items()}
               | {f"previous/{k}": v for k, v in (snap.previous or {}).items()}
               | {key: getattr(snap, field) for field, key in _RNG.items() if getattr(snap, field) is not None})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": RESUME_FORMAT, "config": snap.config, "round": snap.round, "numpy_rng": snap.numpy_rng,
            "history": [asdict(h) for h in snap.history]}
    encoded = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(canonical_safetensors(tensors, encoded)))
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None


def load_snapshot(path: Path) -> Snapshot:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if meta.get("format") != RESUME_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {RESUME_FORMAT!r}")
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return Snapshot(meta["config"], int(meta["round"]), part("init/"), part("state/"),
                        [RoundLog(**h) for h in meta["history"]], meta["numpy_rng"],
                        tensors[_RNG["torch_gen"]], tensors[_RNG["torch_rng"]], tensors.get(_RNG["cuda_rng"]),
                        part("previous/") or None)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable flain-cli resume file ({exc}); "
                              "delete it to start the run over") from None


class RunBusy(FlainError):
    """Another process is training into the same folder right now."""

    def __init__(self, out_dir: Path, holder: str) -> None:
        super().__init__(f"{out_dir} is being trained right now by {holder}; wait for it to finish, "
                         "or pick another output folder")
        self.holder = holder


@contextlib.contextmanager
def run_lock(out_dir: Path, *, wait: bool = False, tidy: bool = False) -> Iterator[None]:
    """Hold ``out_dir/train.lock`` while training into ``out_dir``.

    Raises RunBusy when another process holds it, or with ``wait`` blocks until it is free.
    ``tidy``: when this call created ``out_dir`` and it holds nothing but the lock at the end (the
    run failed before its first round), remove both; for a single trainer (`flain train`), not for
    workers that wait on one another's locks. Where ``fcntl`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    out_dir = Path(out_dir)
    created = missing_folders(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / LOCK_FILE, "a+")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise CheckpointError(f"cannot write into {out_dir}: {exc.strerror or exc}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            raise RunBusy(out_dir, f.read().strip() or "another process") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
            yield
        finally:
            if tidy and created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
                (out_dir / LOCK_FILE).unlink()
                remove_empty(created)
            fcntl.flock(f, fcntl.LOCK_UN)


def resuming(out_dir: Path, *, resume: bool, force: bool) -> bool:
    """Whether a training into ``out_dir`` continues the interrupted run found there.

    An interrupted run is never dropped silently: without ``resume`` (continue it) or ``force``
    (start over), it is refused. Take the folder's lock (:func:`run_lock`) before asking.
    """
    path = Path(out_dir) / RESUME_FILE
    if not path.is_file():
        return False
    if not (resume or force):
        raise ConfigError(f"{out_dir} holds a run interrupted after round {load_snapshot(path).round}; "
                          f"pass {opt('resume')} to continue it, or {opt('force')} to start over")
    return resume


def check_engine(engine: str) -> None:
    """Refuse an unknown engine, or the flower engine where Flower is not installed, before any work."""
    if engine not in ENGINES:
        raise ConfigError(f"must be one of {', '.join(ENGINES)}, got {engine!r}", param="engine")
    if engine == "flower" and importlib.util.find_spec("flwr") is None:
        raise ConfigError("flower needs Flower: bash scripts/setup.sh --flower (then .venv-flower/bin/flain), "
                          "or pip install 'flain-cli[flower]'", param="engine")


def train_to_dir(cfg: TrainConfig, data: Dataset, out_dir: Path, device: torch.device | str = "cpu",
                 listener: Listener | None = None, *, resume: bool = True, engine: str = "builtin",
                 data_dir: Path | None = None) -> TrainOutcome:
    """Simulate, then write ``out_dir/init.safetensors`` and ``out_dir/final.safetensors``.

    With ``resume`` an interrupted run found in ``out_dir`` continues; otherwise it starts over.
    ``engine="flower"`` runs the federation on Flower's simulation engine (needs the 'flower'
    extra; no resume: it keeps no per-round snapshot); its nodes load the dataset from ``data_dir``.
    """
    check_engine(engine)
    started = time.perf_counter()
    resume_path = Path(out_dir) / RESUME_FILE
    snapshot = load_snapshot(resume_path) if resume and resume_path.is_file() else None
    if engine == "flower":
        if snapshot is not None:
            raise ConfigError(f"{out_dir} holds a run of the builtin engine interrupted after round {snapshot.round}; "
                              f"resume it with that engine, or pass {opt('force')} to start over", param="engine")
        from .flower import simulate_flower
        result = simulate_flower(cfg, data, device, listener, data_dir=data_dir)
    else:
        result = simulate(cfg, data, device, listener, resume=snapshot,
                          on_round=lambda snap: save_snapshot(resume_path, snap))
    spec = data.spec
    base = model_meta(cfg.arch, spec.num_classes, spec.name).to_json() | {
        "train_config": cfg.to_dict(), "seed": cfg.seed, "attack": attack_meta(cfg, spec.num_classes)} | (
        {"engine": engine} if engine != "builtin" else {})  # the builtin engine's files read as before engines
    init_path, final_path = out_dir / "init.safetensors", out_dir / "final.safetensors"
    init_sha = save_checkpoint(init_path, result.init_state, base | {"role": "init"})
    last = result.history[-1]
    final_sha = save_checkpoint(final_path, result.final_state, base | {
        "role": "final", "parents": {"init": init_sha}, "metrics": {"acc": last.acc, "asr": last.asr}})
    resume_path.unlink(missing_ok=True)
    return TrainOutcome(init_path, final_path, init_sha, final_sha, result, time.perf_counter() - started,
                        snapshot.round if snapshot else 0, engine)
