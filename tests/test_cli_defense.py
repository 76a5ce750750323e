"""CLI contract of scan, defend and aux export."""

import csv
import json

import pytest
import torch

from flain_cli.checkpoint import load_checkpoint
from flain_cli.records import DefenseRecord

from .conftest import invoke


def test_defend_json_contract_trace_and_checkpoint(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    out, trace = tmp_path / "clean.safetensors", tmp_path / "trace.csv"
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--rho", "0.05", "--out", out, "--trace", trace, "--json")  # --rho alone: the accuracy stop
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"method", "lambda", "flipped", "of", "aux_acc_before", "aux_acc_after", "steps", "out"} <= set(report)
    assert report["method"] == "flain" and report["of"] == 3136 and report["out"] == str(out)
    ckpt = load_checkpoint(out)
    assert ckpt.meta["role"] == "defended" and ckpt.meta["defense"]["flipped"] == report["flipped"]
    assert ckpt.meta["defense"]["lambda"] == report["lambda"] and ckpt.meta["attack"]["task"] == "0:5"
    rows = list(csv.DictReader(trace.open()))
    assert list(rows[0]) == ["lambda", "selected", "aux_acc", "drop", "kl"] and rows[-1]["kl"] == ""
    assert float(rows[-1]["lambda"]) == pytest.approx(report["lambda"])
    assert float(rows[-1]["drop"]) >= 0.05 or report["all_selected"]
    assert report["stop"] == "accuracy" and report["kl"] is None and report["rule"] == "flain+shifts+distill+sgd"
    # the defended checkpoint evaluates like any other
    ev = invoke("eval", out, "--data-dir", tiny_run[1], "--json")
    assert ev.exit_code == 0 and json.loads(ev.stdout)["n_triggered"] == 20


def test_defend_stop_kl_records_and_traces_the_divergence(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    out, trace = tmp_path / "kl.safetensors", tmp_path / "trace.csv"
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--kl", "0.01", "--kl-unit", "nats", "--repair", "none", "--out", out, "--trace", trace,
                 "--json")  # the default stop, in nats
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["stop"] == "kl" and report["kl"] == 0.01 and report["rho"] is None
    assert report["rule"] == "flain+shifts+kl"
    rows = list(csv.DictReader(trace.open()))
    assert float(rows[-1]["kl"]) == pytest.approx(report["kl_kept"], rel=1e-5) and report["kl_kept"] >= 0.01
    assert all(float(r["kl"]) < 0.01 for r in rows[:-1])
    meta = load_checkpoint(out).meta["defense"]
    assert meta["stop"] == "kl" and meta["kl"] == 0.01 and meta["kl_kept"] == report["kl_kept"]


def test_defend_kl_in_shift_units_stops_at_that_many_times_the_models_shift_kl(tiny_run, aux_dir, tmp_path):
    """--kl-unit shift: the budget is --kl times the model's mean KL between the aux images and the same images
    moved by one pixel, computed here from the whole network (the library splits it at the defended layer)."""
    from flain_cli.datasets import normalize
    from flain_cli.loading import load_aux_for, load_model
    run, _ = tiny_run
    out, trace = tmp_path / "s.safetensors", tmp_path / "trace.csv"
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--kl-unit", "shift", "--kl", "0.5", "--repair", "none", "--out", out, "--trace", trace, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    loaded = load_model(run / "final.safetensors")
    aux, norm = load_aux_for(loaded, aux_dir), loaded.meta.norm
    with torch.no_grad():
        logp = [torch.log_softmax(loaded.model(normalize(images, norm.mean, norm.std)).double(), 1)
                for images in (aux.images, *(torch.roll(torch.nn.functional.pad(aux.images, (1, 1, 1, 1)),
                                                        shifts=move, dims=(-2, -1))[..., 1:-1, 1:-1]
                                            for move in ((1, 0), (-1, 0), (0, 1), (0, -1))))]
    reference = sum(float(torch.nn.functional.kl_div(moved, logp[0], log_target=True, reduction="batchmean"))
                    for moved in logp[1:]) / 4
    assert report["kl_scale"] == pytest.approx(reference, rel=1e-4) and reference > 0
    assert report["kl_unit"] == "shift" and report["kl"] == 0.5 and report["rule"] == "flain+shifts+klshift"
    assert report["kl_budget"] == pytest.approx(0.5 * reference, rel=1e-4)
    rows = list(csv.DictReader(trace.open()))  # the search stopped at the first threshold at or past the budget
    assert all(float(r["kl"]) < report["kl_budget"] for r in rows[:-1])
    assert report["kl_kept"] >= report["kl_budget"] or report["all_selected"]
    stored = load_checkpoint(out).meta["defense"]
    assert stored["kl_unit"] == "shift" and stored["kl_scale"] == report["kl_scale"]
    record = DefenseRecord.from_json(stored)
    assert record.to_json() == stored and record.kl_budget == pytest.approx(report["kl_budget"])
    alone = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                   "--kl-unit", "shift", "--repair", "none", "--out", tmp_path / "a.safetensors", "--json")
    assert alone.exit_code == 0 and json.loads(alone.stdout)["kl"] == 1.5  # the unit brings its own budget


def test_defend_prune_and_default_output_name(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    model = tmp_path / "final.safetensors"
    model.write_bytes((run / "final.safetensors").read_bytes())
    res = invoke("defend", model, "--init", run / "init.safetensors", "--aux", aux_dir, "--method", "prune",
                 "--rho", "0", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["out"] == str(tmp_path / "final.prune.safetensors")
    assert (tmp_path / "final.prune.safetensors").is_file()
    again = invoke("defend", model, "--init", run / "init.safetensors", "--aux", aux_dir, "--method", "prune")
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr


def test_defend_table_view(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--out", tmp_path / "o.safetensors", "--rho", "0")
    assert res.exit_code == 0 and "neurons changed" in res.stdout and "final lambda" in res.stdout


def test_defend_never_overwrites_an_input(tiny_run, aux_dir):
    run, _ = tiny_run
    before = (run / "final.safetensors").read_bytes()
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--out", run / "final.safetensors", "--force")
    assert res.exit_code == 1 and res.stderr.startswith("Error: --out ") and "is also the input MODEL" in res.stderr
    assert (run / "final.safetensors").read_bytes() == before


def test_defend_bad_inputs(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--aux", empty], "Error: aux folder"),
        (["--aux", aux_dir, "--rho", "2"], "Error: --rho must be in [0, 1], got 2.0"),
        (["--aux", aux_dir, "--method", "erase"], "Error: unknown method 'erase'"),
    ]
    for extra, message in cases:
        res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", *extra,
                     "--out", tmp_path / "x.safetensors")
        assert res.exit_code == 1, res.output
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith(message), res.stderr
    assert not (tmp_path / "x.safetensors").exists()
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--select", "best", "--out", tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "'best' is not one of" in " ".join(res.stderr.split())  # a fixed choice: usage error
    res = invoke("defend", run / "final.safetensors", "--aux", aux_dir, "--out", tmp_path / "x.safetensors")
    assert res.exit_code == 1 and res.stderr.startswith("Error: --init is needed for method flain")
    assert not (tmp_path / "x.safetensors").exists()
    pruned = invoke("defend", run / "final.safetensors", "--aux", aux_dir, "--method", "prune", "--rho", "0.05",
                    "--out", tmp_path / "p.safetensors", "--json")  # pruning zeroes columns: no W0 needed
    assert pruned.exit_code == 0, pruned.output
    with_init = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                       "--method", "prune", "--rho", "0.05", "--out", tmp_path / "q.safetensors")
    assert with_init.exit_code == 0
    assert load_checkpoint(tmp_path / "p.safetensors").tensors["fc1.weight"].equal(
        load_checkpoint(tmp_path / "q.safetensors").tensors["fc1.weight"])


def test_scan_json_csv_and_table(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    res = invoke("scan", run / "final.safetensors", "--aux", aux_dir, "--csv", tmp_path / "m.csv", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["means"]) == 3136 == report["neurons"] and report["layer"] == "fc1"
    assert report["zeros"] == sum(1 for m in report["means"] if m == 0)
    assert report["min"] == min(report["means"]) and report["n_aux"] == 60
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert len(rows) == 3136 and float(rows[7]["mean"]) == pytest.approx(report["means"][7], rel=1e-6)
    table = invoke("scan", run / "final.safetensors", "--aux", aux_dir, "--layer", "fc2", "--lowest", "3")
    assert table.exit_code == 0 and "histogram" in table.stdout and "3 least active" in table.stdout
    assert "inputs of fc2" in " ".join(table.stdout.split())
    moved = json.loads(invoke("scan", run / "final.safetensors", "--aux", aux_dir, "--shifts", "1", "--json").stdout)
    assert moved["shifts"] == 1 and report["shifts"] == 2 and moved["means"] != report["means"]  # defend's default
    assert len(moved["means"]) == 3136


def test_aux_export_cli(tmp_path, fmnist_dir):
    res = invoke("aux", "export", "--dataset", "fmnist", "--data-dir", fmnist_dir, "--per-class", "2",
                 "--out", tmp_path / "aux", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["count"] == 20
    res = invoke("aux", "export", "--dataset", "fmnist", "--data-dir", fmnist_dir, "--out", tmp_path / "aux")
    assert res.exit_code == 1 and res.stderr.startswith(f"Error: --out {tmp_path / 'aux'} already exists")


def test_presets_and_the_repair_options(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    common = [run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir, "--rho", "0.05",
              "--json"]
    plain = [*common, "--shifts", "0"]  # the aux images' own means, as the paper takes them
    paper = json.loads(invoke("defend", *common, "--preset", "paper", "--out", tmp_path / "p.safetensors").stdout)
    none = json.loads(invoke("defend", *plain, "--repair", "none", "--out", tmp_path / "n.safetensors").stdout)
    assert (none["rule"], none["preset"], none["repair"]) == ("flain", "default", None)
    assert (paper["rule"], paper["preset"], paper["repair"], paper["shifts"]) == ("flain", "paper", None, 0)
    p, n = load_checkpoint(tmp_path / "p.safetensors").tensors, load_checkpoint(tmp_path / "n.safetensors").tensors
    assert p.keys() == n.keys() and all(torch.equal(p[k], n[k]) for k in p)  # the paper preset, bit for bit
    # the default preset: the means over moved copies (shifts 2) and the repair trained with SGD
    default = json.loads(invoke("defend", *common, "--repair-steps", "20", "--out", tmp_path / "f.safetensors").stdout)
    assert default["rule"] == "flain+shifts+distill+sgd" and default["preset"] == "default" and default["shifts"] == 2
    assert default["select"] == "crossing" and default["step"] == 0.001  # the settings used, not the raw options
    assert (default["repair"]["steps"], default["repair"]["alpha"]) == (20, 0.8)
    assert (default["repair"]["optimizer"], default["repair"]["lr"]) == ("sgd", 0.1)  # SGD's own learning rate
    # the Adam repair, the default's before 2026-11-30 evening: its record reads as it did then
    adam = json.loads(invoke("defend", *plain, "--repair-steps", "20", "--repair-optimizer", "adam", "--out",
                             tmp_path / "d.safetensors").stdout)
    assert adam["rule"] == "flain+distill" and (adam["repair"]["lr"], adam["shifts"]) == (0.001, 0)
    meta = load_checkpoint(tmp_path / "d.safetensors").meta["defense"]
    assert meta["rule"] == "flain+distill" and meta["repair"]["steps"] == 20 and meta["step"] == 0.001
    assert "guard" not in meta["repair"] and meta["repair"]["optimizer"] == "adam"  # guard off: as before it existed
    guard = json.loads(invoke("defend", *plain, "--repair-steps", "20", "--repair-optimizer", "adam",
                              "--repair-guard", "1", "--out", tmp_path / "g.safetensors").stdout)
    assert guard["rule"] == "flain+distill+guard" and guard["flipped"] == adam["flipped"]
    assert (guard["repair"]["guard"], guard["repair"]["guard_ratio"], guard["repair"]["guard_rate"]) == (1.0, 2.0, 0.01)
    g, d = load_checkpoint(tmp_path / "g.safetensors"), load_checkpoint(tmp_path / "d.safetensors")
    assert g.meta["defense"]["repair"]["guard"] == 1.0 and not torch.equal(g.tensors["fc2.weight"],
                                                                             d.tensors["fc2.weight"])
    mask = torch.zeros(3136, dtype=torch.bool)
    mask[g.meta["defense"]["neurons"]] = True  # the guard trains the same columns as the repair
    assert torch.equal(g.tensors["fc1.weight"][:, mask], d.tensors["fc1.weight"][:, mask])
    sgd = json.loads(invoke("defend", *plain, "--repair-steps", "20", "--out", tmp_path / "s.safetensors").stdout)
    assert sgd["rule"] == "flain+distill+sgd" and sgd["flipped"] == adam["flipped"]
    s = load_checkpoint(tmp_path / "s.safetensors")
    assert s.meta["defense"]["repair"]["optimizer"] == "sgd" and s.meta["defense"]["repair"]["lr"] == 0.1
    assert DefenseRecord.from_json(s.meta["defense"]).config.rule == "flain+distill+sgd"  # reads back
    assert torch.equal(s.tensors["fc1.weight"][:, mask], d.tensors["fc1.weight"][:, mask])
    assert not torch.equal(s.tensors["fc2.weight"], d.tensors["fc2.weight"])
    lr = json.loads(invoke("defend", *plain, "--repair-steps", "20", "--repair-lr", "0.02", "--out",
                           tmp_path / "s2.safetensors").stdout)
    assert (lr["repair"]["optimizer"], lr["repair"]["lr"]) == ("sgd", 0.02)
    back = json.loads(invoke("defend", *plain, "--repair-steps", "20", "--repair-optimizer", "adam",
                             "--repair-lr", "0.002", "--out", tmp_path / "a2.safetensors").stdout)
    assert back["repair"]["optimizer"] == "adam" and back["repair"]["lr"] == 0.002
    assert "patches" not in back["repair"] and "patches" not in meta["repair"]  # off: as before it existed
    # the patched copies (opt-in): named in the rule, the JSON and the metadata; the same flip; deterministic
    patched = [*plain, "--repair-steps", "20", "--repair-patches", "2"]
    pa = json.loads(invoke("defend", *patched, "--out", tmp_path / "pa.safetensors").stdout)
    pb = json.loads(invoke("defend", *patched, "--out", tmp_path / "pb.safetensors").stdout)
    assert pa["rule"] == "flain+distill+patches+sgd" and pa["repair"]["patches"] == 2
    assert pa["flipped"] == sgd["flipped"]
    pt, pm = load_checkpoint(tmp_path / "pa.safetensors").tensors, load_checkpoint(tmp_path / "pa.safetensors").meta
    assert pm["defense"]["repair"]["patches"] == 2 and pb["rule"] == pa["rule"]
    assert all(torch.equal(pt[k], load_checkpoint(tmp_path / "pb.safetensors").tensors[k]) for k in pt)
    assert torch.equal(pt["fc1.weight"][:, mask], s.tensors["fc1.weight"][:, mask])
    assert not torch.equal(pt["fc2.weight"], s.tensors["fc2.weight"])



def test_the_earlier_defaults_are_options_away():
    """Today's default preset is the field defaults; the earlier defaults are a few settings away."""
    from flain_cli.settings import PRESETS, AccuracyStop, DefenseConfig, KlStop, RepairSettings, defense_config
    assert PRESETS["default"] == DefenseConfig() == defense_config()
    sgd = RepairSettings(optimizer="sgd", lr=0.1)
    assert DefenseConfig() == DefenseConfig(stop=KlStop(1.5, "shift"), shifts=2, repair=sgd)
    until_dec_6 = DefenseConfig(stop=KlStop(0.07), shifts=2, repair=sgd)
    assert defense_config(kl_unit="nats") == defense_config(kl=0.07, kl_unit="nats") == until_dec_6
    earlier = DefenseConfig(stop=KlStop(0.07), shifts=0, repair=RepairSettings(optimizer="adam", lr=0.001))
    assert defense_config(kl_unit="nats", shifts=0, repair_optimizer="adam") == earlier  # until 2026-11-30 evening
    assert defense_config(shifts=0, repair_optimizer="adam", stop="accuracy") == DefenseConfig(
        stop=AccuracyStop(0.03), shifts=0, repair=earlier.repair)  # and the one before it
    assert defense_config("paper") == PRESETS["paper"] == DefenseConfig(stop=AccuracyStop(), shifts=0, repair=None)
    assert defense_config("paper", stop="kl").stop == KlStop(1.5, "shift")  # the kl stop alone is the default's


@pytest.mark.parametrize(("options", "message"), [
    (["--repair", "none", "--repair-steps", "5"],
     "Error: --repair-steps has no effect without the repair; drop it or pass --repair distill"),
    (["--preset", "paper", "--repair-lr", "0.1"],
     "Error: --repair-lr has no effect without the repair; drop it or pass --repair distill"),
    (["--repair-alpha", "2"], "Error: --repair-alpha must be in [0, 1], got 2.0"),
    (["--repair-steps", "0"], "Error: --repair-steps must be a whole number from 1 to 100000, got 0"),
    (["--repair-temperature", "nan"], "Error: --repair-temperature must be a finite number, got nan"),
    (["--repair", "none", "--repair-guard", "1"],
     "Error: --repair-guard has no effect without the repair; drop it or pass --repair distill"),
    (["--repair-guard-rate", "0.1"], "Error: --repair-guard-ratio and --repair-guard-rate shape the guard, which is "
                                     "off; drop them or pass --repair-guard 1"),
    (["--repair-guard", "1", "--repair-guard-rate", "2"], "Error: --repair-guard-rate must be in (0, 1], got 2.0"),
    (["--preset", "paper", "--repair-optimizer", "sgd"],
     "Error: --repair-optimizer has no effect without the repair; drop it or pass --repair distill"),
    (["--repair", "none", "--repair-patches", "2"],
     "Error: --repair-patches has no effect without the repair; drop it or pass --repair distill"),
    (["--repair-patches", "65"], "Error: --repair-patches must be a whole number from 0 (off) to 64, got 65"),
    (["--repair-backtrack", "11"], "Error: --repair-backtrack must be a whole number from 0 (off) to 10, got 11"),
])
def test_bad_repair_settings_are_one_error_line(tiny_run, aux_dir, tmp_path, options, message):
    run, _ = tiny_run
    out = tmp_path / "o.safetensors"
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--out", out, *options)
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [message] and not out.exists()


def test_an_unknown_preset_is_a_usage_error(tiny_run, aux_dir, tmp_path):
    run, _ = tiny_run
    res = invoke("defend", run / "final.safetensors", "--init", run / "init.safetensors", "--aux", aux_dir,
                 "--preset", "best", "--out", tmp_path / "o.safetensors")
    assert res.exit_code == 2
