"""ruff (pyflakes, pycodestyle, import order; pyproject.toml [tool.ruff]) over the whole repository and
mypy (pyproject.toml [tool.mypy]: flain_cli/, every function annotated) as tests, so the README's one
test command also keeps the code clean and its types consistent."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is in the test extra: pip install -e '.[test]'")
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_finds_nothing():
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    res = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
