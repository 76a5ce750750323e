import dataclasses
import os

import numpy as np
import pytest
import torch

from flain_cli.datasets import DATASETS, Dataset, Split
from flain_cli.errors import ConfigError
from flain_cli.simulation import TrainConfig, client_batches, make_clients, resolve_precision, simulate
from flain_cli.triggers import make_trigger

from .conftest import make_images


def _dataset(n_train=300, n_test=100):
    def split(n, seed):
        images, labels = make_images(n, seed)
        return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return Dataset(DATASETS.get("fmnist"), split(n_train, 0), split(n_test, 1))


CFG = TrainConfig(arch="cnn-mnist", clients=4, mcr=0.5, pdr=0.5, attack="0:5", trigger="dba", rounds=2,
                  batch_size=64, seed=3)


def test_malicious_clients_and_poisoning():
    data = _dataset()
    clients = make_clients(CFG, data, np.random.default_rng(0))
    assert CFG.malicious == [0, 1]
    for k, client in enumerate(clients):
        if k < 2:
            sources = int((data.train.labels[client.indices] == 0).sum())
            assert client.n_poisoned == int(0.5 * sources) > 0
            assert bool((data.train.labels[client.indices][client.poisoned] == 0).all())
            assert client.trigger_part == k % 2
        else:
            assert client.poisoned is None
    # batches: poisoned samples carry their client's trigger part and the target label
    trig = make_trigger("dba", 28, 28)
    xs, ys = zip(*client_batches(clients[1], data, trig, 5, 1000, torch.Generator().manual_seed(0)))
    x, y = torch.cat(xs), torch.cat(ys)
    assert int((y == 5).sum()) - int((data.train.labels[clients[1].indices] == 5).sum()) == clients[1].n_poisoned
    lit = x[:, 0][:, trig.parts[1]].eq(255).all(dim=1)
    assert int(lit.sum()) >= clients[1].n_poisoned
    assert data.train.images[:, :, 25, 23:28].ne(255).any()  # the stored dataset was not stamped


def test_client_batches_are_a_plain_loops_batches():
    """The elementwise gather/stamp/relabel gives, batch for batch, what boolean indexing gives."""
    data = _dataset()
    clients = make_clients(CFG, data, np.random.default_rng(0))
    trig = make_trigger("dba", 28, 28)
    for client in clients[:3]:  # two malicious clients (their own trigger parts) and a clean one
        gen, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        got = list(client_batches(client, data, trig, 5, 16, gen))
        perm = torch.randperm(len(client.indices), generator=ref)
        assert len(got) == -(-len(perm) // 16)
        for (x, y), start in zip(got, range(0, len(perm), 16)):
            pos = perm[start:start + 16]
            want_x, want_y = data.train.images[client.indices[pos]], data.train.labels[client.indices[pos]]
            if client.poisoned is not None:
                hit = client.poisoned[pos]
                want_x[hit] = trig.stamp(want_x[hit], client.trigger_part)
                want_y[hit] = 5
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
        assert torch.equal(gen.get_state(), ref.get_state())  # one draw per epoch, as before


def test_a_signal_swallowed_inside_a_finalizer_stops_training_after_the_client(monkeypatch):
    """Python drops what the handler raises inside a ``__del__``; the loop still stops at its next poll."""
    import signal
    import sys

    from flain_cli import signals
    from flain_cli.events import Listener
    monkeypatch.setattr(signals, "_received", None)
    swallowed: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_value))

    class Doomed:
        def __del__(self):
            signals.raise_on_signal(signal.SIGTERM, None)  # raises Interrupted; Python prints it and goes on

    class SignalAfterFirstClient(Listener):
        def __init__(self):
            self.done: list[tuple[int, int]] = []

        def client_done(self, rnd, client):
            self.done.append((rnd, client))
            if len(self.done) == 1:
                Doomed()  # dropped at once: its __del__ runs here

    listener = SignalAfterFirstClient()
    with pytest.raises(signals.Interrupted):
        simulate(CFG, _dataset(), listener=listener)
    assert [type(e) for e in swallowed] == [signals.Interrupted]  # Python did drop the handler's exception
    assert listener.done == [(1, listener.done[0][1])]  # one client, not the 2 rounds x 2 sampled


def test_mcr_floor():
    assert TrainConfig(clients=10, mcr=0.4).malicious == [0, 1, 2, 3]
    assert TrainConfig(clients=15, mcr=0.4).malicious == list(range(6))
    assert TrainConfig(clients=10, mcr=0.4, attack=None).malicious == []


def test_seeded_run_is_reproducible_bit_for_bit_and_the_seed_matters():
    data = _dataset()
    a, b = simulate(CFG, data), simulate(CFG, data)
    c = simulate(dataclasses.replace(CFG, seed=4), data)
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    assert all(torch.equal(a.init_state[k], b.init_state[k]) for k in a.init_state)
    assert not torch.equal(a.final_state["fc1.weight"], c.final_state["fc1.weight"])
    assert not torch.equal(a.init_state["fc1.weight"], a.final_state["fc1.weight"])
    assert [h.round for h in a.history] == [1, 2] and a.history[-1].acc is not None


def test_rlr_and_sampling_run():
    data = _dataset()
    res = simulate(dataclasses.replace(CFG, aggregator="rlr", sample_rate=0.5, rounds=1, eval_every=5), data)
    assert res.history[0].samples == 150  # 2 of 4 clients, 75 samples each
    assert res.history[0].acc is not None  # the last round is always evaluated


def test_rlr_is_applied_coordinate_by_coordinate():
    """One round from the same seed: the clients' updates are the same under both aggregators, so RLR's step is
    FedAvg's, negated exactly where the clients' signs disagree (|sum of signs| < 3 of 4 clients) and kept
    elsewhere. A run that ignored the aggregator setting would give FedAvg's step everywhere."""
    data = _dataset()
    one = dataclasses.replace(CFG, rounds=1, eval_every=5)
    avg, rlr = simulate(one, data), simulate(dataclasses.replace(one, aggregator="rlr"), data)
    assert all(torch.equal(avg.init_state[k], rlr.init_state[k]) for k in avg.init_state)
    w0 = avg.init_state["fc1.weight"]
    step_avg, step_rlr = avg.final_state["fc1.weight"] - w0, rlr.final_state["fc1.weight"] - w0
    assert torch.allclose(step_rlr.abs(), step_avg.abs(), atol=1e-6)
    flipped = (step_rlr * step_avg < 0)
    moved = step_avg.abs() > 1e-5
    share = float(flipped[moved].float().mean())
    assert 0.05 < share < 0.95, share  # some coordinates flipped, not all


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_close_to_fp32_and_is_recorded(precision):
    """Autocast changes the arithmetic, not the run: the same seeds give a nearby model, reproducibly."""
    data = _dataset()
    fp32 = simulate(CFG, data)
    cfg = dataclasses.replace(CFG, precision=precision)
    low, again = simulate(cfg, data), simulate(cfg, data)
    assert all(torch.equal(low.final_state[k], again.final_state[k]) for k in low.final_state)
    assert all(torch.equal(low.init_state[k], fp32.init_state[k]) for k in low.init_state)
    assert all(low.final_state[k].dtype == torch.float32 for k in low.final_state)  # the weights stay fp32
    w, w32, w0 = (s["fc1.weight"] for s in (low.final_state, fp32.final_state, fp32.init_state))
    assert not torch.equal(w, w32)
    assert float((w - w32).norm()) < 0.2 * float((w32 - w0).norm())  # the updates agree to within 20 %
    assert cfg.to_dict()["precision"] == precision and "precision" not in CFG.to_dict()  # fp32 keys as before


def test_auto_precision_is_resolved_before_a_run():
    with pytest.raises(ConfigError, match="^precision is auto: resolve it"):
        simulate(dataclasses.replace(CFG, precision="auto"), _dataset())
    with pytest.raises(ConfigError, match="^precision must be one of fp32, bf16, fp16, auto"):
        dataclasses.replace(CFG, precision="fp8").validate(10)
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    expected = "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "fp32"
    assert resolve_precision("auto", "cpu") == expected and resolve_precision("fp16", "cpu") == "fp16"
