"""`flain eval`'s forward passes against a bare PyTorch loop, and ten models in one call against ten calls.

    .venv/bin/python benchmarks/eval_speed.py [--repeat 5] [--models 10] [--skip-processes]

Part 1, in one process, interleaved: ``metrics.evaluate`` (what `flain eval` runs once the model and the
test set are loaded: the clean test set, then every triggered non-target image) against a bare loop that
runs the same forward passes (normalize a batch of 1,000, forward, argmax, under ``torch.inference_mode``)
on the same model and images. Throughput in images per second, median of the repeats; the ratio is
evaluate's over the bare loop's.

Part 2, whole processes: `flain eval` of N sample-model checkpoints in one call, against N calls of one
model each (each pays start-up, the dataset read and set-up again). Wall seconds, one run each.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flain_cli.checkpoint import ModelSource, dataset_spec
from flain_cli.datasets import load_dataset
from flain_cli.evaluation import resolve_attack
from flain_cli.loading import load_model
from flain_cli.metrics import evaluate

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_models" / "fmnist-cba-iid" / "final.safetensors"
FLAIN = Path(sys.executable).parent / "flain"


def bare(model: torch.nn.Module, batches: list[torch.Tensor], spec) -> int:
    model.eval()
    seen = 0
    with torch.inference_mode():
        for images in batches:
            for start in range(0, len(images), 1000):
                model(spec.normalize(images[start:start + 1000])).argmax(dim=1)
                seen += min(1000, len(images) - start)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--skip-processes", action="store_true")
    args = parser.parse_args()

    loaded = load_model(SAMPLE, ModelSource(), "cpu")
    spec = dataset_spec(loaded.meta)
    test = load_dataset("fmnist").test
    attack = resolve_attack(loaded.ckpt, loaded.meta.num_classes)
    assert attack is not None
    stamp = attack.build(loaded.meta.input_shape)
    triggered = stamp.stamp(test.images[test.labels != attack.task.target])
    images = len(test) + len(triggered)
    ours, theirs = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        evaluate(loaded.model, test, spec, attack.task, stamp)
        ours.append(images / (time.perf_counter() - start))
        start = time.perf_counter()
        assert bare(loaded.model, [test.images, triggered], spec) == images
        theirs.append(images / (time.perf_counter() - start))
    flain_rate, bare_rate = statistics.median(ours), statistics.median(theirs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {images} images per evaluation "
          f"(clean test set + triggered non-target images), median of {args.repeat}")
    print("| loop | images/s |\n|---|---|")
    print(f"| bare loop (inference_mode, batch 1000) | {bare_rate:,.0f} |")
    print(f"| flain eval's evaluate | {flain_rate:,.0f} |")
    print(f"ratio flain / bare: {flain_rate / bare_rate:.2f}")
    if args.skip_processes:
        return
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for i in range(args.models):  # the two sample models in turn, as separate files
            name = "fmnist-cba-iid" if i % 2 == 0 else "fmnist-dba-noniid"
            models.append(Path(tmp) / f"m{i}.safetensors")
            shutil.copy(ROOT / "sample_models" / name / "final.safetensors", models[-1])
        start = time.perf_counter()
        subprocess.run([str(FLAIN), "eval", *map(str, models), "--json"], check=True, capture_output=True)
        one_call = time.perf_counter() - start
        start = time.perf_counter()
        for model in models:
            subprocess.run([str(FLAIN), "eval", str(model), "--json"], check=True, capture_output=True)
        separate = time.perf_counter() - start
    print(f"\n| {args.models} models | wall s |\n|---|---|")
    print(f"| one `flain eval` call | {one_call:.1f} |\n| {args.models} calls of one model | {separate:.1f} |")
    print(f"one call / separate calls: {one_call / separate:.2f}")


if __name__ == "__main__":
    main()
