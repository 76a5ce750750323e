"""`flain experiment`: grid expansion, one training per configuration, caching, failed cells."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flain_cli.checkpoint import load_checkpoint
from flain_cli.cli.app import app
from flain_cli.errors import ConfigError
from flain_cli.experiment import Cell, load_experiment, write_results
from flain_cli.settings import PRESETS, AccuracyStop, KlStop

runner = CliRunner()

TINY = """
name = "tiny"
[train]
arch = "cnn-mnist"
clients = 2
mcr = 0.5
pdr = 0.5
rounds = 1
batch-size = 64
seed = 1
[grid]
attack = ["0:5"]
[defense]
methods = ["none", "flain", "rlr"]
aux_per_class = {per_class}
rho = 0.05
"""


def write(tmp_path, text, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_expansion_and_validation(tmp_path):
    exp = load_experiment(write(tmp_path, """
[train]
dataset = "fmnist"
[grid]
attack = ["0:5", "0:6"]
mcr = [0.4, 0.6]
[defense]
methods = ["none", "flain"]
"""))
    assert exp.name == "grid" and len(exp.points()) == 4
    assert exp.config({"attack": "0:6", "mcr": 0.6}).mcr == 0.6
    assert exp.config({"attack": "0:6", "mcr": 0.6}, "rlr").aggregator == "rlr"
    assert exp.config({"attack": "0:6", "mcr": 0.6}).arch == "cnn-fmnist"
    for bad, message in [("[train]\nclientz = 3", "unknown option"), ("[grid]\nattack = \"0:5\"", "non-empty list"),
                         ("[grid]\nattack = [\"0:11\"]", "names class 11"),
                         ("[defense]\nmethods = [\"krum\"]", "unknown"),
                         ("[train]\naggregator = \"rlr\"", "through \\[defense\\]"), ("[train\n", "not valid TOML")]:
        with pytest.raises(ConfigError, match=message):
            load_experiment(write(tmp_path, bad, "bad.toml"))


def run(*args):
    return runner.invoke(app, ["experiment", *[str(a) for a in args]])


def test_runs_once_then_resumes_from_cache(tmp_path, fmnist_dir):
    config, out = write(tmp_path, TINY.format(per_class=3)), tmp_path / "out"
    first = run(config, "--out", out, "--data-dir", fmnist_dir, "--json")
    assert first.exit_code == 0, first.output
    rows = json.loads(first.stdout)["rows"]
    assert [(r["defense"], r["status"]) for r in rows] == [("none", "done"), ("flain", "done"), ("rlr", "done")]
    assert all(0 <= r["acc"] <= 1 and 0 <= r["asr"] <= 1 for r in rows)
    assert len(list(out.glob("train-*/train.json"))) == 2  # fedavg once (none + flain share it), rlr once
    assert rows[1]["flipped"] > 0 and rows[0]["checkpoint"].endswith("final.safetensors")
    # a second run computes nothing
    second = json.loads(run(config, "--out", out, "--data-dir", fmnist_dir, "--json").stdout)["rows"]
    assert [r["status"] for r in second] == ["cached"] * 3
    assert [r["acc"] for r in second] == [r["acc"] for r in rows]
    # an interrupted defense (its record missing) is redone, the training is not
    (flain_record,) = [p for p in out.glob("train-*/flain-*.json") if not p.name.endswith(".eval.json")]
    flain_record.unlink()
    third = json.loads(run(config, "--out", out, "--data-dir", fmnist_dir, "--json").stdout)["rows"]
    assert [r["status"] for r in third] == ["cached", "done", "cached"]
    # another aux set is another defense: it is computed, not taken from the cache
    other = write(tmp_path, TINY.format(per_class=2), "other.toml")
    fourth = json.loads(run(other, "--out", out, "--data-dir", fmnist_dir, "--json").stdout)["rows"]
    assert [r["status"] for r in fourth] == ["cached", "done", "cached"]
    md = (out / "results.md").read_text()
    assert "| attack | defense | ASR | ACC | ASR without trigger |" in md and "| 0:5 | flain |" in md
    assert (out / "results.csv").read_text().startswith("attack,defense,acc,asr,status")


def test_a_failed_cell_is_reported_and_the_grid_goes_on(tmp_path, fmnist_dir):
    config = write(tmp_path, TINY.format(per_class=500))  # more aux images than the test split has
    res = run(config, "--out", tmp_path / "out", "--data-dir", fmnist_dir)
    assert res.exit_code == 1
    assert "Error: 1 of 3 cells failed" in res.stderr and "ask for at most that many" in res.stderr
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["done", "failed", "done"]


def test_dry_run_plans_without_running(tmp_path):
    res = run(write(tmp_path, TINY.format(per_class=3)), "--out", tmp_path / "out", "--dry-run", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout) | {"points": None} == {"name": "tiny", "out": str(tmp_path / "out"),
                                                          "cache": str(tmp_path / "out"), "cells": 3,
                                                          "trainings": 2, "cached_trainings": 0, "points": None,
                                                          "defenses": ["none", "flain", "rlr"]}
    assert not (tmp_path / "out").exists()


def test_shipped_experiment_configs_are_valid():
    from pathlib import Path
    configs = sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.toml"))
    assert {c.stem for c in configs} >= {"table1-fmnist", "table2-fmnist", "table5-fmnist", "figure3-fmnist",
                                         "figure6-fmnist"}
    for config in configs:
        assert load_experiment(config).points()


def test_an_interrupted_training_resumes_from_its_last_round(tmp_path, fmnist_dir):
    from flain_cli.experiment import ExperimentListener, run_experiment

    config = write(tmp_path, TINY.format(per_class=3).replace("rounds = 1", "rounds = 2")
                   .replace('"none", "flain", "rlr"', '"none"'))
    whole = run(config, "--out", tmp_path / "whole", "--data-dir", fmnist_dir, "--json")
    assert whole.exit_code == 0, whole.output

    class Interrupt(ExperimentListener):
        resumed_after = None

        def resumed(self, history):
            self.resumed_after = len(history)

        def round_end(self, log):
            if log.round == 1 and self.resumed_after is None:
                raise KeyboardInterrupt

    exp, listener = load_experiment(config, tmp_path / "out"), Interrupt()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, data_dir=fmnist_dir, listener=listener)
    (run_dir,) = (tmp_path / "out").glob("train-*")
    assert (run_dir / "resume.safetensors").is_file() and not (run_dir / "final.safetensors").exists()
    (cell,) = run_experiment(exp, data_dir=fmnist_dir, listener=listener)
    assert listener.resumed_after == 1 and cell.status == "done"
    assert cell.acc == json.loads(whole.stdout)["rows"][0]["acc"]
    assert not (run_dir / "resume.safetensors").exists()
    resumed = json.loads((run_dir / "train.json").read_text())
    (uninterrupted,) = (tmp_path / "whole").glob("train-*/train.json")
    assert resumed["resumed_from_round"] == 1
    assert resumed["final_sha256"] == json.loads(uninterrupted.read_text())["final_sha256"]


def test_defense_settings_may_vary_on_one_training(tmp_path, fmnist_dir):
    config = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
                   .replace("rho = 0.05", "rho = [0.05, 0.0]"))
    exp = load_experiment(config)
    assert [d.label for d in exp.defenses] == ["none", "flain rho=0.05", "flain rho=0"]
    res = run(config, "--out", tmp_path / "out", "--data-dir", fmnist_dir, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [(r["defense"], r["method"], r.get("rho")) for r in rows] == [
        ("none", "none", None), ("flain rho=0.05", "flain", 0.05), ("flain rho=0", "flain", 0.0)]
    assert len(list((tmp_path / "out").glob("train-*/train.json"))) == 1
    assert len(list((tmp_path / "out").glob("train-*/flain-*rho0.05*.safetensors"))) == 1
    assert len(list((tmp_path / "out").glob("train-*/flain-*rho0-*.safetensors"))) == 1
    assert rows[2]["flipped"] <= rows[1]["flipped"]  # a smaller allowed drop never flips more
    for bad in ("rho = []", "rho = [0.1, 0.1]"):
        with pytest.raises(ConfigError, match="distinct values"):
            load_experiment(write(tmp_path, TINY.format(per_class=3).replace("rho = 0.05", bad), "bad.toml"))


def test_a_worker_behind_does_not_overwrite_finished_results(tmp_path):
    """Workers on one grid each rewrite its results; a late one keeps what a faster one finished."""
    grid = TINY.format(per_class=3).replace('attack = ["0:5"]', 'attack = ["0:5", "0:6"]')
    exp = load_experiment(write(tmp_path, grid), out=tmp_path / "out")
    cells = [Cell({"attack": a}, d.label, "done", 0.9, 0.01 * i, {"flipped": i})
             for i, (a, d) in enumerate((a, d) for a in ("0:5", "0:6") for d in exp.defenses)]
    write_results(exp, cells)
    behind = [Cell({"attack": "0:5"}, exp.defenses[0].label, "busy", error="its training is under way")]
    write_results(exp, behind)
    rows = json.loads((exp.out / "results.json").read_text())["rows"]
    assert [(r["attack"], r["defense"], r["asr"], r["flipped"]) for r in rows] == [
        (c.point["attack"], c.defense, c.asr, c.detail["flipped"]) for c in cells]
    assert "busy" not in (exp.out / "results.md").read_text()
    # results written for another definition of the grid are not merged
    other = load_experiment(write(tmp_path, grid.replace("rho = 0.05", "rho = 0.04")), out=tmp_path / "out")
    write_results(other, [Cell({"attack": "0:5"}, other.defenses[0].label, "busy")])
    assert [r["status"] for r in json.loads((exp.out / "results.json").read_text())["rows"]] == ["busy"]


def test_named_settings_may_vary_too(tmp_path):
    """stop and repair are names, not numbers: a grid listing them labels its columns by them; a repair setting
    under repair none is not read, so it makes no column of its own."""
    config = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
                   .replace("rho = 0.05", 'rho = 0.05\nstop = ["accuracy", "kl"]\n'
                                          'repair = ["none", "distill"]\nrepair_optimizer = ["adam", "sgd"]'))
    defenses = load_experiment(config).defenses
    assert [d.label for d in defenses] == [
        "none", "flain stop=accuracy repair=none", "flain stop=accuracy repair=distill repair_optimizer=adam",
        "flain stop=accuracy repair=distill repair_optimizer=sgd", "flain stop=kl repair=none",
        "flain stop=kl repair=distill repair_optimizer=adam", "flain stop=kl repair=distill repair_optimizer=sgd"]
    sgd = defenses[-1]
    assert sgd.settings.config("flain").rule == "flain+shifts+klshift+distill+sgd"
    assert sgd.settings.config("flain").repair.lr == 0.1
    assert sgd.settings.tag("flain") != defenses[-2].settings.tag("flain")  # cached apart
    patched = load_experiment(write(tmp_path, TINY.format(per_class=3).replace(
        "rho = 0.05", 'rho = 0.05\nrepair_optimizer = "adam"\nrepair_patches = 2'))).defenses[1].settings
    assert patched.config("flain").rule == "flain+shifts+distill+patches"
    assert patched.config("flain").repair.patches == 2
    assert patched.tag("flain").endswith("-shifts2-repair-adam-p2-bt3-aux3x-seed0")
    with pytest.raises(ConfigError, match="repair must be one of distill, none, got 'distill-sgd'; the optimizer is "
                                          "repair_optimizer"):
        load_experiment(write(tmp_path, TINY.format(per_class=3).replace("rho = 0.05", 'repair = "distill-sgd"')))


def test_a_budget_the_stop_does_not_read_makes_no_column(tmp_path):
    """rho under the kl stop (kl under the accuracy stop) changes nothing: not in the label, one column."""
    config = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
                   .replace("rho = 0.05", 'rho = [0.05, 0.0]\nstop = ["accuracy", "kl"]'))
    defenses = load_experiment(config).defenses
    assert [d.label for d in defenses] == [
        "none", "flain rho=0.05 stop=accuracy", "flain stop=kl", "flain rho=0 stop=accuracy"]
    assert len({d.settings.tag(d.method) for d in defenses[1:]}) == 3


def test_listed_shifts_make_one_column_each_with_its_own_checkpoint(tmp_path):
    config = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
                   .replace("rho = 0.05", "rho = 0.05\nshifts = [0, 2]"))
    defenses = load_experiment(config).defenses
    assert [d.label for d in defenses] == ["none", "flain shifts=0", "flain shifts=2"]
    assert [d.settings.config("flain").shifts for d in defenses[1:]] == [0, 2]
    tags = [d.settings.tag("flain") for d in defenses[1:]]
    assert "shifts" not in tags[0] and tags[1] == tags[0].replace("-repair", "-shifts2-repair")


def test_a_budget_names_its_stop_as_in_defend(tmp_path):
    """No stop and no budget: flain defend's kl stop; rho alone: the accuracy stop; both: refused."""
    base = TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
    stops = {name: [d.settings.config(d.method).stop for d in load_experiment(write(tmp_path, text, f"{name}.toml"))
                    .defenses if d.method == "flain"]
             for name, text in (("rho", base), ("none", base.replace("rho = 0.05\n", "")),
                                ("kl", base.replace("rho = 0.05", 'kl = 0.1\nkl_unit = "nats"')))}
    assert stops == {"rho": [AccuracyStop(0.05)], "none": [KlStop(1.5, "shift")], "kl": [KlStop(0.1)]}
    with pytest.raises(ConfigError, match=r"^\[defense\] kl needs its unit"):  # 0.1 nats or 0.1 x the shift KL?
        load_experiment(write(tmp_path, base.replace("rho = 0.05", "kl = 0.1"), "unitless.toml"))
    units = load_experiment(write(tmp_path, base.replace("rho = 0.05", 'kl_unit = ["nats", "shift"]'), "units.toml"))
    flain = [d for d in units.defenses if d.method == "flain"]
    assert [d.settings.config("flain").stop for d in flain] == [KlStop(), KlStop(1.5, "shift")]  # each unit's budget
    assert "-kl0.07-" in flain[0].settings.tag("flain") and "-kl1.5xshift-" in flain[1].settings.tag("flain")
    accuracy = base.replace("rho = 0.05", 'stop = "accuracy"\nkl_unit = "shift"')  # not read: left out
    assert [d.settings.config(d.method).stop for d in load_experiment(write(tmp_path, accuracy, "acc.toml")).defenses
            if d.method == "flain"] == [AccuracyStop()]
    with pytest.raises(ConfigError, match=r"^\[defense\] rho and kl are the budgets of two different stops"):
        load_experiment(write(tmp_path, base.replace("rho = 0.05", "rho = 0.05\nkl = 0.1"), "both.toml"))


def test_experiments_sharing_a_cache_train_once(tmp_path, fmnist_dir):
    """A second grid over the same trainings (here: other aux sizes) only runs its defenses."""
    cache = tmp_path / "trainings"
    first = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none"'), "first.toml")
    res = run(first, "--out", tmp_path / "first", "--cache", cache, "--data-dir", fmnist_dir, "--json")
    assert res.exit_code == 0, res.output
    (record,) = cache.glob("train-*/train.json")
    trained = record.read_text()
    second = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
                   .replace("aux_per_class = 3", "aux_per_class = [3, 5]")
                   .replace('name = "tiny"', f'name = "second"\ncache = "{cache}"'), "second.toml")
    plan = json.loads(run(second, "--dry-run", "--json").stdout)
    assert (plan["trainings"], plan["cached_trainings"], plan["cache"]) == (1, 1, str(cache))
    res = run(second, "--out", tmp_path / "second", "--data-dir", fmnist_dir, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [(r["defense"], r["status"]) for r in rows] == [
        ("none", "cached"), ("flain aux_per_class=3", "done"), ("flain aux_per_class=5", "done")]
    assert [r["aux_per_class"] for r in rows[1:]] == [3, 5]
    assert [p.read_text() for p in cache.glob("train-*/train.json")] == [trained]  # not trained again
    assert sorted(p.name for p in cache.glob("aux-*")) == ["aux-fmnist-3x-seed0", "aux-fmnist-5x-seed0"]
    assert (tmp_path / "second" / "results.json").is_file() and not list((tmp_path / "second").glob("train-*"))


def test_the_rules_grids_hold_the_paper_preset_and_todays_default():
    """docs/results.md reads the seeds-rules grids' columns as `--preset paper` and `flain defend`'s default:
    the settings behind those columns are those presets, field for field."""
    from pathlib import Path

    from flain_cli.settings import PRESETS
    for table in (1, 2):
        config = Path(__file__).resolve().parent.parent / "experiments" / f"table{table}-fmnist-seeds-rules.toml"
        flain = [d for d in load_experiment(config).defenses if d.method == "flain"]
        columns = {d.label: d.settings.config(d.method) for d in flain}
        assert len(columns) == 12
        assert columns["flain stop=accuracy shifts=0 repair=none"] == PRESETS["paper"]
        assert columns["flain stop=kl shifts=2 repair=distill repair_optimizer=sgd"] == PRESETS["default"]


def test_a_grid_without_a_rule_is_flain_defend_with_no_options_and_its_cell_is_defend_plus_eval(tmp_path, fmnist_dir):
    """A [defense] table that names no rule defends with `flain defend`'s default: the grid's checkpoint holds bit
    for bit the tensors of `flain defend MODEL --init INIT --aux AUX` on the same training and aux set, and the
    cell's ACC and ASR are what `flain eval` says of that file."""
    grid = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"flain"')
                 .replace("rho = 0.05\n", "repair_steps = 5\n"))  # the one setting: a short repair, for speed
    plain = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"flain"')
                  .replace("rho = 0.05\n", ""), "plain.toml")
    assert load_experiment(plain).defenses[0].settings.config("flain") == PRESETS["default"]
    res = run(grid, "--out", tmp_path / "out", "--data-dir", fmnist_dir, "--json")
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["rows"]
    (train,) = (tmp_path / "out").glob("train-*")
    (aux,) = (tmp_path / "out").glob("aux-*")
    direct = tmp_path / "direct.safetensors"
    defended = runner.invoke(app, ["defend", str(train / "final.safetensors"), "--init",
                                   str(train / "init.safetensors"), "--aux", str(aux), "--repair-steps", "5",
                                   "--out", str(direct)])
    assert defended.exit_code == 0, defended.output
    ours, theirs = load_checkpoint(row["checkpoint"]).tensors, load_checkpoint(direct).tensors
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    evaluated = json.loads(runner.invoke(app, ["eval", str(direct), "--data-dir", str(fmnist_dir), "--json"]).stdout)
    assert (row["acc"], row["asr"], row["asr_clean"]) == (evaluated["acc"], evaluated["asr"], evaluated["asr_clean"])
    assert row["rule"] == "flain+shifts+klshift+distill+sgd" and row["repair"] == "sgd-s5-bt3" and row["flipped"] > 0


def test_listed_cells_carry_their_role_into_the_results(tmp_path, fmnist_dir):
    text = TINY.format(per_class=3).replace('[grid]\nattack = ["0:5"]\n', "").replace(
        '"none", "flain", "rlr"', '"none"') + (
        '[[cells]]\nrole = "tuning"\ntrigger = "cba"\n[[cells]]\nrole = "held-out"\ntrigger = "sig"\n')
    exp = load_experiment(write(tmp_path, text))
    assert exp.points() == [{"role": "tuning", "trigger": "cba"}, {"role": "held-out", "trigger": "sig"}]
    assert exp.config(exp.points()[1]).trigger == "sig"  # the role names the cell; it trains nothing
    res = run(write(tmp_path, text), "--out", tmp_path / "out", "--data-dir", fmnist_dir, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [(r["role"], r["trigger"]) for r in rows] == [("tuning", "cba"), ("held-out", "sig")]
    assert all(r["ra"] is not None and r["asr_all"] is not None for r in rows)
    for bad, message in (('[[cells]]\nrole = "test"\n', "has role 'test'; give one of tuning, held-out"),
                         ('[grid]\nseed = [1]\n[[cells]]\nseed = 2\n', "as a \\[grid\\] or as \\[\\[cells\\]\\]"),
                         ('[[cells]]\nseed = 2\n[[cells]]\nseed = 2\n', "two cells are the same"),
                         ('[[cells]]\nrounds = "x"\n', "rounds must be a whole number")):
        with pytest.raises(ConfigError, match=message):
            load_experiment(write(tmp_path, bad, "bad.toml"))
    assert load_experiment(Path(__file__).resolve().parent.parent / "experiments" / "generality-fmnist.toml").cells
