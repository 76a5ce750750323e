import pytest
import torch

from flain_cli.errors import ConfigError
from flain_cli.triggers import TRIGGERS, make_trigger


def test_cba_28x28_is_a_5x5_block_of_255_at_23_to_27():
    trig = make_trigger("cba", 28, 28)
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    stamped = trig.stamp(images)
    assert stamped[:, :, 23:28, 23:28].eq(255).all()
    assert stamped.sum() == 2 * 25 * 255
    assert images.sum() == 0  # stamping returns a copy


def test_cba_cifar_is_a_4x4_block_of_10_on_every_channel():
    trig = make_trigger("cba", 32, 32)
    stamped = trig.stamp(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert stamped[:, :, 26:30, 26:30].eq(10).all()
    assert int(stamped.ne(0).sum()) == 3 * 16


@pytest.mark.parametrize("size,parts", [(28, 2), (32, 4)])
def test_dba_parts_are_disjoint_and_together_the_full_pattern(size, parts):
    trig = make_trigger("dba", size, size)
    assert len(trig.parts) == parts
    union = torch.zeros(size, size, dtype=torch.bool)
    for part in trig.parts:
        assert not (union & part).any()
        union |= part
    assert torch.equal(union, trig.full)
    assert [trig.part_for(k) for k in range(5)] == [k % parts for k in range(5)]


@pytest.mark.parametrize(("name", "shape", "part"), [("cba", (1, 28, 28), None), ("cba", (3, 32, 32), None),
                                                  ("dba", (1, 28, 28), 1)])
def test_stamp_rows_is_stamp_on_the_chosen_rows(name, shape, part):
    trig = make_trigger(name, *shape[1:])
    images = torch.randint(0, 256, (6, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([True, False, True, True, False, False])
    out = trig.stamp_rows(images, rows, trig.mask(part))
    assert torch.equal(out[rows], trig.stamp(images[rows], part)) and torch.equal(out[~rows], images[~rows])
    assert out.dtype == torch.uint8 and not torch.equal(out, images)


def test_dba_28x28_is_the_plus_centred_at_25_25():
    full = make_trigger("dba", 28, 28).full
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[25, 23:28] = True
    expected[23:28, 25] = True
    assert torch.equal(full, expected)


def test_client_stamps_only_its_part():
    trig = make_trigger("dba", 28, 28)
    stamped = trig.stamp(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), part=1)
    assert torch.equal(stamped[0, 0].bool(), trig.parts[1])


@pytest.mark.parametrize("n", [3, 5, 7, 9])
def test_pixel_variants_set_n_pixels(n):
    for size in (28, 32):
        assert int(make_trigger(f"pix{n}", size, size).full.sum()) == n


def test_triggers_are_registered_and_sizes_checked():
    assert {"cba", "dba", "pix3", "pix9"} <= set(TRIGGERS.names())
    with pytest.raises(ConfigError, match="28x28 and 32x32"):
        make_trigger("cba", 64, 64)
