import pytest
import torch

from flain_cli.aggregation import AggregatorSettings, apply_update, fedavg, rlr, weighted_mean
from flain_cli.errors import ConfigError


def test_fedavg_weights_by_data_size_and_server_lr():
    updates = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    step = fedavg(updates, [3.0, 1.0], AggregatorSettings(server_lr=2.0))
    # (3*[1,0] + 1*[0,4]) / 4 = [0.75, 1.0]; times alpha 2
    assert torch.allclose(step["w"], torch.tensor([1.5, 2.0]))


def test_rlr_flips_the_lr_where_signs_disagree():
    updates = [{"w": torch.tensor([1.0, 1.0, -1.0]), "bn.running_mean": torch.tensor([2.0])},
               {"w": torch.tensor([1.0, -1.0, -1.0]), "bn.running_mean": torch.tensor([-2.0])},
               {"w": torch.tensor([1.0, 1.0, -1.0]), "bn.running_mean": torch.tensor([2.0])}]
    settings = AggregatorSettings(server_lr=1.0, rlr_threshold=3, buffers={"bn.running_mean"})
    step = rlr(updates, [1.0, 1.0, 1.0], settings)
    # votes: [3, 1, -3]; |1| < 3 flips coordinate 1; the buffer is averaged, not voted on
    assert torch.allclose(step["w"], torch.tensor([1.0, -1.0 / 3, -1.0]))
    assert torch.allclose(step["bn.running_mean"], torch.tensor([2.0 / 3]))


def test_rlr_default_threshold_is_a_strict_majority():
    updates = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([-1.0])},
               {"w": torch.tensor([1.0])}]
    # m = 4, threshold 3: votes 2 < 3 -> flipped
    assert rlr(updates, [1.0] * 4, AggregatorSettings())["w"].item() == pytest.approx(-0.5)
    with pytest.raises(ConfigError):
        rlr(updates, [1.0] * 4, AggregatorSettings(rlr_threshold=0))


def test_apply_update_keeps_dtypes_and_rounds_integer_buffers():
    state = {"w": torch.tensor([1.0]), "n": torch.tensor(10)}
    step = weighted_mean([{"w": torch.tensor([0.5]), "n": torch.tensor(3)},
                          {"w": torch.tensor([0.5]), "n": torch.tensor(4)}], [1.0, 1.0])
    new = apply_update(state, step)
    assert new["n"].dtype == torch.int64 and new["n"].item() == 14  # 10 + 3.5 rounds to even 14
    assert new["w"].item() == 1.5
