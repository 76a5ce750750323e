"""The tensors `flain defend` writes for the shipped sample models, pinned: --preset paper as the paper's
defaults always wrote them, and the default rule as it has written them since it was chosen (2026-11-30).
defend reads no dataset, so these run everywhere; tests/test_e2e_fmnist.py measures what the tensors do."""

import hashlib
from pathlib import Path

import pytest

from flain_cli.checkpoint import load_checkpoint

from .conftest import invoke

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
# sha256 over (name, bytes) of every tensor written
PINS = {
    ("fmnist-cba-iid", "paper"): "12838ff506fd6623c31aca56acbcd77c1be878066f4261de40331dde4c9bc54e",
    ("fmnist-dba-noniid", "paper"): "677d4dfc6e7fce6a20f4a3271959e859f697d4c01b1d7cad011541248c409300",
    ("fmnist-cba-iid", "default"): "23a2e0f025ad4424216f56d59c15736ab6b630995523b9b58709775aa199386e",
    ("fmnist-dba-noniid", "default"): "717e74b635c3a74b2d0a502ed95011f4bcb789b51181533107220bb27dfa51b4",
}


def tensors_sha256(path: Path) -> str:
    tensors = load_checkpoint(path).tensors
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("sample", "preset"), sorted(PINS))
def test_the_sample_models_defended_tensors_are_pinned(sample, preset, tmp_path):
    folder = SAMPLES / sample
    out = tmp_path / "defended.safetensors"
    res = invoke("defend", folder / "final.safetensors", "--init", folder / "init.safetensors", "--aux",
                 folder / "aux", "--preset", preset, "--out", out)
    assert res.exit_code == 0, res.output
    assert tensors_sha256(out) == PINS[sample, preset]
