"""The docs keep up with the code."""

from pathlib import Path

import typer

from flain_cli.cli.app import app
from flain_cli.cli.reference import _walk, render

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render(), \
        "docs/cli.md is stale: run `.venv/bin/python -m flain_cli.cli.reference > docs/cli.md`"


def test_every_command_and_option_is_documented_with_help():
    text = (ROOT / "docs" / "cli.md").read_text()
    for path, command in _walk(typer.main.get_command(app), "flain"):
        assert f"## `{path}`" in text
        assert command.help, f"{path} has no help text"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{path} {param.opts} has no help text"
                assert f"`{', '.join(param.opts)}`" in text


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for target in ("docs/simulation.md", "docs/flain.md", "docs/checkpoint-format.md", "docs/results.md",
                   "docs/benchmarks.md"):
        assert target in readme and (ROOT / target).is_file(), target
