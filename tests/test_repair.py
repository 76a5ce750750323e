"""The distillation repair on hand-made layers: frozen columns, a plain reference loop, bad settings."""

import copy

import pytest
import torch
from torch import nn

from flain_cli.errors import ConfigError
from flain_cli.repair import distill_repair, repair_loss
from flain_cli.settings import RepairSettings


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
    """A plain training loop: a whole network, Adam on everything, frozen columns put back after each step."""
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    net = nn.Sequential(layer, *copy.deepcopy(head))
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
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
    res = distill_repair(features, labels, teacher, weight, bias, head, frozen, RepairSettings(steps=30))
    assert torch.equal(res.weight[:, frozen], weight[:, frozen])
    assert not torch.equal(res.weight[:, ~frozen], weight[:, ~frozen])
    assert not torch.equal(res.bias, bias) and set(res.head) == {"1.weight", "1.bias"}
    assert res.loss_after < res.loss_before
    # the caller's head is not changed
    assert torch.equal(head[1].weight, problem()[5][1].weight)


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_equals_a_plain_training_loop(alpha):
    features, labels, teacher, weight, bias, head, frozen = problem(seed=3)
    settings = RepairSettings(steps=25, lr=0.01, alpha=alpha, temperature=3.0)
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
    nobias = distill_repair(features, labels, teacher, weight, None, head, frozen, RepairSettings(steps=5))
    assert nobias.bias is None and torch.equal(nobias.weight[:, frozen], weight[:, frozen])


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 2.5}, {"lr": 0.0}, {"lr": float("nan")}, {"alpha": 1.5},
                                 {"alpha": -0.1}, {"temperature": 0.0}, {"temperature": float("inf")}])
def test_bad_settings_are_refused(bad):
    features, labels, teacher, weight, bias, head, frozen = problem()
    with pytest.raises(ConfigError, match="repair"):
        distill_repair(features, labels, teacher, weight, bias, head, frozen, RepairSettings(**bad))


def test_a_mask_of_the_wrong_size_is_refused():
    features, labels, teacher, weight, bias, head, frozen = problem()
    with pytest.raises(ConfigError):
        distill_repair(features, labels, teacher, weight, bias, head, frozen[:-1])
