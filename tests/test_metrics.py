import pytest
import torch
from torch import nn

from flain_cli.attack import AttackTask
from flain_cli.datasets import DATASETS, Split
from flain_cli.errors import ConfigError
from flain_cli.metrics import evaluate
from flain_cli.triggers import make_trigger

SPEC = DATASETS.get("fmnist")


class ReadsPixels(nn.Module):
    """Predicts the class written in pixel (0, 0) as 10*c, unless it is 'wrong' (pixel (0, 1) = 1);
    predicts 5 when the trigger corner is lit and pixel (0, 2) = 1 (a half-working backdoor)."""

    def forward(self, x):
        raw = (x * SPEC.std[0] + SPEC.mean[0]) * 255
        cls = (raw[:, 0, 0, 0] / 10).round().long()
        cls = torch.where(raw[:, 0, 0, 1].round() == 1, (cls + 1) % 10, cls)
        backdoor = (raw[:, 0, 25, 25].round() == 255) & (raw[:, 0, 0, 2].round() == 1)
        cls = torch.where(backdoor, torch.full_like(cls, 5), cls)
        return nn.functional.one_hot(cls, 10).float()


def _split():
    labels = torch.arange(100) % 10
    images = torch.zeros(100, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8) * 10
    images[:20, 0, 0, 1] = 1  # the first 20 are misclassified (two of each class)
    images[labels == 0, 0, 0, 2] = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    return Split(images, labels)


def test_acc_and_asr_on_a_hand_made_model():
    res = evaluate(ReadsPixels(), _split(), SPEC, AttackTask(0, 5), make_trigger("cba", 28, 28))
    assert res.acc == pytest.approx(0.8)
    assert res.per_class_acc == pytest.approx((0.8,) * 10)
    assert res.n_clean == 100 and res.n_triggered == 10
    assert res.asr == pytest.approx(0.3)  # 3 of the 10 source images carry the working backdoor
    assert res.asr_clean == 0.0  # without the trigger no class-0 image is called 5
    # task (4, 5): two class-4 images are called 5 with or without the trigger
    res = evaluate(ReadsPixels(), _split(), SPEC, AttackTask(4, 5), make_trigger("cba", 28, 28))
    assert res.asr == pytest.approx(0.2) and res.asr_clean == pytest.approx(0.2)


def test_all_to_one_counts_every_non_target_image():
    split = _split()
    res = evaluate(ReadsPixels(), split, SPEC, AttackTask(None, 5), make_trigger("cba", 28, 28))
    assert res.n_triggered == 90
    # 3 working backdoors on class 0, plus the 2 class-4 images the model already calls 5
    assert res.asr == pytest.approx(5 / 90)
    assert res.asr_clean == pytest.approx(2 / 90)


def test_no_attack_gives_no_asr():
    res = evaluate(ReadsPixels(), _split(), SPEC)
    assert res.asr is None and res.asr_clean is None and res.n_triggered == 0


def test_attack_task_parsing():
    assert AttackTask.parse("0:5", 10) == AttackTask(0, 5)
    assert AttackTask.parse("all:3", 10) == AttackTask(None, 3)
    for bad in ("0-5", "a:b", "0:10", "4:4", "0:5:1"):
        with pytest.raises(ConfigError):
            AttackTask.parse(bad, 10)


def test_asr_is_not_measured_when_the_split_holds_no_source_image(tiny_run, tmp_path):
    """No class-0 image to trigger: ASR and its floor are None (null in JSON), not a success rate of 0."""
    import json

    import numpy as np

    from .conftest import invoke, make_images
    images, labels = make_images(40, 5)
    keep = labels != 0
    test = tmp_path / "no-source.npz"
    np.savez(test, images=images[keep], labels=labels[keep].astype(np.int64))  # [N, H, W]: grey
    res = evaluate(ReadsPixels(), Split(torch.from_numpy(images[keep][:, None]), torch.from_numpy(labels[keep])),
                   SPEC, AttackTask(0, 5), make_trigger("cba", 28, 28))
    assert (res.asr, res.asr_clean, res.n_triggered) == (None, None, 0)
    run, _ = tiny_run
    report = invoke("eval", run / "final.safetensors", "--test", test, "--json")
    assert report.exit_code == 0, report.output
    assert (json.loads(report.stdout)["asr"], json.loads(report.stdout)["n_triggered"]) == (None, 0)
    table = invoke("eval", run / "final.safetensors", "--test", test)
    assert "ASR not measured, the test set holds no image of the source class" in " ".join(table.stderr.split())


def test_all_class_asr_and_ra_count_every_non_target_image():
    """The hand-made model: the three class-0 images with pixel (0, 2) lit (indices 0, 10, 20) go to 5 when
    triggered; the first 20 images are misread as the next class (the two of class 4 as 5, the target)."""
    res = evaluate(ReadsPixels(), _split(), SPEC, AttackTask(0, 5), make_trigger("cba", 28, 28))
    assert res.n_all == 90  # the 100 images less the 10 of the target class
    assert res.asr_all == pytest.approx(5 / 90)  # the three hijacked, and the two class-4 images misread as 5
    # wrong: the 18 misread non-target images, and index 20 (hijacked, not misread): 71 right
    assert res.ra == pytest.approx(71 / 90)
    assert res.acc == 0.8 and isinstance(res.acc, float) and str(res.acc) == "0.8"  # an exact fraction


def test_der_is_backdoorbench_s_rating():
    from flain_cli.metrics import EvalResult, der
    before = EvalResult(0.90, 0.98, 100, 10, (), asr_all=0.6)
    after = EvalResult(0.88, 0.02, 100, 10, (), asr_all=0.01)
    assert der(before, after) == pytest.approx((0.96 - 0.02 + 1) / 2)
    assert der(before, after, all_classes=True) == pytest.approx((0.59 - 0.02 + 1) / 2)
    better = EvalResult(0.95, 0.99, 100, 10, ())  # ACC up, ASR up: neither counts below zero
    assert der(before, better) == 0.5 and der(before, EvalResult(0.9, None, 100, 0, ())) is None


def test_a_class_the_model_always_misses_has_accuracy_zero_not_nan():
    split = _split()
    split.images[split.labels == 3, 0, 0, 1] = 1  # every class-3 image misclassified
    res = evaluate(ReadsPixels(), split, SPEC)
    assert res.per_class_acc[3] == 0.0 and res.per_class_acc[0] == pytest.approx(0.8)
