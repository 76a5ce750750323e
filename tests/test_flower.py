"""FLAIN for a Flower deployment: the strategy wrapper, and the example app end to end (Flower + Ray).

Needs the optional extra (`bash scripts/setup.sh --flower`: .venv-flower); skipped without it,
except where FLAIN_REQUIRE_FLOWER is set (CI), where a missing Flower fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not os.environ.get("FLAIN_REQUIRE_FLOWER"):
    pytest.importorskip("flwr")

from flwr.app import ArrayRecord  # noqa: E402
from flwr.serverapp.strategy import FedAvg, Result  # noqa: E402

from flain_cli.checkpoint import load_checkpoint, sha256_file  # noqa: E402
from flain_cli.errors import CheckpointError, ConfigError, FlainError  # noqa: E402
from flain_cli.flower import SaveForFlain  # noqa: E402
from flain_cli.models import build_model  # noqa: E402

from .conftest import invoke, real_fmnist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Recording(FedAvg):
    """A strategy whose `start` trains nothing: it checks W0 is on disk already and returns given arrays."""

    def __init__(self, out: Path, final: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.out, self.final, self.calls = out, final, []

    def start(self, grid, initial_arrays, num_rounds=3, timeout=3600, train_config=None, evaluate_config=None,
              evaluate_fn=None):
        self.calls.append((grid, num_rounds, timeout))
        assert (self.out / "init.safetensors").is_file() and not (self.out / "final.safetensors").exists()
        return Result(arrays=ArrayRecord(self.final))


def test_the_wrapper_saves_w0_before_round_1_and_the_final_model_after(tmp_path):
    torch.manual_seed(1)
    init = build_model("cnn-mnist", 10).state_dict()
    final = {k: v + 0.01 if v.is_floating_point() else v for k, v in init.items()}
    inner = Recording(tmp_path / "fl", final)
    wrapper = SaveForFlain(inner, tmp_path / "fl", arch="cnn-mnist", dataset="fmnist", attack="0:5", trigger="dba")
    result = wrapper.start("GRID", ArrayRecord(init), num_rounds=7, timeout=9)
    assert inner.calls == [("GRID", 7, 9)] and result.arrays is not None  # the inner strategy ran as asked
    w0, last = (load_checkpoint(tmp_path / "fl" / f"{role}.safetensors") for role in ("init", "final"))
    assert all(torch.equal(w0.tensors[k], init[k].float()) for k in init)
    assert all(torch.equal(last.tensors[k], final[k].float()) for k in final)
    assert (w0.role, last.role) == ("init", "final") and last.arch == "cnn-mnist" and last.dataset == "fmnist"
    assert last.parent_init == sha256_file(tmp_path / "fl" / "init.safetensors") == wrapper.init_sha256
    assert last.attack == ("0:5", "dba") and last.meta["flower"] == {"strategy": "Recording", "num_rounds": 7}
    assert last.meta["normalization"]["mean"] == [0.286]

    again = SaveForFlain(Recording(tmp_path / "fl", final), tmp_path / "fl", arch="cnn-mnist", dataset="fmnist")
    with pytest.raises(ConfigError, match="init.safetensors already exists; pass overwrite"):
        again.start("GRID", ArrayRecord(init))  # nothing the user had is replaced without asking
    assert load_checkpoint(tmp_path / "fl" / "final.safetensors").meta == last.meta


def test_a_run_that_aggregated_nothing_writes_no_final_model(tmp_path):
    inner = Recording(tmp_path, {})  # its Result has no arrays, as FedAvg's when every round failed
    with pytest.raises(FlainError, match="Recording ended without a global model"):
        SaveForFlain(inner, tmp_path, arch="cnn-mnist", dataset="fmnist").start(
            "GRID", ArrayRecord(build_model("cnn-mnist", 10).state_dict()))
    assert (tmp_path / "init.safetensors").is_file() and not (tmp_path / "final.safetensors").exists()


def test_the_wrapper_refuses_a_model_that_is_not_the_architecture_before_training(tmp_path):
    inner = Recording(tmp_path, {})
    wrong = SaveForFlain(inner, tmp_path, arch="cnn-fmnist", dataset="fmnist")
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        wrong.start("GRID", ArrayRecord(build_model("cnn-mnist", 10).state_dict()))
    assert inner.calls == []  # refused before round 1
    with pytest.raises(ConfigError, match="arch .* or model_def"):
        SaveForFlain(inner, tmp_path)
    with pytest.raises(ConfigError):
        SaveForFlain(inner, tmp_path, arch="cnn-mnist", trigger="nope")


@real_fmnist
def test_the_example_flower_app_trains_and_flain_defend_cleans_its_model(tmp_path):
    """Flower's simulation engine on Ray: 2 clients, 1 round, 300 images each; then the CLI on its files."""
    out = tmp_path / "flower"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "flower_flain.py"), "--out", str(out),
                          "--clients", "2", "--rounds", "1", "--per-client", "300"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    aux = tmp_path / "aux"
    assert invoke("aux", "export", "--dataset", "fmnist", "--per-class", "5", "--out", aux).exit_code == 0
    res = invoke("defend", out / "final.safetensors", "--init", out / "init.safetensors", "--aux", aux,
                 "--out", out / "clean.safetensors", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["of"] == 3136
    report = json.loads(invoke("eval", out / "clean.safetensors", "--json").stdout)
    assert report["n_clean"] == 10000 and report["n_triggered"] == 1000  # the attack travelled in the metadata


def replay(cfg, dataset, init_state):
    """The federation the Flower engine runs, replayed in this process without Flower: the server's sampling and
    aggregation (simulation.Server) and each client's training seeded by (seed, round, client), as a node seeds it.
    The built-in loop (simulation.simulate) draws one generator through all clients and rounds instead (bit for bit
    the runs recorded before the Flower engine existed), so its batch orders and dropout masks differ from these."""
    import numpy as np

    from flain_cli.flower import _draw_seed
    from flain_cli.models import build_model
    from flain_cli.simulation import Server, make_clients, train_client

    rng = np.random.default_rng(cfg.seed)
    clients = make_clients(cfg, dataset, rng)
    model = build_model(cfg.arch, dataset.spec.num_classes)
    server = Server(cfg, dataset, model, torch.device("cpu"))
    state = dict(init_state)
    for rnd in range(1, cfg.rounds + 1):
        updates, weights = [], []
        for k in server.sample(rng):
            seed = _draw_seed(cfg.seed, rnd, k)
            torch.manual_seed(seed)  # then the node builds its model (drawing its init) before it trains: dropout
            local = build_model(cfg.arch, dataset.spec.num_classes)  # masks come after that in the RNG's stream
            updates.append(train_client(local, state, clients[k], dataset, server.trigger, server.target, cfg,
                                        torch.Generator().manual_seed(seed), torch.device("cpu")))
            weights.append(float(len(clients[k].indices)))
        state = server.step(state, updates, weights)
    return state


@real_fmnist
def test_flain_train_on_the_flower_engine_is_the_builtin_federation(tmp_path):
    """Same W0, clients, poisoned sets and sampling as the built-in loop; the final model is, within float
    tolerance, the one the federation gives with each client seeded by (seed, round, client) (`replay`), and its
    ACC and ASR are those of that model. The built-in loop draws its batch orders from one generator through all
    clients and rounds, so its final model differs a little (ACC within 0.1, ASR within 0.25 here)."""
    args = ["--dataset", "fmnist", "--arch", "cnn-mnist", "--clients", "3", "--mcr", "0.34", "--pdr", "0.5",
            "--trigger", "dba", "--rounds", "2", "--train-samples", "900", "--seed", "3", "--json"]
    run = subprocess.run([sys.executable, "-m", "flain_cli", "train", *args, "--engine", "flower",
                          "--out", str(tmp_path / "flower")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    flower = json.loads(run.stdout)
    builtin = json.loads(invoke("train", *args, "--out", tmp_path / "builtin").stdout)
    assert (flower["engine"], builtin["engine"]) == ("flower", "builtin")
    for key in ("malicious_clients", "poisoned_samples", "rounds"):
        assert flower[key] == builtin[key]
    w0 = [load_checkpoint(tmp_path / name / "init.safetensors") for name in ("flower", "builtin")]
    assert all(torch.equal(w0[0].tensors[k], w0[1].tensors[k]) for k in w0[1].tensors)
    finals = [load_checkpoint(tmp_path / name / "final.safetensors") for name in ("flower", "builtin")]
    assert finals[0].meta["engine"] == "flower" and "engine" not in finals[1].meta
    assert finals[0].meta["train_config"] == finals[1].meta["train_config"]
    # the final tensors: the replayed federation's
    from flain_cli.datasets import load_dataset
    from flain_cli.simulation import TrainConfig
    cfg = TrainConfig(**finals[0].meta["train_config"])
    expected = replay(cfg, load_dataset("fmnist"), w0[0].tensors)
    assert all(torch.allclose(finals[0].tensors[k], expected[k].float(), atol=1e-5) for k in expected)
    assert not torch.allclose(finals[1].tensors["fc1.weight"], finals[0].tensors["fc1.weight"], atol=1e-5)
    # ACC and ASR: the engine's report is what eval measures on its model; the built-in's is near
    measured = json.loads(invoke("eval", tmp_path / "flower" / "final.safetensors", "--json").stdout)
    assert (measured["acc"], measured["asr"]) == pytest.approx((flower["acc"], flower["asr"]))
    assert abs(flower["acc"] - builtin["acc"]) < 0.1 and abs(flower["asr"] - builtin["asr"]) < 0.25
    assert [h["round"] for h in flower["history"]] == [h["round"] for h in builtin["history"]] == [1, 2]


def test_the_flower_engine_does_not_resume_a_builtin_run(tmp_path, monkeypatch):
    import types

    from flain_cli import training

    (tmp_path / "resume.safetensors").write_bytes(b"x")
    monkeypatch.setattr(training, "load_snapshot", lambda path: types.SimpleNamespace(round=2))
    with pytest.raises(ConfigError, match="^engine .* interrupted after round 2; resume it with that engine"):
        training.train_to_dir(None, None, tmp_path, resume=True, engine="flower")
    with pytest.raises(ConfigError, match="^engine must be one of builtin, flower"):
        training.train_to_dir(None, None, tmp_path, engine="ray")


def test_robust_lr_negates_the_step_where_clients_disagree(monkeypatch):
    """RobustLR for a user's own app: flain-cli's RLR on each client's model minus the global one."""
    from flwr.app import Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from flain_cli.flower import RobustLR

    for name in ("_run_id", "_task_id", "_node_id"):  # Flower's messages need a run outside a simulation too
        monkeypatch.setattr(TaskIdentity, name, 1)
    current = {"w": torch.zeros(4), "bn.running_mean": torch.zeros(2)}
    models = [{"w": torch.tensor([1.0, 1.0, -1.0, 1.0]), "bn.running_mean": torch.tensor([1.0, 0.0])},
              {"w": torch.tensor([1.0, -1.0, -1.0, 1.0]), "bn.running_mean": torch.tensor([3.0, 0.0])},
              {"w": torch.tensor([1.0, 1.0, 1.0, -1.0]), "bn.running_mean": torch.tensor([2.0, 0.0])}]
    strategy = RobustLR(threshold=3, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    strategy._global = current  # as configure_train keeps it
    replies = []
    for node, model in enumerate(models, start=1):
        sent = Message(content=RecordDict({"arrays": ArrayRecord(current)}), dst_node_id=node,
                       message_type=MessageType.TRAIN)
        replies.append(Message(content=RecordDict({"arrays": ArrayRecord(model),
                                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=sent))
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    # coordinate 0: all three agree (+1), the mean step stands; 1-3: a 2-1 split (< 3 votes), the mean step is negated
    assert torch.allclose(new["w"], torch.tensor([1.0, -1 / 3, 1 / 3, -1 / 3]))
    assert torch.equal(new["bn.running_mean"], torch.tensor([2.0, 0.0]))  # statistics averaged, no vote
    with pytest.raises(ConfigError, match="threshold must be at least 1"):
        RobustLR(threshold=0)
