"""The main job on a shipped sample model: scan -> defend -> eval before and after.

A sample folder (sample_models/NAME/) holds ``init.safetensors``, ``final.safetensors`` and an
``aux/`` folder; sample_models/ also ships a class-balanced test subset used when the dataset
itself is not installed, so the demo needs no download.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .audit import defend_checkpoint, scan_checkpoint
from .checkpoint import ModelMeta, load_checkpoint, resolve_model_meta, save_checkpoint
from .datasets import Split, load_dataset
from .errors import DataError, FlainError
from .evaluation import evaluate_checkpoint, load_test_file
from .settings import PRESETS, defense_config

TEST_SUBSET = "fmnist-test-2000.npz"
# the peer shown beside FLAIN: the best mean DER of the post-training peers on the generality grid's held-out
# cells (docs/results.md), under the default preset (its kl stop, then fine-tuning)
PEER = "fine-pruning"


@dataclass(frozen=True)
class DemoReport:
    sample: str
    test_source: str
    n_test: int
    before: dict[str, Any]
    after: dict[str, Any]  # the default rule (shifts 2, the search stopped at 1.5 x the shift KL, then the SGD repair)
    paper: dict[str, Any]  # Algorithm 1 exactly (--preset paper)
    peer: dict[str, Any]  # PEER, the best other method
    defense: dict[str, Any]
    seconds: dict[str, float]
    out: Path
    paper_out: Path
    peer_out: Path


def sample_names(samples_dir: Path) -> list[str]:
    return sorted(p.name for p in samples_dir.iterdir() if (p / "final.safetensors").is_file()) \
        if samples_dir.is_dir() else []


def _test_split(samples_dir: Path, meta: ModelMeta, use_subset: bool) -> tuple[Split, str]:
    subset = samples_dir / TEST_SUBSET
    if not use_subset and meta.dataset is not None:
        try:
            return load_dataset(meta.dataset).test, f"{meta.dataset} test split"
        except DataError:
            pass  # not installed: fall back on the shipped subset
    if not subset.is_file():
        raise FlainError(f"no test data: {meta.dataset} is not installed and {subset} is missing")
    return load_test_file(subset, meta), str(subset)


def paper_path(out: Path) -> Path:
    """Where the demo writes the paper preset's model, beside the default one."""
    return out.with_name(out.name.removesuffix(".safetensors") + "-paper.safetensors")


def peer_path(out: Path) -> Path:
    """Where the demo writes the peer method's model, beside the default one."""
    return out.with_name(out.name.removesuffix(".safetensors") + f"-{PEER}.safetensors")


def run_demo(samples_dir: Path, sample: str, out: Path, *, paper_out: Path | None = None,
             peer_out: Path | None = None, use_subset: bool = False,
             device: torch.device | str = "cpu") -> DemoReport:
    """scan, defend with the default rule (written to ``out``), with the paper preset (``paper_out``, default
    `paper_path(out)`) and with the PEER method (``peer_out``, default `peer_path(out)`), and evaluate all four
    models."""
    paper_out = paper_out or paper_path(out)
    peer_out = peer_out or peer_path(out)
    folder = samples_dir / sample
    if not (folder / "final.safetensors").is_file():
        names = sample_names(samples_dir)
        raise FlainError(f"no sample model {folder}; available: {', '.join(names) or 'none'}")
    final, init, aux = folder / "final.safetensors", folder / "init.safetensors", folder / "aux"
    meta = resolve_model_meta(load_checkpoint(final))
    test, source = _test_split(samples_dir, meta, use_subset)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    scan = scan_checkpoint(final, aux, device=device)
    seconds["scan"] = time.perf_counter() - started

    started = time.perf_counter()
    outcome = defend_checkpoint(final, init, aux, PRESETS["default"], device=device)
    save_checkpoint(out, outcome.state, outcome.meta)
    seconds["defend"] = time.perf_counter() - started
    started = time.perf_counter()
    paper = defend_checkpoint(final, init, aux, PRESETS["paper"], device=device)
    save_checkpoint(paper_out, paper.state, paper.meta)
    seconds["defend_paper"] = time.perf_counter() - started
    started = time.perf_counter()
    peer = defend_checkpoint(final, init, aux, defense_config("default", method=PEER), device=device)
    save_checkpoint(peer_out, peer.state, peer.meta)
    seconds["defend_peer"] = time.perf_counter() - started

    started = time.perf_counter()
    before = evaluate_checkpoint(final, test=test, device=device).result
    after = evaluate_checkpoint(out, test=test, device=device).result
    after_paper = evaluate_checkpoint(paper_out, test=test, device=device).result
    after_peer = evaluate_checkpoint(peer_out, test=test, device=device).result
    seconds["eval"] = time.perf_counter() - started
    d, p, q = outcome.record, paper.record, peer.record
    return DemoReport(
        sample, source, before.n_clean,
        {"acc": before.acc, "asr": before.asr, "aux_acc": d.aux_acc_before},
        {"acc": after.acc, "asr": after.asr, "aux_acc": d.aux_acc_after, "rule": d.config.rule,
         "flipped": d.flipped, "lambda": d.lam},
        {"acc": after_paper.acc, "asr": after_paper.asr, "aux_acc": p.aux_acc_after, "rule": p.config.rule,
         "flipped": p.flipped, "lambda": p.lam},
        {"acc": after_peer.acc, "asr": after_peer.asr, "aux_acc": q.aux_acc_after, "rule": q.config.rule,
         "method": PEER, "flipped": q.flipped, "lambda": q.lam},
        {"lambda": d.lam, "flipped": d.flipped, "of": d.of, "silent_neurons": int((scan.means == 0).sum())},
        seconds, out, paper_out, peer_out)
