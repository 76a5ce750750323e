"""FLAIN and pruning on hand-made layers where the right answer is known by hand, and the
fast search against Algorithm 1 followed step by step."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flain_cli.defense import first_k_covering, flip_updates, prune_columns, rescale, search_fast, search_plain
from flain_cli.errors import ConfigError
from flain_cli.settings import PRESETS, KlStop, make_stop

W0 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
W = torch.tensor([[2.0, 0.0, 3.5], [3.0, 5.5, 8.0]])  # dW = [[1, -2, .5], [-1, .5, 2]]
X = torch.tensor([0.0, 0.5, 2.0])


def cfg(stop: str = "accuracy", rho: float = 0.03, kl: float = 0.07, **settings):
    """The paper's search settings with some replaced (the stop by its name and budgets)."""
    return dataclasses.replace(PRESETS["paper"], stop=make_stop(stop, rho if stop == "accuracy" else kl), **settings)


def losing(per_column: float = 0.02):
    """Aux accuracy 1.0 minus `per_column` for every column that differs from W."""
    calls = []

    def evaluate(weight, changed=None):
        calls.append(weight.clone())
        n_changed = int((weight != W).any(dim=0).sum())
        return 1.0 - per_column * n_changed

    evaluate.calls = calls
    return evaluate


@pytest.mark.parametrize("search", [search_plain, search_fast])
def test_flain_stops_where_the_drop_reaches_rho_and_rescales(search):
    res = search(W, W0, X, losing(), cfg(step=0.1, rho=0.03))
    # lambda 0.1 flips column 0 (drop 0.02 < rho); lambda 0.5 adds column 1 (drop 0.04 >= rho): stop
    assert res.lam == pytest.approx(0.5) and res.mask.tolist() == [True, True, False]
    assert res.acc0 == 1.0 and res.acc_kept == pytest.approx(0.96) and not res.all_selected
    unscaled = torch.tensor([[0.0, 4.0, 3.5], [5.0, 4.5, 8.0]])  # W0 - dW on columns 0 and 1
    expected = unscaled * (torch.linalg.matrix_norm(W) / torch.linalg.matrix_norm(unscaled))
    assert torch.allclose(res.weight, expected)
    assert float(torch.linalg.matrix_norm(res.weight)) == pytest.approx(float(torch.linalg.matrix_norm(W)))
    assert res.steps == 5 and res.changed == 2


def test_the_fast_search_evaluates_only_where_the_selection_changes():
    plain, fast = losing(), losing()
    search_plain(W, W0, X, plain, cfg(step=0.1, rho=0.03))
    search_fast(W, W0, X, fast, cfg(step=0.1, rho=0.03))
    assert len(plain.calls) == 1 + 5  # acc0, then lambda = 0.1 .. 0.5
    assert len(fast.calls) == 1 + 2  # acc0, lambda = 0.1 and 0.5


@pytest.mark.parametrize("search", [search_plain, search_fast])
def test_the_kl_stop_fires_at_the_first_divergence_over_its_budget(search):
    evaluate = losing(per_column=0.0)  # the aux accuracy never moves: the paper's stop would flip everything

    def divergence():  # of the weight last evaluated: 0.3 per changed column
        return 0.3 * int((evaluate.calls[-1] != W).any(dim=0).sum())

    res = search(W, W0, X, evaluate, cfg(step=0.1, rho=0.03, stop="kl", kl=0.5), divergence=divergence)
    # lambda 0.1 flips column 0 (0.3 < 0.5); lambda 0.5 adds column 1 (0.6 >= 0.5): stop there
    assert res.lam == pytest.approx(0.5) and res.mask.tolist() == [True, True, False] and not res.all_selected
    assert res.kl_kept == pytest.approx(0.6) and res.config.stop == KlStop(0.5)
    assert [s.kl for s in res.trace][-1] == pytest.approx(0.6) and all(s.kl < 0.5 for s in res.trace[:-1])
    assert search(W, W0, X, losing(per_column=0.0), cfg(step=0.1, rho=0.03)).all_selected
    last_safe = search(W, W0, X, evaluate, cfg(step=0.1, rho=0.03, stop="kl", kl=0.5, select="last-safe"),
                       divergence=divergence)
    assert last_safe.mask.tolist() == [True, False, False] and last_safe.kl_kept == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="^divergence is needed for the kl stop") as caught:
        search(W, W0, X, evaluate, cfg(step=0.1, stop="kl", kl=0.5))  # no divergence measure
    assert caught.value.param == "divergence"
    # the library names its parameters (the CLI says --stop: tests/test_bad_input.py)
    with pytest.raises(ConfigError, match="^stop must be one of accuracy, kl, got 'loss'$") as caught:
        search(W, W0, X, evaluate, cfg(step=0.1, stop="loss"))
    assert (caught.value.param, caught.value.detail) == ("stop", "must be one of accuracy, kl, got 'loss'")


def test_a_kl_budget_in_shift_units_is_that_many_of_the_models_shift_kl():
    """The search reads nats: the shift unit's budget times the measured shift KL; a model whose outputs do not
    move gives no unit (one error naming the way out), and an unknown unit is refused by name."""
    stop = make_stop("kl", None, "shift")
    assert stop == KlStop(1.5, "shift") and stop.label == "kl1.5xshift" and stop.record()["kl_unit"] == "shift"
    assert stop.in_nats(0.04) == KlStop(1.5 * 0.04) and "kl_unit" not in KlStop().record()
    assert make_stop("kl", 2.0, "shift").in_nats(0.1).kl == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="shift KL on the aux set is 0: it gives no budget.*pass kl_unit nats"):
        stop.in_nats(0.0)
    with pytest.raises(ConfigError, match="^kl_unit must be one of nats, shift, got 'bits'$"):
        make_stop("kl", 0.1, "bits")
    with pytest.raises(ConfigError, match="^kl_unit must be one of nats, shift, got 'bits'$"):
        KlStop(0.1, "bits").check()


@pytest.mark.parametrize("search", [search_plain, search_fast])
def test_last_safe_keeps_the_model_before_the_crossing(search):
    res = search(W, W0, X, losing(), cfg(step=0.1, rho=0.03, select="last-safe"))
    assert res.lam == pytest.approx(0.4) and res.mask.tolist() == [True, False, False]
    assert res.acc_kept == pytest.approx(0.98)


@pytest.mark.parametrize("search", [search_plain, search_fast])
def test_rho_zero_stops_at_the_first_threshold(search):
    res = search(W, W0, X, losing(), cfg(step=0.1, rho=0.0))
    assert res.lam == pytest.approx(0.1) and res.mask.tolist() == [True, False, False]
    safe = search(W, W0, X, losing(), cfg(step=0.1, rho=0.0, select="last-safe"))
    assert safe.changed == 0 and torch.equal(safe.weight, W)  # nothing changed, bit for bit


@pytest.mark.parametrize("search", [search_plain, search_fast])
def test_every_neuron_flipped_before_rho_is_reached(search):
    res = search(W, W0, X, lambda w, changed=None: 1.0, cfg(step=0.1, rho=0.03))
    assert res.all_selected and res.mask.all() and res.lam == pytest.approx(2.0)
    unscaled = 2 * W0 - W
    assert torch.allclose(res.weight, unscaled * torch.linalg.matrix_norm(W) / torch.linalg.matrix_norm(unscaled))


@pytest.mark.parametrize("search", [search_plain, search_fast])
def test_pruning_zeroes_the_selected_columns_without_rescale(search):
    res = search(W, W0, X, losing(), cfg(step=0.1, rho=0.03, method="prune"))
    assert res.mask.tolist() == [True, True, False]
    assert torch.equal(res.weight, torch.tensor([[0.0, 0.0, 3.5], [0.0, 0.0, 8.0]]))


def test_unselected_columns_stay_bit_identical_before_rescale():
    mask = torch.tensor([False, True, False])
    flipped = flip_updates(W, W0, mask)
    assert torch.equal(flipped[:, [0, 2]], W[:, [0, 2]])
    assert torch.equal(flipped[:, 1], W0[:, 1] - (W[:, 1] - W0[:, 1]))
    assert torch.equal(prune_columns(W, W0, mask)[:, 1], torch.zeros(2))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_flipping_twice_restores_the_weights(z, seed):
    g = torch.Generator().manual_seed(seed)
    w, w0 = torch.randn(4, z, generator=g), torch.randn(4, z, generator=g)
    mask = torch.rand(z, generator=g) < 0.5
    assert torch.allclose(flip_updates(flip_updates(w, w0, mask), w0, mask), w, atol=1e-5)


def test_rescale_hits_the_norm():
    w = torch.randn(5, 7)
    assert float(torch.linalg.matrix_norm(rescale(w, 3.0))) == pytest.approx(3.0, rel=1e-6)


def test_first_k_covering_matches_the_plain_thresholds():
    mu, step = 0.1234, 0.001
    for value in (0.1234, 0.1244, 0.12440000001, 0.5, 0.1235):
        k = first_k_covering(mu, value, step)
        assert mu + k * step >= value and (k == 1 or mu + (k - 1) * step < value)


def test_bad_parameters():
    for kwargs in ({"step": 0}, {"rho": 1.5}, {"select": "best"}, {"method": "erase"}):
        with pytest.raises(ConfigError):
            search_fast(W, W0, X, losing(), cfg(**kwargs))
    with pytest.raises(ConfigError):
        search_fast(W, W0[:, :2], X, losing(), cfg())


@settings(max_examples=60, deadline=None)
@given(z=st.integers(1, 24), seed=st.integers(0, 2**31 - 1), step=st.sampled_from([0.01, 0.02, 0.05, 0.003]),
       rho=st.floats(0.0, 0.3), method=st.sampled_from(["flain", "prune"]),
       select=st.sampled_from(["crossing", "last-safe"]), levels=st.integers(2, 12))
def test_fast_search_equals_algorithm_1_step_by_step(z, seed, step, rho, method, select, levels):
    """Random layers, random aux features (with ties in x): same lambda, neurons and weights."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(6, z, generator=g)
    w = w0 + 0.5 * torch.randn(6, z, generator=g)
    x = torch.randint(0, levels, (z,), generator=g).float() / levels  # ties on purpose
    features = torch.rand(40, z, generator=g) * (x + 0.05)
    labels = (features @ w.T).argmax(dim=1)
    labels[:8] = torch.randint(0, 6, (8,), generator=g)

    def evaluate(weight, changed=None):
        if changed is not None:  # the hint must be right: no other column moved since the last call
            moved = torch.nonzero((weight != last[0]).any(dim=0)).flatten()
            assert set(moved.tolist()) <= set(changed.tolist())
        last[0] = weight.clone()
        return float(((features @ weight.T).argmax(dim=1) == labels).float().mean())

    last = [w]

    plain = search_plain(w, w0, x, evaluate, cfg(step=step, rho=rho, method=method, select=select))
    fast = search_fast(w, w0, x, evaluate, cfg(step=step, rho=rho, method=method, select=select))
    assert fast.lam == plain.lam
    assert torch.equal(fast.mask, plain.mask)
    assert torch.equal(fast.weight, plain.weight)
    assert (fast.acc_kept, fast.all_selected, fast.steps) == (plain.acc_kept, plain.all_selected, plain.steps)
    assert fast.evaluations <= plain.evaluations
    plain_by_lam = {s.lam: s for s in plain.trace}
    assert all(plain_by_lam[s.lam] == s for s in fast.trace)
