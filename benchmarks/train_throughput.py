"""Client-training throughput of `flain train` against a bare PyTorch loop, side by side.

Both train the same architecture on the same in-memory Fashion-MNIST tensors with the same batch
size and optimizer (Adam, lr 1e-3); the bare loop gets its images pre-normalized (the fastest
it can be), `flain train`'s path gathers uint8 client batches, stamps poisoned samples and
normalizes per batch. Each measurement runs in its own subprocess (so peak memory is its own),
alternating bare / flain, and the median of the repetitions is reported. The flain side's peak
memory includes the end-of-round evaluation on the 10,000 test images, which the bare loop
does not do.

    .venv/bin/python benchmarks/train_throughput.py --samples 12000 --repeats 5
    .venv/bin/python benchmarks/train_throughput.py --modes bare,bare-bf16,flain,flain-bf16

``bare-bf16`` is the bare loop under ``torch.autocast(dtype=torch.bfloat16)``, ``flain-bf16``
`flain train --precision bf16`'s client training. ``--device cuda`` runs both on a GPU (the bare
loop's images then live on the GPU from the start, normalized; flain's training split is moved
there once, as uint8, as `flain train --device cuda` does, and each batch is gathered, stamped and
normalized there); the times there end with a synchronize, and each child first runs one step of
the model on a random batch, so that neither side's time holds CUDA's and cuDNN's start-up.

    python benchmarks/train_throughput.py --device cuda --samples 60000 --modes bare,bare-bf16,flain,flain-bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_bare(samples: int, batch_size: int, arch: str, bf16: bool = False, device: str = "cpu") -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from flain_cli.datasets import load_dataset
    from flain_cli.models import build_model
    from flain_cli.splits import balanced_subset

    data = load_dataset("fmnist")
    idx = balanced_subset(data.train.labels, samples, np.random.default_rng(0))
    x_all = data.spec.normalize(data.train.images[idx]).to(device)
    y_all = data.train.labels[idx].to(device)
    torch.manual_seed(0)
    model = build_model(arch, 10).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(0)
    _sync(device)
    started = time.perf_counter()
    perm = torch.randperm(len(y_all), generator=gen).to(device)
    for start in range(0, len(perm), batch_size):
        b = perm[start:start + batch_size]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x_all[b]), y_all[b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return {"seconds": time.perf_counter() - started}


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_flain(samples: int, batch_size: int, arch: str, precision: str = "fp32", device: str = "cpu") -> dict:
    from flain_cli.datasets import load_dataset
    from flain_cli.simulation import TrainConfig, simulate

    data = load_dataset("fmnist")
    # One malicious client holding all the samples (poisoning and trigger stamping on the hot
    # path, the same batch sizes as the bare loop), one round; RoundLog.train_seconds covers the
    # client training only (not aggregation or evaluation).
    cfg = TrainConfig(arch=arch, clients=1, mcr=1.0, pdr=0.3, rounds=1, batch_size=batch_size,
                      train_samples=samples, seed=0, precision=precision)
    result = simulate(cfg, data, device)
    return {"seconds": result.history[0].train_seconds}


MODES = ("bare", "bare-bf16", "flain", "flain-bf16")


def _warm(arch: str, batch_size: int, device: str) -> None:
    """One forward and backward pass on a random batch: CUDA's context and cuDNN's handles start here,
    outside the timed loop (on the CPU there is nothing to start, and nothing is run)."""
    import torch

    from flain_cli.catalog import ARCHITECTURES
    from flain_cli.models import build_model

    if torch.device(device).type != "cuda":
        return
    model = build_model(arch, 10).to(device)
    model(torch.randn(batch_size, *ARCHITECTURES.get(arch).input_shape, device=device)).sum().backward()
    _sync(device)


def child(mode: str, samples: int, batch_size: int, arch: str, device: str) -> None:
    _warm(arch, batch_size, device)
    if mode.startswith("bare"):
        result = run_bare(samples, batch_size, arch, bf16=mode == "bare-bf16", device=device)
    else:
        result = run_flain(samples, batch_size, arch, "bf16" if mode == "flain-bf16" else "fp32", device)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--arch", default="cnn-fmnist")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="bare,flain", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.samples, args.batch_size, args.arch, args.device)
        return
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--samples", str(args.samples),
                                  "--batch-size", str(args.batch_size), "--arch", args.arch, "--device", args.device],
                                 check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    report = {"device": args.device, "arch": args.arch, "samples": args.samples, "batch_size": args.batch_size,
              "repeats": args.repeats}
    for mode, rs in runs.items():
        report[mode] = {"samples_per_s": round(args.samples / statistics.median(r["seconds"] for r in rs), 1),
                        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1)}
    for a, b in (("flain", "bare"), ("bare-bf16", "bare"), ("flain-bf16", "flain"), ("flain-bf16", "bare-bf16")):
        if a in report and b in report:
            report[f"ratio {a} / {b}"] = round(report[a]["samples_per_s"] / report[b]["samples_per_s"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
