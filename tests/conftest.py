from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flain_cli.datasets import DEBIAN_FMNIST


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file, as the MNIST family ships it."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_images(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Small 28x28 images whose class is readable from a bright band (so a model can learn them)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c: 4 + 2 * c, 2:20] = 220
    return images, labels.astype(np.uint8)


def write_fmnist_like(root: Path, n_train: int = 400, n_test: int = 200, gz: bool = True) -> Path:
    suffix = ".gz" if gz else ""
    root.mkdir(parents=True, exist_ok=True)
    for stem, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        write_idx(root / f"{stem}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{stem}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """Tiny Fashion-MNIST-shaped IDX files (gzipped), written by the test."""
    return write_fmnist_like(tmp_path / "fmnist")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# CI sets FLAIN_REQUIRE_FMNIST=1: there a missing dataset fails the end-to-end tests instead of skipping them.
real_fmnist = pytest.mark.skipif(
    not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file() and not os.environ.get("FLAIN_REQUIRE_FMNIST"),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint pair (init, final) from `flain train` on tiny IDX files, plus its data folder."""
    from typer.testing import CliRunner

    from flain_cli.cli.app import app

    root = tmp_path_factory.mktemp("tiny")
    data = write_fmnist_like(root / "data", n_train=600, n_test=200)
    out = root / "run"
    res = CliRunner().invoke(app, ["train", "--data-dir", str(data), "--arch", "cnn-mnist", "--clients", "2",
                                   "--mcr", "0.5", "--pdr", "0.5", "--rounds", "2", "--batch-size", "32",
                                   "--seed", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, data


def invoke(*args):
    """Run the CLI in-process, every argument as a string; stdout and stderr stay apart."""
    from typer.testing import CliRunner

    from flain_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def aux_dir(tmp_path_factory) -> Path:
    """An aux folder of 6 tiny images per class (AUX/<class>/<i>.png)."""
    return write_aux_folder(tmp_path_factory.mktemp("aux") / "aux", per_class=6)


def write_aux_folder(root: Path, per_class: int = 5, seed: int = 2, names: list[str] | None = None,
                     size: int = 28, mode: str = "L") -> Path:
    from PIL import Image

    images, labels = make_images(per_class * 10, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert(mode).resize((size, size)).save(folder / f"{i}.png")
    return root
