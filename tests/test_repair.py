"""The distillation repair on hand-made layers: frozen columns, a plain reference loop, bad settings."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from flain_cli import repair as repair_module
from flain_cli.errors import ConfigError
from flain_cli.repair import GUARD_COPIES, distill_repair, guard_inputs, repair_loss
from flain_cli.settings import REPAIR_LR, SGD_MOMENTUM, DefenseConfig, RepairSettings

ADAM = RepairSettings().with_optimizer("adam")  # the repair the tests below were written for


def adam(**settings) -> RepairSettings:
    return dataclasses.replace(ADAM, **settings)


def problem(seed=0, n=48, d=12, h=6, k=4):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(h, d, generator=g, dtype=torch.float64)
    bias = torch.randn(h, generator=g, dtype=torch.float64)
    head = nn.Sequential(nn.ReLU(), nn.Linear(h, k)).double()
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(k, h, generator=g, dtype=torch.float64))
        teacher = head(features @ (weight + 0.3).T + bias)  # the "original" model
    labels = teacher.argmax(1)
    labels[:5] = (labels[:5] + 1) % k
    frozen = torch.zeros(d, dtype=torch.bool)
    frozen[[1, 4, 7]] = True
    return features, labels, teacher, weight, bias, head, frozen


def reference(features, labels, teacher, weight, bias, head, frozen, settings):
    """A plain training loop: a whole network, the optimizer on everything, frozen columns put back after each step."""
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    net = nn.Sequential(layer, *copy.deepcopy(head))
    opt = (torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=SGD_MOMENTUM) if settings.optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=settings.lr))
    kept = weight[:, frozen].clone()
    for _ in range(settings.steps):
        opt.zero_grad()
        repair_loss(net(features), teacher, labels, settings).backward()
        opt.step()
        with torch.no_grad():
            layer.weight[:, frozen] = kept
    return net


def test_frozen_columns_stay_bit_for_bit_and_the_rest_moves():
    features, labels, teacher, weight, bias, head, frozen = problem()
    res = distill_repair(features, labels, teacher, weight, bias, head, frozen, adam(steps=30))
    assert torch.equal(res.weight[:, frozen], weight[:, frozen])
    assert not torch.equal(res.weight[:, ~frozen], weight[:, ~frozen])
    assert not torch.equal(res.bias, bias) and set(res.head) == {"1.weight", "1.bias"}
    assert res.loss_after < res.loss_before
    # the caller's head is not changed
    assert torch.equal(head[1].weight, problem()[5][1].weight)


@pytest.mark.parametrize(("alpha", "optimizer", "lr"), [(0.0, "adam", 0.01), (0.8, "adam", 0.01), (1.0, "adam", 0.01),
                                                        (0.8, "sgd", 0.1), (0.0, "sgd", 0.05)])
def test_equals_a_plain_training_loop(alpha, optimizer, lr):
    features, labels, teacher, weight, bias, head, frozen = problem(seed=3)
    settings = RepairSettings(steps=25, lr=lr, alpha=alpha, temperature=3.0, optimizer=optimizer)
    res = distill_repair(features, labels, teacher, weight, bias, head, frozen, settings)
    net = reference(features, labels, teacher, weight, bias, head, frozen, settings)
    assert torch.allclose(res.weight, net[0].weight, atol=1e-10)
    assert torch.allclose(res.bias, net[0].bias, atol=1e-10)
    assert torch.allclose(res.head["1.weight"], net[2].weight, atol=1e-10)


def test_deterministic_and_without_bias():
    features, labels, teacher, weight, bias, head, frozen = problem(seed=5)
    a = distill_repair(features, labels, teacher, weight, bias, head, frozen)
    b = distill_repair(features, labels, teacher, weight, bias, head, frozen)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.head["1.weight"], b.head["1.weight"])
    nobias = distill_repair(features, labels, teacher, weight, None, head, frozen, adam(steps=5))
    assert nobias.bias is None and torch.equal(nobias.weight[:, frozen], weight[:, frozen])


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 2.5}, {"lr": 0.0}, {"lr": float("nan")}, {"alpha": 1.5},
                                 {"alpha": -0.1}, {"temperature": 0.0}, {"temperature": float("inf")},
                                 {"guard": -1.0}, {"guard": float("nan")}, {"guard_ratio": 0.0},
                                 {"guard_rate": 0.0}, {"guard_rate": 1.5}, {"optimizer": "rmsprop"},
                                 {"patches": -1}, {"patches": 65}, {"patches": 1.5}, {"patches": True}])
def test_bad_settings_are_refused(bad):
    features, labels, teacher, weight, bias, head, frozen = problem()
    with pytest.raises(ConfigError, match="repair"):
        distill_repair(features, labels, teacher, weight, bias, head, frozen, adam(**bad))


def test_sgd_moves_the_weights_of_a_near_silent_input_less_than_adam():
    features, labels, teacher, weight, bias, head, frozen = problem(seed=7)
    features[:, 0] *= 1e-4  # an input nearly silent on these images, not flipped
    moved = {}
    for optimizer in ("adam", "sgd"):
        res = distill_repair(features, labels, teacher, weight, bias, head, frozen,
                             RepairSettings(steps=30, optimizer=optimizer, lr=REPAIR_LR[optimizer]))
        change = (res.weight - weight).abs()
        moved[optimizer] = float(change[:, 0].mean() / change[:, ~frozen].mean())
        assert torch.equal(res.weight[:, frozen], weight[:, frozen])
    assert moved["sgd"] < 1e-3 < 0.1 < moved["adam"]  # Adam moves it about as much as a busy input


def test_the_optimizer_is_recorded_and_records_without_one_read_as_adam():
    assert RepairSettings().record()["optimizer"] == "sgd" and ADAM.record()["optimizer"] == "adam"
    assert RepairSettings.from_record(ADAM.record()) == ADAM
    old = {k: v for k, v in ADAM.record().items() if k != "optimizer"}  # written when Adam was the only one
    assert RepairSettings.from_record(old) == ADAM
    assert DefenseConfig().rule == "flain+shifts+klshift+distill+sgd"
    assert DefenseConfig(shifts=0, repair=ADAM).rule == "flain+klshift+distill"


def test_a_mask_of_the_wrong_size_is_refused():
    features, labels, teacher, weight, bias, head, frozen = problem()
    with pytest.raises(ConfigError):
        distill_repair(features, labels, teacher, weight, bias, head, frozen[:-1])


def test_guard_inputs_switch_on_only_the_lowest_mean_candidates():
    features, *_ = problem(n=400, d=40)
    activations = torch.linspace(0, 1, 40).flip(0)  # input 39 has the lowest mean, input 0 the highest
    settings = adam(guard=1.0, guard_ratio=2.0, guard_rate=0.2)
    perturbed = guard_inputs(features, activations, 5, settings)  # 5 flipped -> the 10 lowest are candidates
    assert perturbed.shape == (GUARD_COPIES * 400, 40)
    on = perturbed != features.repeat(GUARD_COPIES, 1)
    assert not on[:, :30].any() and on[:, 30:].any()
    assert 0.15 < float(on[:, 30:].double().mean()) < 0.25  # about guard_rate of the candidates
    strong = float(features.max(0).values.median())
    assert torch.allclose((perturbed - features.repeat(GUARD_COPIES, 1))[on], torch.tensor(strong, dtype=torch.float64))
    assert torch.equal(perturbed, guard_inputs(features, activations, 5, settings))  # a fixed draw


def test_the_guard_keeps_the_outputs_when_silent_inputs_fire():
    """What the guard is for: after a repair with it, switching low-activation inputs on moves the outputs
    away from the teacher's less than after the plain repair; the frozen columns stay as they were."""
    features, labels, teacher, weight, bias, head, frozen = problem(seed=7, n=200, d=30)
    activations = features.mean(0)
    settings = adam(steps=150, lr=0.01)
    guarded = adam(steps=150, lr=0.01, guard=1.0, guard_ratio=3.0, guard_rate=0.2)
    probe = guard_inputs(features, activations, int(frozen.sum()), dataclasses.replace(guarded, guard_rate=0.3))

    def drift(res):
        net = copy.deepcopy(head)
        net.load_state_dict({k: v for k, v in res.head.items()})
        with torch.no_grad():
            out = net(probe @ res.weight.T + res.bias)
        return float(repair_loss(out, teacher.repeat(GUARD_COPIES, 1), labels.repeat(GUARD_COPIES),
                                 adam(alpha=1.0)))

    plain = distill_repair(features, labels, teacher, weight, bias, head, frozen, settings, activations)
    guard = distill_repair(features, labels, teacher, weight, bias, head, frozen, guarded, activations)
    assert torch.equal(guard.weight[:, frozen], weight[:, frozen])
    assert drift(guard) < 0.8 * drift(plain)
    # off by default: the activations change nothing then
    assert torch.equal(plain.weight, distill_repair(features, labels, teacher, weight, bias, head, frozen,
                                                     settings).weight)
    with pytest.raises(ConfigError, match="guard needs the mean activation"):
        distill_repair(features, labels, teacher, weight, bias, head, frozen, guarded)


def test_a_signal_that_something_swallowed_stops_the_repair_at_its_next_step(monkeypatch):
    import signal

    from flain_cli import signals
    monkeypatch.setattr(signals, "_received", signal.SIGTERM)  # the handler ran; its exception went nowhere
    features, labels, teacher, weight, bias, head, frozen = problem()
    with pytest.raises(signals.Interrupted) as info:
        distill_repair(features, labels, teacher, weight, bias, head, frozen, adam(steps=30))
    assert info.value.exit_code == 143
    monkeypatch.setattr(signals, "_received", None)  # no signal: the poll does nothing
    assert distill_repair(features, labels, teacher, weight, bias, head, frozen, adam(steps=3)).loss_after


def test_the_patch_term_trains_towards_the_clean_outputs_and_keeps_the_flip():
    """Patched copies add a distillation term; without their inputs the repair refuses, with them it is
    deterministic, keeps the flipped columns bit for bit and differs from the repair without them."""
    features, labels, teacher, weight, bias, head, frozen = problem()
    settings = adam(steps=20, patches=2)
    with pytest.raises(ConfigError, match="patched copies"):
        distill_repair(features, labels, teacher, weight, bias, head, frozen, settings)
    patched = features.repeat(2, 1) + 0.5 * torch.rand(2 * len(features), features.shape[1],
                                                        generator=torch.Generator().manual_seed(3))
    a = distill_repair(features, labels, teacher, weight, bias, head, frozen, settings, patched=patched)
    b = distill_repair(features, labels, teacher, weight, bias, head, frozen, settings, patched=patched)
    plain = distill_repair(features, labels, teacher, weight, bias, head, frozen, adam(steps=20))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight[:, frozen], weight[:, frozen])
    assert not torch.equal(a.weight, plain.weight)
    # the patched copies' target is the teacher on the clean images, copy after copy (distillation only)
    with torch.no_grad():
        patch_term = repair_loss(head(torch.addmm(bias, patched, weight.T)), teacher.repeat(2, 1), labels.repeat(2),
                                 dataclasses.replace(settings, alpha=1.0))
    assert a.loss_before == pytest.approx(plain.loss_before + float(patch_term), rel=1e-12)
    # patched inputs equal to the clean ones add a second copy of the distillation term, the same target:
    # twice the loss, which Adam's steps do not see (it divides by the gradients' scale)
    same = distill_repair(features, labels, teacher, weight, bias, head, frozen,
                          adam(steps=20, alpha=1.0, patches=1), patched=features.clone())
    once = distill_repair(features, labels, teacher, weight, bias, head, frozen, adam(steps=20, alpha=1.0))
    assert torch.allclose(same.weight, once.weight, atol=1e-6) and not torch.allclose(a.weight, once.weight, atol=1e-6)


def steep_problem():
    """problem(2) with inputs 30 times larger and the weights 30 times smaller: SGD at lr 1 diverges, at 1/3 not."""
    torch.manual_seed(0)  # the head's bias
    features, labels, teacher, weight, bias, head, frozen = problem(seed=2)
    return features * 30, labels, teacher, weight / 30, bias, head, frozen


def test_a_diverging_run_is_run_again_at_a_third_of_the_learning_rate():
    features, labels, teacher, weight, bias, head, frozen = steep_problem()
    steep = RepairSettings(steps=20, lr=1.0, optimizer="sgd", backtrack=0)
    alone = distill_repair(features, labels, teacher, weight, bias, head, frozen, steep)
    assert alone.loss_after > alone.loss_before  # off: the diverged run is what comes back
    res = distill_repair(features, labels, teacher, weight, bias, head, frozen, dataclasses.replace(steep, backtrack=3))
    assert res.kept and res.loss_after <= res.loss_before
    assert res.diverged == ((1.0, alone.loss_after),) and res.lr == pytest.approx(1 / 3)
    # the kept run is the one a single run at its learning rate gives
    once = distill_repair(features, labels, teacher, weight, bias, head, frozen, dataclasses.replace(steep, lr=res.lr))
    assert torch.equal(res.weight, once.weight) and torch.equal(res.head["1.weight"], once.head["1.weight"])
    gentle = dataclasses.replace(steep, lr=0.05, backtrack=3)  # a run that converges is the only one
    res = distill_repair(features, labels, teacher, weight, bias, head, frozen, gentle)
    assert res.diverged == () and res.lr == 0.05


@pytest.mark.parametrize("final", [float("nan"), 9.0])
def test_when_every_run_diverges_the_layers_come_back_as_they_were(monkeypatch, final):
    features, labels, teacher, weight, bias, head, frozen = problem(seed=2)
    tried = []

    def diverging(*args):
        tried.append(args[7].lr)
        return dataclasses.replace(real(*args), loss_after=final)

    real = repair_module._distill_once
    monkeypatch.setattr(repair_module, "_distill_once", diverging)
    res = distill_repair(features, labels, teacher, weight, bias, head, frozen, RepairSettings(lr=0.9, backtrack=2))
    assert tried == pytest.approx([0.9, 0.3, 0.1]) and not res.kept
    assert [lr for lr, _ in res.diverged] == tried
    assert torch.equal(res.weight, weight) and torch.equal(res.bias, bias)
    assert torch.equal(res.head["1.weight"], head[1].weight) and res.loss_after == res.loss_before


def test_records_without_backtrack_read_as_off():
    record = RepairSettings().record()
    assert record["backtrack"] == 3
    del record["backtrack"]
    assert RepairSettings.from_record(record).backtrack == 0
