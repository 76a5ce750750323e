import math

import pytest
import torch

from flain_cli.errors import ConfigError
from flain_cli.triggers import TRIGGERS, TriggerSpec, make_trigger, stamp_rows


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
                                                  ("dba", (1, 28, 28), 1), ("checker", (1, 28, 28), None),
                                                  ("blend", (3, 32, 32), None), ("sig", (1, 28, 28), None)])
def test_stamp_rows_is_stamp_on_the_chosen_rows(name, shape, part):
    trig = make_trigger(name, *shape[1:], channels=shape[0])
    images = torch.randint(0, 256, (6, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([True, False, True, True, False, False])
    out = stamp_rows(images, rows, trig.stamper(part))
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


def test_blend_follows_its_formula_exactly():
    """x' = round((1 - alpha) x + alpha p), pixel by pixel, with the seeded noise pattern (the same every time)."""
    trig = make_trigger(TriggerSpec("blend", alpha=0.2), 28, 28)
    again = make_trigger("blend", 28, 28)
    assert torch.equal(trig.pattern, again.pattern) and again.alpha == 0.15  # the default weight
    assert trig.pattern.shape == (1, 28, 28) and trig.pattern.float().std() > 50  # noise over the whole image
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = trig.stamp(images)
    for value, pattern, blended in zip(images.flatten().tolist()[:500], trig.pattern.expand(4, 1, 28, 28)
                                       .flatten().tolist()[:500], out.flatten().tolist()[:500]):
        assert blended == round(0.8 * value + 0.2 * pattern)  # Python's round: half to even, as torch's
    assert out.dtype == torch.uint8 and not torch.equal(out, images)


def test_blend_takes_a_png_and_refuses_one_of_the_wrong_size(tmp_path):
    from PIL import Image

    from flain_cli.errors import ConfigError
    Image.new("L", (28, 28), color=200).save(tmp_path / "p.png")
    trig = make_trigger(TriggerSpec("blend", alpha=0.5, image=str(tmp_path / "p.png")), 28, 28)
    assert trig.stamp(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)).eq(100).all()
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    with pytest.raises(ConfigError, match="is 10x10; the model takes 28x28"):
        make_trigger(TriggerSpec("blend", image=str(tmp_path / "small.png")), 28, 28)


def test_sig_adds_a_horizontal_sinusoid_to_every_row():
    trig = make_trigger("sig", 28, 28)
    flat = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    out = trig.stamp(flat)
    wave = [round(100 + 20 * math.sin(2 * math.pi * 6 * j / 28)) for j in range(28)]
    assert out[0, 0, 0].tolist() == wave and all(out[0, 0, r].tolist() == wave for r in range(28))
    assert trig.stamp(torch.full((1, 1, 28, 28), 250, dtype=torch.uint8)).max() == 255  # clipped


def test_the_checkerboard_sits_where_it_is_told():
    trig = make_trigger(TriggerSpec("checker", pos=(2, 5)), 28, 28)
    out = trig.stamp(torch.full((1, 1, 28, 28), 7, dtype=torch.uint8))[0, 0]
    assert out[2:6, 5:9].tolist() == [[255 if (r + c) % 2 == 0 else 0 for c in range(5, 9)] for r in range(2, 6)]
    out[2:6, 5:9] = 7
    assert out.eq(7).all()  # nothing else touched
    default = make_trigger("checker", 28, 28)
    assert torch.nonzero(default.full).min(0).values.tolist() == [1, 1]  # top-left, away from the CBA block


@pytest.mark.parametrize(("spec", "message"), [
    (TriggerSpec("cba", alpha=0.1), "trigger_alpha is the blend trigger's weight"),
    (TriggerSpec("blend", alpha=1.5), "trigger_alpha must be in \\(0, 1\\]"),
    (TriggerSpec("sig", image="x.png"), "trigger_image at training time is blend's pattern"),
    (TriggerSpec("cba", pos=(0, 0)), "trigger_pos places the checker trigger"),
    (TriggerSpec("checker", pos=(26, 0)), "puts the 4x4 checkerboard outside the 28x28 image"),
])
def test_bad_trigger_settings_are_refused(spec, message):
    from flain_cli.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        make_trigger(spec, 28, 28)


def test_a_spec_reads_back_from_its_record(tmp_path):
    from PIL import Image
    Image.new("L", (28, 28), color=9).save(tmp_path / "p.png")
    for spec in (TriggerSpec("blend", 0.1, str(tmp_path / "p.png")), TriggerSpec("checker", pos=(3, 4)),
                 TriggerSpec("sig"), TriggerSpec("dba")):
        assert TriggerSpec.from_record({"trigger": spec.name} | spec.record()) == spec
    Image.new("L", (28, 28), color=10).save(tmp_path / "p.png")  # the image changed since training
    from flain_cli.errors import ConfigError
    with pytest.raises(ConfigError, match="is not the trigger image the model was trained with"):
        TriggerSpec.from_record({"trigger": "blend"} | TriggerSpec("blend", image=str(tmp_path / "p.png")).record()
                                | {"trigger_image_sha256": "0" * 64})
