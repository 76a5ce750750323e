"""Whole-process start-up of the `flain` command: --version, help, usage errors, side by side.

    .venv/bin/python benchmarks/startup.py [--repeat 5] [--python OTHER_VENV/bin/python ...]

Each command runs as a fresh process (the console script in .venv/bin); the table gives the
median and the fastest of the repeats, in seconds. ``--python`` adds a column per interpreter (e.g.
a venv with other Typer or Rich releases), which runs the same commands as ``PY -m flain_cli`` with
this checkout on its path, interleaved with the console script's, so that all columns share one run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FLAIN = Path(sys.executable).parent / "flain"
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"flain --version": ["--version"], "flain --help": ["--help"], "flain defend --help": ["defend", "--help"],
            "flain eval (usage error: no MODEL)": ["eval"],
            "flain defend m --aux a --select x (usage error: bad choice)":
                ["defend", "m", "--aux", "a", "--select", "x"]}
REFERENCE = {"python -c 'import torch' (for comparison)": [sys.executable, "-c", "import torch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--python", action="append", default=[], help="another interpreter to compare (repeatable)")
    args = parser.parse_args()
    launchers = {"console script": [str(FLAIN)]} | {py: [py, "-m", "flain_cli"] for py in args.python}
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    runs = [(name, column, [*launcher, *argv]) for name, argv in COMMANDS.items()
            for column, launcher in launchers.items()]
    runs += [(name, "console script", argv) for name, argv in REFERENCE.items()]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every command alike
        for name, column, argv in runs:
            started = time.perf_counter()
            subprocess.run(argv, capture_output=True, env=env)
            times.setdefault((name, column), []).append(time.perf_counter() - started)
    print("| command | " + " | ".join(f"{c}: median s | fastest s" for c in launchers) + " |")
    print("|---|" + "---|---|" * len(launchers))
    for name in [*COMMANDS, *REFERENCE]:
        cells = [f"{statistics.median(v):.3f} | {min(v):.3f}" if (v := times.get((name, c))) else " | "
                 for c in launchers]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
