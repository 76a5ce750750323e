import builtins
import json

import pytest

from .conftest import invoke

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"



@pytest.fixture
def files(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"round": r, "acc": 0.5 + r / 20, "asr": r / 10, "seconds": 1.0}) + "\n"
                           for r in range(1, 6)))
    trace = tmp_path / "trace.csv"
    trace.write_text("lambda,selected,aux_acc,drop\n0.001,3,0.9,0.0\n0.002,9,0.88,0.02\n0.004,20,0.86,0.04\n")
    means = tmp_path / "means.csv"
    means.write_text("neuron,mean\n" + "".join(f"{i},{i / 100}\n" for i in range(50)))
    sweep = tmp_path / "sweep.csv"  # as `flain sweep --csv` writes it: the unchanged model has no lambda
    sweep.write_text("lambda,changed,aux_acc,acc,asr,asr_clean\n,0,0.92,0.9,0.99,0.1\n"
                     "0,10,0.92,0.9,0.6,0.1\n0.001,30,0.9,0.88,0.2,0.11\n0.002,50,0.85,0.8,0.15,0.12\n")
    return log, trace, means, sweep


def test_each_plot_writes_a_png(files, tmp_path):
    log, trace, means, sweep = files
    for kind, src in (("training", log), ("trace", trace), ("activations", means), ("sweep", sweep)):
        out = tmp_path / f"{kind}.png"
        res = invoke("plot", kind, src, "--out", out)
        assert res.exit_code == 0, res.output
        assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


def test_bad_plot_inputs(files, tmp_path):
    log, trace, means, sweep = files
    res = invoke("plot", "sweep", trace, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a CSV with columns changed, aux_acc, acc, lambda, asr" in res.stderr
    sweep.write_text(sweep.read_text().replace("0.001,30,0.9,", "0.001,30,,"))  # a required cell left empty
    res = invoke("plot", "sweep", sweep, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "could not convert string to float" in res.stderr
    res = invoke("plot", "trace", means, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a CSV with columns lambda, selected, aux_acc" in res.stderr
    res = invoke("plot", "training", log, "--out", tmp_path / "x.jpg")
    assert res.exit_code == 1 and "must end in .png" in res.stderr
    res = invoke("plot", "training", trace, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a `flain train --log` file" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_training_plot_draws_several_trainings_from_logs_train_json_and_folders(files, tmp_path):
    log = files[0]
    run = tmp_path / "train-abc"  # as the experiment cache leaves it
    run.mkdir()
    history = [{"round": r, "acc": 0.4 + r / 20, "asr": r / 20, "seconds": 2.0} for r in range(1, 6)]
    (run / "train.json").write_text(json.dumps({"config": {"aggregator": "rlr"}, "history": history}))
    res = invoke("plot", "training", log, run, run / "train.json", "--label", "fedavg", "--label", "rlr",
                 "--label", "rlr again", "--out", tmp_path / "three.png", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"out": str(tmp_path / "three.png")}
    one = tmp_path / "one.png"
    assert invoke("plot", "training", run, "--out", one).exit_code == 0
    assert (tmp_path / "three.png").read_bytes()[:8] == PNG and one.read_bytes()[:8] == PNG
    assert (tmp_path / "three.png").read_bytes() != one.read_bytes()

    res = invoke("plot", "training", log, run, "--label", "only one", "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "1 --label for 2 trainings" in res.stderr
    (run / "train.json").write_text(json.dumps({"config": {}, "history": [{"acc": 0.5}]}))  # no round numbers
    res = invoke("plot", "training", run, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a `flain train --log` file (JSON lines) or a train.json" in res.stderr
    (run / "train.json").write_text(json.dumps({"config": {}, "history": []}))  # interrupted before round 1
    res = invoke("plot", "training", run, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "holds no evaluated rounds" in res.stderr
    res = invoke("plot", "training", tmp_path / "empty-folder", "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "does not exist" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_a_clear_error(files, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = invoke("plot", "training", files[0], "--out", tmp_path / "t.png")
    assert res.exit_code == 1
    assert res.stderr.strip() == "Error: plotting needs matplotlib: pip install 'flain-cli[plot]'"


def test_each_csv_writer_round_trips_through_its_reader(tmp_path):
    from flain_cli.defense import SearchStep
    from flain_cli.tables import (
        MEANS_COLUMNS,
        SWEEP_COLUMNS,
        TRACE_COLUMNS,
        TRACE_OPTIONAL,
        means_csv,
        read_csv,
        sweep_csv,
        trace_csv,
    )
    (tmp_path / "t.csv").write_text(trace_csv([SearchStep(0.5, 3, 0.8), SearchStep(0.75, 5, 0.7, 0.0625)], acc0=0.9))
    assert read_csv(tmp_path / "t.csv", TRACE_COLUMNS, TRACE_OPTIONAL) == {
        "lambda": [0.5, 0.75], "selected": [3.0, 5.0], "aux_acc": [0.8, 0.7],
        "drop": [pytest.approx(0.1), pytest.approx(0.2)], "kl": [None, 0.0625]}
    (tmp_path / "m.csv").write_text(means_csv([0.0, 0.25]))
    assert read_csv(tmp_path / "m.csv", MEANS_COLUMNS) == {"neuron": [0.0, 1.0], "mean": [0.0, 0.25]}
    rows = [dict.fromkeys(SWEEP_COLUMNS, 1.0) | {"lambda": None, "asr": None}]
    (tmp_path / "s.csv").write_text(sweep_csv(rows))
    back = read_csv(tmp_path / "s.csv", ("changed", "aux_acc", "acc"), ("lambda", "asr", "asr_clean"))
    assert back["lambda"] == [None] and back["asr"] == [None] and back["acc"] == [1.0]


def grid_rows():
    """results rows as `flain experiment` writes them: seeds x tasks x defenses, one cell still busy."""
    rows = []
    for seed in (1, 2, 3):
        for attack in ("0:5", "0:6"):
            for defense, acc, asr in (("none", 0.90, 0.99), ("flain", 0.80 + seed / 100, 0.01 * seed)):
                status = "busy" if (seed, attack, defense) == (3, "0:6", "flain") else "cached"
                done = status != "busy"
                rows.append({"seed": seed, "attack": attack, "defense": defense, "acc": acc if done else None,
                             "asr": asr if done else None, "status": status, "error": None, "flipped": 7})
    return rows


def test_results_round_trip_and_grid_curves(tmp_path):
    from flain_cli.errors import ConfigError
    from flain_cli.plots import grid_curves
    from flain_cli.tables import read_results, results_csv
    (tmp_path / "results.csv").write_text(results_csv(grid_rows()))
    (tmp_path / "results.json").write_text(json.dumps({"name": "g", "rows": grid_rows()}))
    from_csv, from_json = read_results(tmp_path / "results.csv"), read_results(tmp_path / "results.json")
    assert from_csv == from_json and from_csv.keys == ("seed", "attack") and len(from_csv.rows) == 12
    assert from_csv.rows[0].point == {"seed": "1", "attack": "0:5"} and len(from_csv.finished()) == 11

    x, over, curves = grid_curves(from_csv)  # seed is folded by default, attack is the axis
    assert (x, over) == ("attack", "seed") and [c.defense for c in curves] == ["none", "flain"]
    flain = curves[1]
    assert flain.x == ("0:5", "0:6") and flain.n == (3, 2)  # the busy cell is left out
    assert flain.acc[0] == pytest.approx((0.82, 0.81, 0.83)) and flain.acc[1] == pytest.approx((0.815, 0.81, 0.82))
    assert flain.asr[1] == pytest.approx((0.015, 0.01, 0.02)) and curves[0].asr[0] == pytest.approx((0.99,) * 3)

    x, over, curves = grid_curves(from_csv, x="seed", over="attack", defenses=["flain"])
    assert [c.x for c in curves] == [("1", "2", "3")] and curves[0].n == (2, 2, 1)
    x, over, curves = grid_curves(from_csv, x="seed", defenses=["flain"])  # over given as x: attack is a panel row
    assert over is None and [c.facet for c in curves] == [(("attack", "0:5"),), (("attack", "0:6"),)]
    for kwargs, message in (({"x": "pdr"}, "x pdr is not a key of this grid; its keys: seed, attack"),
                            ({"x": "seed", "over": "seed"}, "over seed cannot be both the x axis and folded"),
                            ({"defenses": ["rlr"]}, "defense 'rlr' is not a column of these results")):
        with pytest.raises(ConfigError, match=message):
            grid_curves(from_csv, **kwargs)


def test_grid_plot_cli(tmp_path):
    from flain_cli.tables import results_csv
    results = tmp_path / "results.csv"
    results.write_text(results_csv(grid_rows()))
    out = tmp_path / "grid.png"
    res = invoke("plot", "grid", results, "--defense", "flain", "--out", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000
    res = invoke("plot", "grid", results, "--x", "pdr", "--out", tmp_path / "x.png")
    assert res.exit_code == 1
    assert res.stderr.strip() == "Error: --x pdr is not a key of this grid; its keys: seed, attack"
    results.write_text("lambda,selected\n0.1,3\n")
    res = invoke("plot", "grid", results, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "is not a `flain experiment` results file" in res.stderr
    busy = [r | {"status": "busy", "acc": None, "asr": None} for r in grid_rows()]
    results.write_text(results_csv(busy))
    res = invoke("plot", "grid", results, "--out", tmp_path / "x.png")
    assert res.exit_code == 1 and "hold no finished cell yet" in res.stderr and not (tmp_path / "x.png").exists()
