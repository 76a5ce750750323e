"""Real datasets in their standard file formats, held once in memory as uint8 tensors.

- ``fmnist``, ``mnist``, ``emnist`` (byclass): IDX files, gzipped or not, flat in a folder or in
  torchvision's ``<root>/<Name>/raw/`` layout; Fashion-MNIST is also found in Debian's
  ``dataset-fashion-mnist`` package.
- ``cifar10``: the ``cifar-10-batches-py`` pickles, read by an unpickler that only accepts
  numpy arrays, lists, dicts and scalars (never arbitrary code).

Images are kept as uint8 ``[N, C, H, W]``; triggers are stamped into these raw pixels and the
normalization is applied per batch (:meth:`DatasetSpec.normalize`).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .catalog import DATASETS
from .errors import DataError, opt

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def without(self, images: torch.Tensor, labels: torch.Tensor) -> Split:
        """This split without every image that also stands, pixel for pixel and with its label, in ``images``:
        the test images an aux set drawn from this split does not hold, for scoring a defense on data it never
        saw (the labs; the CLI scores on the whole split, as the paper does)."""
        def key(image: torch.Tensor, label: int) -> tuple[bytes, int]:
            return image.contiguous().numpy().tobytes(), label

        taken = {key(image, int(label)) for image, label in zip(images, labels.tolist())}
        keep = torch.tensor([key(image, label) not in taken for image, label in zip(self.images, self.labels.tolist())],
                            dtype=torch.bool)
        return Split(self.images[keep], self.labels[keep])


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32, scaled to [0, 1] then standardized per channel."""
    x = images.to(torch.float32).div_(255.0)
    m, s = _channel_stats(tuple(mean), tuple(std), x.device)
    return x.sub_(m).div_(s)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalize``'s [1, C, 1, 1] mean and std on ``device``, made once: on a GPU a tensor built from
    Python numbers per batch is a copy from the host each time."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_arch: str
    load: Callable[[list[Path]], tuple[Split, Split]] = field(repr=False)
    subdir: str = ""  # torchvision's folder name under the root
    system_dirs: tuple[Path, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def search_dirs(self, data_dir: Path | None) -> list[Path]:
        roots = [data_dir] if data_dir is not None else [Path("data")]
        dirs: list[Path] = []
        for root in roots:
            dirs.append(root)
            if self.subdir:
                dirs.append(root / self.subdir / "raw")
        return dirs + ([] if data_dir is not None else list(self.system_dirs))


@dataclass(frozen=True)
class Dataset:
    spec: DatasetSpec
    train: Split
    test: Split




def load_dataset(name: str, data_dir: Path | None = None) -> Dataset:
    """A dataset's train and test splits (uint8 images, int64 labels), read from its standard files.

    Args:
        name: a registered dataset (``fmnist``, ``mnist``, ``emnist``, ``cifar10``...: ``DATASETS.names()``).
        data_dir: where its files are; default: the places the dataset's spec searches (for
            Fashion-MNIST, the Debian package's /usr/share/datasets/fashion-mnist).

    Raises DataError when the files are missing or are not that dataset. Example:
    ``load_dataset("fmnist").test.images.shape == (10000, 1, 28, 28)``.
    """
    spec = DATASETS.get(name)
    train, test = spec.load(spec.search_dirs(data_dir))
    for split_name, split in (("train", train), ("test", test)):
        if tuple(split.images.shape[1:]) != spec.shape:
            raise DataError(
                f"{spec.title} {split_name} images have shape {tuple(split.images.shape[1:])}, "
                f"expected {spec.shape}; the files are not {spec.title}"
            )
        if len(split) and int(split.labels.max()) >= spec.num_classes:
            raise DataError(f"{spec.title} {split_name} labels go up to {int(split.labels.max())}, "
                            f"but the dataset has {spec.num_classes} classes")
    return Dataset(spec, train, test)


# ---------------------------------------------------------------- IDX (MNIST family)

_IDX_DTYPES: dict[int, npt.DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
                                         0x0E: ">f8"}


MAX_IDX_BYTES = 2 << 30  # the largest IDX file in the family (EMNIST byclass train images) is 0.55 GB


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not, at most MAX_IDX_BYTES once unzipped) into a numpy array."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(MAX_IDX_BYTES + 1)
            if len(raw) > MAX_IDX_BYTES:
                raise DataError(f"{path} unzips to more than {MAX_IDX_BYTES:,} bytes; it is not a dataset file")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header needs {header} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: header says {dims} "
                        f"({expected} bytes of data), file holds {len(raw) - header}")
    return np.frombuffer(bytearray(raw), dtype=dtype, offset=header).reshape(dims)


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _idx_loader(prefix: str, title: str, how: str,
                transpose: bool = False) -> Callable[[list[Path]], tuple[Split, Split]]:
    stems = {"train": (f"{prefix}train-images-idx3-ubyte", f"{prefix}train-labels-idx1-ubyte"),
             "test": (f"{prefix}t10k-images-idx3-ubyte", f"{prefix}t10k-labels-idx1-ubyte")}
    if prefix:  # EMNIST names its test files "test", not "t10k"
        stems["test"] = (f"{prefix}test-images-idx3-ubyte", f"{prefix}test-labels-idx1-ubyte")

    def load(dirs: list[Path]) -> tuple[Split, Split]:
        splits = []
        for img_stem, lbl_stem in stems.values():
            img_path, lbl_path = _find(dirs, img_stem), _find(dirs, lbl_stem)
            if img_path is None or lbl_path is None:
                missing = img_stem if img_path is None else lbl_stem
                raise DataError(
                    f"{title} file {missing}[.gz] not found in: {', '.join(str(d) for d in dirs)}; {how}"
                )
            images, labels = read_idx(img_path), read_idx(lbl_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(f"{img_path} / {lbl_path}: expected images [N, H, W] and labels [N] "
                                f"with the same N, got {images.shape} and {labels.shape}")
            if transpose:
                images = images.transpose(0, 2, 1)
            splits.append(Split(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
                                torch.from_numpy(labels.astype(np.int64))))
        return splits[0], splits[1]

    return load


_DIGITS = tuple(str(i) for i in range(10))
_FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_EMNIST_CLASSES = _DIGITS + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)) + tuple(
    chr(c) for c in range(ord("a"), ord("z") + 1))

_FMNIST_HOW = ("install Debian's package (apt-get install dataset-fashion-mnist) or put the four "
               f"Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) in {opt('data_dir')}")
DATASETS.register("fmnist")(DatasetSpec(
    "fmnist", "Fashion-MNIST", (1, 28, 28), _FMNIST_CLASSES, (0.2860,), (0.3530,), "cnn-fmnist",
    _idx_loader("", "Fashion-MNIST", _FMNIST_HOW), "FashionMNIST", (DEBIAN_FMNIST,)))

_MNIST_HOW = f"put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in {opt('data_dir')}"
DATASETS.register("mnist")(DatasetSpec(
    "mnist", "MNIST", (1, 28, 28), _DIGITS, (0.1307,), (0.3081,), "cnn-mnist",
    _idx_loader("", "MNIST", _MNIST_HOW), "MNIST"))

_EMNIST_HOW = ("put the EMNIST byclass IDX files (emnist-byclass-train-images-idx3-ubyte.gz, ...) "
               f"from the EMNIST 'gzip' archive in {opt('data_dir')}")
DATASETS.register("emnist")(DatasetSpec(
    "emnist", "EMNIST byclass", (1, 28, 28), _EMNIST_CLASSES, (0.1736,), (0.3317,), "cnn-mnist",
    _idx_loader("emnist-byclass-", "EMNIST byclass", _EMNIST_HOW, transpose=True),
    "EMNIST"))


# ---------------------------------------------------------------- CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR batches hold: dicts, lists, bytes, numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":  # numpy >= 2 has it in numpy._core, older ones in numpy.core
            core = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
            return importlib.import_module(core)._reconstruct
        if module == "_codecs":
            import codecs
            return codecs.encode
        return getattr(np, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` file -> (uint8 [N, 3, 32, 32], int64 [N])."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict)")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR-10 batch (no 'data'/'labels' entries)")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_HOW = ("download 'CIFAR-10 python version' (cifar-10-python.tar.gz) and unpack it in "
              f"{opt('data_dir')}, so that {opt('data_dir')}/cifar-10-batches-py/data_batch_1 exists")


def _load_cifar(dirs: list[Path]) -> tuple[Split, Split]:
    candidates = [d / "cifar-10-batches-py" for d in dirs] + dirs
    for d in candidates:
        if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
            train = [read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)
                     if (d / f"data_batch_{i}").is_file()]
            test = read_cifar_batch(d / "test_batch")
            return (Split(torch.from_numpy(np.concatenate([t[0] for t in train])),
                          torch.from_numpy(np.concatenate([t[1] for t in train]))),
                    Split(torch.from_numpy(test[0].copy()), torch.from_numpy(test[1])))
    raise DataError(f"CIFAR-10 batches (data_batch_1 ... test_batch) not found in: "
                    f"{', '.join(str(d) for d in candidates)}; {_CIFAR_HOW}")


DATASETS.register("cifar10")(DatasetSpec(
    "cifar10", "CIFAR-10", (3, 32, 32),
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cnn-cifar", _load_cifar))
