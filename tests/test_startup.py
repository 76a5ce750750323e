"""Help and usage errors are answered without importing torch (seconds) or pydantic (a tenth of a
second, which typer 0.29 imports to coerce values; pyproject.toml keeps typer below it), and the
catalog's names are exactly what the implementing modules register."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flain_cli import catalog

# argv -> the exit code Typer gives (0: help, 2: usage error)
CASES = [
    (["--help"], 0),
    (["defend", "--help"], 0),
    (["train", "--help"], 0),
    (["experiment", "--help"], 0),
    (["aux", "export", "--help"], 0),
    (["plot", "trace", "--help"], 0),
    (["eval"], 2),  # no MODEL
    (["defend", "m.safetensors", "--aux", "a", "--select", "nearest"], 2),  # not a choice
    (["defend", "m.safetensors", "--aux", "a", "--rho", "abc"], 2),  # not a number
    (["scan", "m.safetensors", "--aux", "a", "--lowest", "0"], 2),  # below the minimum
    (["train", "--no-such-option"], 2),
]

PROBE = """
import sys
sys.argv = ["flain", *sys.argv[1:]]
from flain_cli.cli.app import app
try:
    app()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write(f"\\nexit={code} torch={'torch' in sys.modules} pydantic={'pydantic' in sys.modules}\\n")
"""


@pytest.mark.parametrize(("argv", "code"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_help_and_usage_errors_do_not_import_torch_or_pydantic(argv, code):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert done.stderr.rstrip().endswith(f"exit={code} torch=False pydantic=False"), done.stderr[-2000:]


def test_a_command_that_runs_does_import_torch():
    """The probe can fail: a command that does work reaches the library (here: a missing file)."""
    done = subprocess.run([sys.executable, "-c", PROBE, "inspect", "no-such-file.safetensors"], capture_output=True,
                          text=True, timeout=120)
    assert "Error:" in done.stderr
    assert "exit=1 torch=True" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("registry", [catalog.DATASETS, catalog.ARCHITECTURES, catalog.TRIGGERS, catalog.SPLITS,
                                      catalog.AGGREGATORS, catalog.METHODS], ids=lambda r: r.kind)
def test_every_declared_name_is_registered(registry):
    for name in registry.names():
        assert registry.get(name) is not None
    assert sorted(registry._entries) == sorted(registry.names())


def test_an_undeclared_name_cannot_be_registered():
    with pytest.raises(ValueError, match="not declared"):
        catalog.TRIGGERS.register("square")
