"""An interrupted training continues from resume.safetensors exactly as if it had never stopped."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from flain_cli.cli import train as train_cmd
from flain_cli.cli.app import app
from flain_cli.errors import CheckpointError, ConfigError
from flain_cli.simulation import Listener, TrainConfig, simulate
from flain_cli.training import RESUME_FILE, load_snapshot, save_snapshot

from .test_simulation import _dataset

# dropout (torch RNG), client sampling (numpy RNG) and batch order (generator) all matter here
CFG = TrainConfig(arch="cnn-mnist", clients=4, mcr=0.5, pdr=0.5, attack="0:5", trigger="dba", rounds=3,
                  batch_size=64, sample_rate=0.5, seed=3)


class Stop(Exception):
    pass


class StopAfter(Listener):
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def round_end(self, log) -> None:
        if log.round == self.rnd:
            raise Stop


def interrupted(cfg, data, after):
    snaps = []
    with pytest.raises(Stop):
        simulate(cfg, data, listener=StopAfter(after), on_round=snaps.append)
    return snaps[-1]


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    data = _dataset()
    whole = simulate(CFG, data)
    snap = interrupted(CFG, data, after=2)
    assert snap.round == 2 and len(snap.history) == 2
    save_snapshot(tmp_path / RESUME_FILE, snap)  # and through the file
    outside = torch.get_rng_state()
    resumed = simulate(CFG, data, resume=load_snapshot(tmp_path / RESUME_FILE))
    assert torch.equal(torch.get_rng_state(), outside)  # the caller's RNG is untouched
    assert all(torch.equal(whole.final_state[k], resumed.final_state[k]) for k in whole.final_state)
    assert [(h.round, h.acc, h.asr) for h in whole.history] == [(h.round, h.acc, h.asr) for h in resumed.history]
    # without the restored random states the continuation differs (so the test above can fail)
    torch.manual_seed(123)
    fresh = dataclasses.replace(snap, torch_rng=torch.get_rng_state())
    other = simulate(CFG, data, resume=fresh)
    assert not torch.equal(whole.final_state["fc1.weight"], other.final_state["fc1.weight"])


def test_resume_refuses_another_configuration():
    data = _dataset()
    snap = interrupted(CFG, data, after=1)
    with pytest.raises(ConfigError, match=r"lr: 0.001 there, 0.01 here"):
        simulate(dataclasses.replace(CFG, lr=0.01), data, resume=snap)
    with pytest.raises(ConfigError, match="other initial weights"):
        simulate(CFG, data, resume=dataclasses.replace(snap, init_state={k: v + 1 for k, v in snap.init_state.items()}))


def test_a_damaged_resume_file_is_one_clear_error(tmp_path):
    bad = tmp_path / RESUME_FILE
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable flain-cli resume file.*delete it"):
        load_snapshot(bad)


TINY = ["--arch", "cnn-mnist", "--clients", "2", "--mcr", "0.5", "--pdr", "0.5", "--rounds", "3",
        "--batch-size", "64", "--seed", "1"]


def test_cli_interrupt_then_resume(tmp_path, fmnist_dir, monkeypatch):
    runner = CliRunner()

    def train(out, *extra):
        return runner.invoke(app, ["train", "--data-dir", str(fmnist_dir), *TINY, "--out", str(out),
                                   "--log", str(out / "log.jsonl"), "--json", *extra])

    whole = train(tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "run"
    original = train_cmd._RichListener.round_end

    def round_end(self, log):
        original(self, log)
        if log.round == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd._RichListener, "round_end", round_end)
    res = train(out)
    monkeypatch.undo()
    assert res.exit_code == 130 and "round 2 is kept" in res.stderr and "--resume" in res.stderr
    assert (out / RESUME_FILE).is_file() and not (out / "final.safetensors").exists()
    log_before = (out / "log.jsonl").read_text()

    res = train(out)  # neither --resume nor --force
    assert res.exit_code == 1 and "interrupted after round 2; pass --resume" in res.stderr
    res = train(out, "--resume", "--lr", "0.01")
    assert res.exit_code == 1 and "lr: 0.001 there, 0.01 here" in res.stderr
    assert (out / "log.jsonl").read_text() == log_before  # the failed resume kept the log

    res = train(out, "--resume")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["resumed_from_round"] == 2
    assert summary["final_sha256"] == json.loads(whole.stdout)["final_sha256"]
    assert not (out / RESUME_FILE).exists()
    assert [json.loads(line)["round"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
