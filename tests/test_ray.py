"""`flain experiment --ray`: a grid's trainings as Ray tasks give the same results as the plain run.

Needs Ray (the 'flower' extra, .venv-flower); skipped without it, except where FLAIN_REQUIRE_FLOWER
is set (CI).
"""

import json
import os

import pytest

if not os.environ.get("FLAIN_REQUIRE_FLOWER"):
    pytest.importorskip("ray")

from .conftest import invoke  # noqa: E402
from .test_experiment import TINY, write  # noqa: E402


def test_a_grid_on_a_local_ray_instance_gives_the_plain_runs_results(tmp_path, fmnist_dir):
    """2 trainings (tasks 0:5 and 0:6) x 2 defenses: Ray runs each training and its defenses as one task."""
    grid = write(tmp_path, TINY.format(per_class=3).replace('"none", "flain", "rlr"', '"none", "flain"')
                 .replace('attack = ["0:5"]', 'attack = ["0:5", "0:6"]'))
    on_ray = invoke("experiment", grid, "--out", tmp_path / "ray", "--data-dir", fmnist_dir, "--ray", "local",
                    "--json")
    assert on_ray.exit_code == 0, on_ray.output
    plain = invoke("experiment", grid, "--out", tmp_path / "plain", "--data-dir", fmnist_dir, "--json")
    assert plain.exit_code == 0, plain.output
    rows = [json.loads(res.stdout)["rows"] for res in (on_ray, plain)]
    assert [(r["attack"], r["defense"], r["status"]) for r in rows[0]] == [
        ("0:5", "none", "done"), ("0:5", "flain", "done"), ("0:6", "none", "done"), ("0:6", "flain", "done")]
    # CPU trainings are bit-reproducible: the same numbers, cell for cell, in the same order
    assert [(r["acc"], r["asr"], r.get("flipped")) for r in rows[0]] == [(r["acc"], r["asr"], r.get("flipped"))
                                                                       for r in rows[1]]
    written = json.loads((tmp_path / "ray" / "results.json").read_text())["rows"]
    assert [r["status"] for r in written] == ["done"] * 4
    again = invoke("experiment", grid, "--out", tmp_path / "ray", "--data-dir", fmnist_dir, "--ray", "local", "--json")
    assert [r["status"] for r in json.loads(again.stdout)["rows"]] == ["cached"] * 4  # resumed from the cache


def test_a_bad_ray_address_is_one_clear_error(tmp_path, fmnist_dir):
    grid = write(tmp_path, TINY.format(per_class=3))
    res = invoke("experiment", grid, "--out", tmp_path / "o", "--data-dir", fmnist_dir, "--ray", "localhost:6379")
    assert res.exit_code == 1
    assert res.stderr.strip().startswith("Error: --ray must be local (a new Ray instance here), auto")
    assert not (tmp_path / "o").exists()
