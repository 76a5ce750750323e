"""Whole-process start-up of the `flain` command: --version, help, usage errors, side by side.

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
COMMANDS = {"flain --version": ["--version"], "flain --help": ["--help"], "flain defend --help": ["defend", "--help"],
            "flain eval (usage error: no MODEL)": ["eval"],
            "flain defend m --aux a --select x (usage error: bad choice)":
                ["defend", "m", "--aux", "a", "--select", "x"]}
REFERENCE = {"python -c 'import torch' (for comparison)": [sys.executable, "-c", "import torch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    commands = {name: [str(FLAIN), *argv] for name, argv in COMMANDS.items()} | REFERENCE
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every command alike
        for name, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, capture_output=True)
            times[name].append(time.perf_counter() - started)
    print("| command | median s | fastest s |\n|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.3f} | {min(values):.3f} |")


if __name__ == "__main__":
    main()
