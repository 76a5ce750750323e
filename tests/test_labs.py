"""The labs in experiments/ run on the library (no copies of its flip, rescale, repair or scoring), on built-in
models and on --model-def ones, and agree with `flain defend` + `flain eval`."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from flain_cli.checkpoint import ModelSource

from .conftest import invoke
from .test_model_def import DEFS, bright, trained  # noqa: F401 - bright is a fixture

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def lab_module(name: str):
    spec = importlib.util.spec_from_file_location(f"lab_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tune_rules_scores_what_defend_writes_on_the_held_out_test_images(tiny_run, tmp_path):
    tune = lab_module("tune_rules")
    run, data = tiny_run
    rows = tune.compare([run], ["paper rho=0.05", "default repair_steps=5"], [0], [3], data_dir=data)
    assert [r["rule"] for r in rows] == ["paper rho=0.05", "default repair_steps=5"]
    assert all(r["n_test"] == 200 - 30 and r["flipped"] > 0 for r in rows)  # the 30 aux images are left out
    # the same defense through the CLI, scored by `flain eval` on the same held-out images
    aux = tmp_path / "aux"
    assert invoke("aux", "export", "--dataset", "fmnist", "--data-dir", data, "--per-class", "3", "--seed", "0",
                  "--out", aux).exit_code == 0
    from flain_cli.datasets import load_dataset
    from flain_cli.loading import load_aux_for, load_model
    held = load_aux_for(load_model(run / "final.safetensors"), aux)
    test = load_dataset("fmnist", data).test.without(held.images, held.labels)
    import numpy as np
    np.savez(tmp_path / "test.npz", images=test.images[:, 0].numpy(), labels=test.labels.numpy())
    out = tmp_path / "d.safetensors"
    assert invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux,
                  "--preset", "paper", "--rho", "0.05", "--out", out).exit_code == 0
    report = json.loads(invoke("eval", out, "--test", tmp_path / "test.npz", "--json").stdout)
    assert (rows[0]["acc"], rows[0]["asr"]) == (report["acc"], report["asr"])
    assert "| paper rho=0.05 | 1 |" in tune.summary(rows, ["paper rho=0.05"])
    assert tune.parse_rule("paper select=last-safe rescale=false").select == "last-safe"


def test_the_rules_lab_runs_on_a_model_def_model(tmp_path, bright, capsys):  # noqa: F811 - the fixture
    aux_dir, data = bright
    run = trained(tmp_path, "TinyResNet")
    lab_mod = lab_module("rules_lab")
    lab = lab_mod.Lab(run, aux_dir, ModelSource(dataset="fmnist", model_def=f"{DEFS}:TinyResNet"), data_dir=data,
                      attack="0:5")
    assert lab.layer == "fc" and lab.x.shape == (16,) and set(lab.base) == {"aux", "test", "trig"}
    rows = lab_mod.trace(lab, step=0.01)
    assert rows and [r["n"] for r in rows] == sorted(r["n"] for r in rows) and rows[0]["kl"] >= 0
    lab_mod.repair_variants(lab, [0.5], ["base s5", "adam s5 p1", "base s5 f2"])
    lab_mod.orderings(lab)
    printed = capsys.readouterr().out
    assert "base s5:" in printed and "adam s5 p1:" in printed and "== order by q90" in printed
    with pytest.raises(SystemExit, match="no attack is recorded"):
        lab_mod.Lab(run, aux_dir, ModelSource(dataset="fmnist", model_def=f"{DEFS}:TinyResNet"), data_dir=data)


def test_curves_record_what_defend_keeps_and_the_stop_rules_replay_them(tmp_path, bright):  # noqa: F811
    from flain_cli.audit import defend_checkpoint
    from flain_cli.features import FeatureSets
    from flain_cli.loading import load_aux_for
    from flain_cli.settings import DEFAULT, defense_config
    aux_dir, data = bright
    run = trained(tmp_path, "TinyResNet")
    lab_mod, stop_rules = lab_module("rules_lab"), lab_module("stop_rules")
    source = ModelSource(dataset="fmnist", model_def=f"{DEFS}:TinyResNet")
    lab = lab_mod.Lab(run, aux_dir, source, DEFAULT.shifts, data_dir=data, attack="0:5")
    halves = load_aux_for(lab.loaded, aux_dir).split(0.5, seed=0)
    folds = FeatureSets(lab.loaded.model, lab.layer, {"a": halves[0], "b": halves[1]}, lab.loaded.meta)
    curve = lab_mod.curves(lab, folds) | {"run": "tiny"}
    rows = curve["rows"]
    assert all("dacc" in r and 0 <= r["cv_agree"] <= 1 and r["cv_kl"] >= 0 for r in rows)  # 16 inputs: all repaired
    assert curve["shift_kl"] > 0 and curve["entropy"] > 0 and curve["inputs"] == 16
    # a budget between two thresholds' KL: the replayed kl stop keeps what `flain defend --kl` writes
    rising = [r["kl"] for r in rows if r["kl"] > 1e-9]
    budget = (rising[0] + rising[1]) / 2 if len(rising) > 1 else rising[0] / 2
    picked = stop_rules.make_rule(f"kl:{budget}")(curve)
    assert picked == next(i for i, r in enumerate(rows) if r["kl"] >= budget)
    outcome = defend_checkpoint(run / "final.safetensors", run / "init.safetensors", aux_dir,
                                defense_config("default", kl=budget, kl_unit="nats"), source=source)
    assert int(outcome.result.mask.sum()) == rows[picked]["n"]
    defended = lab.sets.scores_of({k: v for k, v in outcome.state.items() if k.startswith("fc.")})
    assert lab.dacc(defended) == pytest.approx(rows[picked]["dacc"], abs=1e-6)
    assert defended["trig"] == pytest.approx(rows[picked]["asr"], abs=1e-6)
    assert lab.sets["aux"].divergence() == pytest.approx(rows[picked]["kl_after"], rel=1e-6)  # the same tensors
    # the two-fold KL stop keeps the threshold before the first whose repaired KL on the other half reaches B
    b = rows[len(rows) // 2]["cv_kl"]
    first = next(i for i, r in enumerate(rows) if r["cv_kl"] >= b)
    assert stop_rules.make_rule(f"cvkl:{b}")(curve) == max(first - 1, 0)
    with pytest.raises(SystemExit, match="unknown rule"):
        stop_rules.make_rule("median:1")


def test_the_generality_table_in_results_md_is_what_its_script_prints_from_the_committed_rows():
    table = lab_module("generality_table")
    data = EXPERIMENTS.parent / "docs" / "data"
    rows = table.load([data / "generality-fmnist.csv", data / "generality-tables-fmnist.csv"])
    lines = table.table(rows, "held-out", table.pick_presets(rows))
    text = (EXPERIMENTS.parent / "docs" / "results.md").read_text()
    assert len(lines) == 2 + 9 + 6 + 4  # header, the held-out cells, six Tables rows, two summaries of two lines
    assert [line for line in lines if line not in text.splitlines()] == []


def test_the_judged_kl_stop_table_in_results_md_is_what_its_script_prints_from_the_committed_rows(capsys):
    """The table that made --kl-unit shift the default (docs/results.md, "The kl stop in the model's own unit"):
    its rows and summaries as the script prints them from docs/data/adaptive-stop-seeds2.csv (the header is
    renamed in the doc)."""
    table = lab_module("generality_table")
    data = str(EXPERIMENTS.parent / "docs" / "data" / "adaptive-stop-seeds2.csv")
    columns = "none,flain preset=paper,flain kl_unit=nats,flain kl_unit=shift,fine-pruning kl_unit=shift"
    assert table.main([data, "--role", "held-out", "--columns", columns]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = (EXPERIMENTS.parent / "docs" / "results.md").read_text()
    assert len(lines) == 2 + 9 + 2 and lines[-2].endswith("| 0.672 | 0.657 | 0.709 | 0.905 |")
    assert [line for line in lines[1:] if line not in text.splitlines()] == []


def test_the_generality_table_prints_the_columns_asked_for_and_refuses_unknown_ones(capsys):
    table = lab_module("generality_table")
    data = str(EXPERIMENTS.parent / "docs" / "data" / "generality-fmnist.csv")
    assert table.main([data, "--columns", "none,flain preset=default"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| cell | no defense: ACC / ASR / RA | **FLAIN default rule** |"
    assert lines[-1].endswith("| 2 of 7 |")
    with pytest.raises(SystemExit, match="no results for column.s. flain kl_unit=shift"):
        table.main([data, "--columns", "none,flain kl_unit=shift"])
