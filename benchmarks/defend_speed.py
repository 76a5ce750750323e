"""`flain defend`'s fast search against Algorithm 1 run literally, on one checkpoint and aux set.

Both run in this process on the same model and aux set, alternating, `--repeats` times each;
reported: median seconds of the search (loading excluded, the cached features included for the
fast path), network evaluations, and whether both chose the same lambda, neurons and weights.

    .venv/bin/python benchmarks/defend_speed.py runs/paper-fmnist/final.safetensors \
        runs/paper-fmnist/init.safetensors runs/aux --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flain_cli.checkpoint import load_checkpoint
from flain_cli.defense import search_fast, search_plain
from flain_cli.features import AuxFeatures
from flain_cli.loading import load_aux_for, load_model
from flain_cli.settings import defense_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("init", type=Path)
    parser.add_argument("aux", type=Path)
    parser.add_argument("--step", type=float, default=0.001)
    parser.add_argument("--rho", type=float, default=0.03)
    parser.add_argument("--method", default="flain")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model)
    layer = loaded.meta.defended_layer
    aux = load_aux_for(loaded, args.aux)
    weight = loaded.ckpt.tensors[f"{layer}.weight"]
    init = load_checkpoint(args.init).tensors[f"{layer}.weight"]
    config = defense_config("paper", step=args.step, rho=args.rho, method=args.method)
    times: dict[str, list[float]] = {"fast": [], "plain": []}
    results = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        feats = AuxFeatures(loaded.model, layer, aux, loaded.meta)  # the fast path's one prefix pass
        results["fast"] = search_fast(weight, init, feats.mean_activations(0), feats.accuracy, config)
        times["fast"].append(time.perf_counter() - started)
        started = time.perf_counter()
        feats = AuxFeatures(loaded.model, layer, aux, loaded.meta)
        results["plain"] = search_plain(weight, init, feats.mean_activations(0), feats.accuracy_full, config)
        times["plain"].append(time.perf_counter() - started)
    fast, plain = results["fast"], results["plain"]
    report = {
        "model": str(args.model), "arch": loaded.meta.arch, "layer": layer, "inputs": int(weight.shape[1]),
        "n_aux": len(aux), "step": args.step, "rho": args.rho, "method": args.method, "repeats": args.repeats,
        "lambda": fast.lam, "changed": fast.changed, "steps": fast.steps,
        "fast": {"seconds": round(statistics.median(times["fast"]), 3), "evaluations": fast.evaluations},
        "plain": {"seconds": round(statistics.median(times["plain"]), 3), "evaluations": plain.evaluations},
        "speedup": round(statistics.median(times["plain"]) / statistics.median(times["fast"]), 1),
        "same_result": bool(fast.lam == plain.lam and torch.equal(fast.mask, plain.mask)
                            and torch.equal(fast.weight, plain.weight)),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
