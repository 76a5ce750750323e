"""What the default rule's repair costs: `defend_checkpoint` with --preset paper and default, side by side.

Both run in this process on the same checkpoint and aux set, alternating, `--repeats` times each;
reported: median seconds of the whole call (loading, features, search, repair; no writing).

    .venv/bin/python benchmarks/defend_rules.py sample_models/fmnist-cba-iid --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from flain_cli.audit import defend_checkpoint
from flain_cli.settings import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="folder with final.safetensors, init.safetensors (and aux/)")
    parser.add_argument("--aux", type=Path, help="aux set (default: RUN/aux)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    aux = args.aux or args.run / "aux"
    times: dict[str, list[float]] = {name: [] for name in ("paper", "default")}
    for _ in range(args.repeats):
        for name in times:
            started = time.perf_counter()
            defend_checkpoint(args.run / "final.safetensors", args.run / "init.safetensors", aux, PRESETS[name])
            times[name].append(time.perf_counter() - started)
    medians = {name: round(statistics.median(values), 2) for name, values in times.items()}
    print(json.dumps({"run": str(args.run), "median_seconds": medians,
                      "repair_seconds": round(medians["default"] - medians["paper"], 2)}))


if __name__ == "__main__":
    main()
