"""One trainer per output folder: train.lock refuses `flain train`, defers `flain experiment` cells."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from typing import ClassVar

import pytest

from flain_cli.experiment import ExperimentListener, config_hash, load_experiment, run_experiment
from flain_cli.training import LOCK_FILE, RunBusy, run_lock

from .conftest import invoke
from .test_experiment import TINY, write


def test_a_held_folder_is_refused_until_released(tmp_path):
    with (run_lock(tmp_path / "run"),
          pytest.raises(RunBusy, match=rf"run is being trained right now by pid {os.getpid()} on "),
          run_lock(tmp_path / "run")):
        pass
    with run_lock(tmp_path / "run"):  # free again
        assert (tmp_path / "run" / LOCK_FILE).is_file()


def test_the_lock_dies_with_its_process(tmp_path):
    """A killed trainer leaves no stale lock behind (unlike a pid file)."""
    script = (f"import time\nfrom flain_cli.training import run_lock\nwith run_lock({str(tmp_path)!r}):\n"
              "    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=f"pid {holder.pid} "), run_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):
        pass


def test_train_refuses_a_folder_being_trained(tmp_path):
    out = tmp_path / "out"
    with run_lock(out):
        res = invoke("train", "--out", out, "--rounds", "1")
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: {out} is being trained right now by pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_experiment_leaves_a_busy_training_to_its_process_and_takes_it_over_at_the_end(tmp_path, fmnist_dir):
    text = (TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none"')
            .replace('attack = ["0:5"]', 'attack = ["0:5", "0:6"]'))
    exp = load_experiment(write(tmp_path, text), tmp_path / "out")
    busy_dir = exp.out / f"train-{config_hash(exp.config({'attack': '0:5'}))}"
    # what "the other process" will have written by the time it lets go
    elsewhere = load_experiment(write(tmp_path, text.replace('"0:5", "0:6"', '"0:5"'), "one.toml"), tmp_path / "else")
    (done,) = run_experiment(elsewhere, data_dir=fmnist_dir)

    with contextlib.ExitStack() as other:
        def finish():  # while the grid waits on the lock, so it must look again once it has it
            shutil.copytree(tmp_path / "else" / busy_dir.name, busy_dir, dirs_exist_ok=True)
            other.close()

        other.enter_context(run_lock(busy_dir))
        safety = threading.Timer(120, other.close)  # a broken implementation fails, it does not hang
        safety.start()

        class Events(ExperimentListener):
            seen: ClassVar[list[tuple[str, str]]] = []

            def waiting(self, label, reason):
                self.seen.append((label, reason))

            def cell(self, label, status):
                self.seen.append((label, status))
                if label.startswith("attack=0:6"):  # the other process finishes a moment later, then lets go
                    threading.Timer(1.0, finish).start()

        cells = run_experiment(exp, data_dir=fmnist_dir, listener=Events())
        safety.cancel()
    assert Events.seen[0] == ("attack=0:5, none", f"its training (or this defense of it) is under way in pid "
                              f"{os.getpid()} on " + Events.seen[0][1].split(" on ", 1)[1])
    assert [s for _, s in Events.seen[1:]] == ["done", "cached"]
    assert [(c.point["attack"], c.status) for c in cells] == [("0:5", "cached"), ("0:6", "done")]
    assert cells[0].acc == done.acc  # taken from the other process's checkpoint, not trained again
    rows = json.loads((exp.out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["cached", "done"]


def test_a_defense_another_worker_is_computing_is_read_from_it_not_computed_twice(tmp_path, fmnist_dir):
    text = TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
    exp = load_experiment(write(tmp_path, text), tmp_path / "out")
    run_experiment(exp, data_dir=fmnist_dir)
    (record,) = [p for p in exp.out.glob("train-*/flain-*.json") if not p.name.endswith(".eval.json")]
    written, checkpoint = record.read_text(), record.with_suffix(".safetensors")
    record.unlink()  # the other worker is computing it: its checkpoint is there, its record not yet
    before = checkpoint.stat().st_mtime_ns

    with contextlib.ExitStack() as other:
        def finish():
            record.write_text(written)
            other.close()

        other.enter_context(run_lock(record.parent))
        safety = threading.Timer(120, other.close)  # a broken implementation fails, it does not hang
        safety.start()

        class Events(ExperimentListener):
            seen: ClassVar[list[str]] = []

            def waiting(self, label, reason):
                self.seen.append(label)
                threading.Timer(1.0, finish).start()

        cells = run_experiment(exp, data_dir=fmnist_dir, listener=Events())
        safety.cancel()
    assert Events.seen == ["attack=0:5, flain"]  # deferred while the other worker held the folder
    assert [c.status for c in cells] == ["cached", "cached"]
    assert checkpoint.stat().st_mtime_ns == before  # not written again
