import pickle

import numpy as np
import pytest
import torch

from flain_cli.datasets import load_dataset, read_cifar_batch, read_idx
from flain_cli.errors import DataError

from .conftest import make_images, write_fmnist_like, write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images, labels = make_images(7, seed=3)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i", images, gz)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l", labels, gz)), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    good = write_idx(tmp_path / "cut", make_images(4, 0)[0])
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(good)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fmnist_layouts(tmp_path, layout):
    root = tmp_path / "data"
    write_fmnist_like(root if layout == "flat" else root / "FashionMNIST" / "raw", 50, 20, gz=layout == "flat")
    ds = load_dataset("fmnist", root)
    assert ds.train.images.shape == (50, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.test.labels.tolist() == [i % 10 for i in range(20)]
    assert ds.spec.num_classes == 10


def test_emnist_is_transposed_upright(tmp_path):
    images, labels = make_images(12, 0, classes=10)
    for split in ("train", "test"):
        write_idx(tmp_path / f"emnist-byclass-{split}-images-idx3-ubyte.gz", images.transpose(0, 2, 1), gz=True)
        write_idx(tmp_path / f"emnist-byclass-{split}-labels-idx1-ubyte.gz", labels, gz=True)
    ds = load_dataset("emnist", tmp_path)
    assert ds.spec.num_classes == 62
    assert np.array_equal(ds.train.images[:, 0].numpy(), images)


def test_missing_data_names_files_and_places(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message and "MNIST/raw" in message


def test_wrong_image_size_is_reported(tmp_path):
    for stem in ("train", "t10k"):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", np.zeros((3, 20, 20), np.uint8))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="expected \\(1, 28, 28\\)"):
        load_dataset("fmnist", tmp_path)


def _write_cifar(folder, n_per_batch=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n_per_batch).tolist()), b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.images.shape == (30, 3, 32, 32) and ds.test.images.shape == (6, 3, 32, 32)
    raw, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert np.array_equal(ds.test.images.numpy(), raw) and raw[0, 1, 0, 0] == raw.reshape(6, -1)[0, 1024]


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_cifar_reader_never_runs_pickled_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "PWNED").exists()
