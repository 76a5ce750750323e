"""Whole-process start-up of the `flain` command: --version, --help, a usage error, side by side.

    .venv/bin/python benchmarks/startup.py [--repeat 5]

Each command runs as a fresh process (the console script in .venv/bin); the table gives the
median and the fastest of the repeats, in seconds.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLAIN = Path(sys.executable).parent / "flain"
COMMANDS = {"flain --version": ["--version"], "flain --help": ["--help"],
            "flain eval (usage error: no MODEL)": ["eval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every command alike
        for name, argv in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run([str(FLAIN), *argv], capture_output=True)
            times[name].append(time.perf_counter() - started)
    print("| command | median s | fastest s |\n|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.3f} | {min(values):.3f} |")


if __name__ == "__main__":
    main()
