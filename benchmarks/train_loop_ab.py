"""`flain train`'s client loop against a bare PyTorch loop, alternating in one process on one model.

`train_throughput.py` runs each side in its own process, so each pays its own start (oneDNN
primitive creation, first-touch allocations) and the two see different memory states. Here both
train the same model on the same client samples, alternating bare / flain ``--repeats`` times after
a warm-up round of each; the bare loop gets the client's samples pre-normalized and unpoisoned, the
flain side (`simulation.train_client`) gathers, stamps, relabels and normalizes per batch, builds
its Adam and returns the update, as in a round. Medians of the repeats.

    .venv/bin/python benchmarks/train_loop_ab.py --samples 3072 --repeats 5 --threads 1

``--sides`` adds the same two loops in bf16 (``bare-bf16``: the bare loop under
``torch.autocast(dtype=torch.bfloat16)``; ``flain-bf16``: `train_client` with ``precision="bf16"``),
all alternating in the one process, so that bf16's gain over fp32 is read in one run:

    .venv/bin/python benchmarks/train_loop_ab.py --samples 3072 --repeats 5 --sides bare,flain,bare-bf16,flain-bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

SIDES = ("bare", "flain", "bare-bf16", "flain-bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3072)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--arch", default="cnn-fmnist")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precision", default="fp32", help="the flain side's (fp32, bf16, fp16)")
    parser.add_argument("--sides", default="bare,flain", help=f"comma-separated, from {', '.join(SIDES)}")
    args = parser.parse_args()
    sides = args.sides.split(",")
    if not set(sides) <= set(SIDES) or len(set(sides)) != len(sides):
        parser.error(f"--sides: distinct names from {', '.join(SIDES)}")

    import numpy as np
    import torch
    import torch.nn.functional as F

    from flain_cli.datasets import load_dataset
    from flain_cli.models import build_model
    from flain_cli.simulation import TrainConfig, make_clients, train_client
    from flain_cli.triggers import make_trigger

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fmnist")
    cfg = TrainConfig(arch=args.arch, clients=1, mcr=1.0, pdr=0.3, rounds=1, batch_size=args.batch_size,
                      train_samples=args.samples, seed=0, precision=args.precision)
    client = make_clients(cfg, data, np.random.default_rng(0))[0]
    x_all = data.spec.normalize(data.train.images[client.indices])
    y_all = data.train.labels[client.indices]
    trigger = make_trigger(cfg.trigger, *data.spec.shape[1:])
    torch.manual_seed(0)
    model = build_model(args.arch, data.spec.num_classes).train()

    def bare(bf16: bool) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
        for start in range(0, len(perm), args.batch_size):
            b = perm[start:start + args.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x_all[b]), y_all[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def flain(precision: str) -> None:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        train_client(model, state, client, data, trigger, 5, dataclasses.replace(cfg, precision=precision),
                     torch.Generator().manual_seed(0), torch.device("cpu"))

    runs = {"bare": lambda: bare(False), "bare-bf16": lambda: bare(True),
            "flain": lambda: flain(args.precision), "flain-bf16": lambda: flain("bf16")}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(args.repeats + 1):  # the first round of each is a warm-up
        for name in sides:
            started = time.perf_counter()
            runs[name]()
            if rep:
                seconds[name].append(time.perf_counter() - started)
    report: dict[str, object] = {"arch": args.arch, "samples": len(y_all), "batch_size": args.batch_size,
                                 "repeats": args.repeats, "threads": torch.get_num_threads(),
                                 "precision": args.precision}
    for name, values in seconds.items():
        report[name] = {"samples_per_s": round(len(y_all) / statistics.median(values), 1),
                        "seconds": [round(v, 3) for v in values]}
    for a, b in (("flain", "bare"), ("flain-bf16", "flain"), ("bare-bf16", "bare"), ("flain-bf16", "bare-bf16")):
        if a in seconds and b in seconds:
            report[f"ratio {a} / {b}"] = round(statistics.median(seconds[b]) / statistics.median(seconds[a]), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
