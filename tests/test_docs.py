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
                   "docs/benchmarks.md", "docs/contract.md", "docs/architecture.md"):
        assert target in readme and (ROOT / target).is_file(), target


def test_every_docs_link_resolves():
    """Every relative markdown link in README.md and docs/ (the lab notebook included) names a file that exists."""
    import re
    pages = [ROOT / "README.md", ROOT / "sample_models" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len([p for p in pages if "lab" in p.parts]) >= 4
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            checked += 1
    assert checked > 20


def test_results_is_a_short_page_and_every_table_has_its_command():
    """docs/results.md stays a page a user reads (the history is in docs/lab/), each section with a command."""
    text = (ROOT / "docs" / "results.md").read_text()
    assert len(text.splitlines()) <= 400
    for section in text.split("\n## ")[1:]:
        if "|---" in section and not section.startswith(("In short", "The lab notebook")):
            assert "flain " in section or "experiments/" in section, section.splitlines()[0]


def test_sample_models_are_real_small_and_described():
    from flain_cli.checkpoint import load_checkpoint
    samples = ROOT / "sample_models"
    size = sum(p.stat().st_size for p in samples.rglob("*") if p.is_file())
    assert size < 25 * 2**20, f"sample_models/ is {size / 2**20:.1f} MB"
    folders = [p for p in samples.iterdir() if (p / "final.safetensors").is_file()]
    assert {p.name for p in folders} >= {"fmnist-cba-iid", "fmnist-dba-noniid"}
    readme = (samples / "README.md").read_text()
    for folder in folders:
        final, init = load_checkpoint(folder / "final.safetensors"), load_checkpoint(folder / "init.safetensors")
        assert final.meta["role"] == "final" and final.meta["parents"]["init"] == init.sha256
        assert final.meta["dataset"] == "fmnist" and final.meta["train_config"]["train_samples"] is None
        assert (folder / "aux" / "aux.json").is_file() and folder.name in readme
    assert (samples / "fmnist-test-2000.npz").is_file()


def sample_rows() -> list[str]:
    """The sample models' table rows, rendered from sample_models/figures.json (the one source)."""
    import json
    figures = json.loads((ROOT / "sample_models" / "figures.json").read_text())
    rows = []
    for name, label in (("fmnist-cba-iid", "CBA (0, 5), IID"), ("fmnist-dba-noniid", "DBA (0, 5), Dirichlet 0.5")):
        f = figures[name]
        none = f["none"]

        def cell(r: dict) -> str:
            return f"{r['acc']:.4f} ({100 * (r['acc'] - none['acc']):+.2f}) / {r['asr']:.3f}"
        rows.append(f"| `{name}` | {label} | {none['acc']:.4f} / {none['asr']:.3f} | {cell(f['paper'])} | "
                    f"{cell(f['default'])} |")
    return rows


def test_the_sample_model_figures_come_from_one_source():
    """README.md and sample_models/README.md show the figures of sample_models/figures.json, which the e2e test
    measures again; a figure edited in one place only fails here."""
    rows = sample_rows()
    for doc in (ROOT / "README.md", ROOT / "sample_models" / "README.md", ROOT / "docs" / "results.md"):
        text = doc.read_text()
        for row in rows:
            assert row in text, f"{doc.name} does not show {row}"


def test_help_leads_with_the_essentials_and_carries_no_dates():
    """`flain defend --help` at 100 columns: the essentials panel right after the arguments, at most ~half of
    its former 225 lines; no command's help holds a date (history belongs in the docs)."""
    import re

    from typer.main import get_command
    from typer.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(app, ["defend", "--help"], env={"COLUMNS": "100", "TERMINAL_WIDTH": "100"})
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert len(lines) <= 115, len(lines)
    panels = [line for line in lines if line.startswith("╭─")]
    assert panels[0].startswith("╭─ Arguments") and panels[1].startswith("╭─ Options")
    first = res.stdout.split("╭─ Options")[1].split("╰")[0]
    assert all(opt in first for opt in ("--aux", "--init", "--out", "--preset", "--method"))
    assert "--repair-lr" not in first and "--seed" not in first

    def commands(group, path=()):
        for name, cmd in getattr(group, "commands", {}).items():
            yield (*path, name), cmd
            yield from commands(cmd, (*path, name))

    for path, cmd in commands(get_command(app)):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            assert not re.search(r"20[0-9][0-9]-[01][0-9]", text), f"flain {' '.join(path)}: {text}"
