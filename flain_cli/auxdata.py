"""The defender's small clean auxiliary set: read from an image folder or a tensor file, or exported.

Accepted inputs:
- a folder in torchvision's ImageFolder layout, ``AUX/<class>/<image>`` (PNG/JPEG/BMP), where
  ``<class>`` is a class index or a class name recorded in the checkpoint metadata;
- a ``.safetensors`` or ``.npz`` file with ``images`` (uint8 ``[N, H, W]`` or ``[N, H, W, C]``)
  and ``labels`` (integers).

Images are converted to the model's channel count and size (grayscale <-> RGB, resized with
Pillow's bilinear filter when the size differs); normalization comes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .datasets import Split, load_dataset, normalize
from .errors import AuxError, ConfigError, opt
from .files import atomic_write, read_text, regular_file
from .settings import PATCH_SIDES
from .splits import balanced_subset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class AuxSet:
    images: torch.Tensor  # uint8 [N, C, H, W], in the model's shape
    labels: torch.Tensor  # int64 [N]
    source: str
    resized: int = 0  # how many images had to be resized

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def split(self, fraction: float, seed: int = 0) -> tuple[AuxSet, AuxSet]:
        """(rest, held out): ``fraction`` of each class held out, chosen with a seeded shuffle."""
        if not 0 < fraction < 1:
            raise ConfigError(f"must be between 0 and 1 (exclusive), got {fraction}", param="holdout")
        gen = torch.Generator().manual_seed(seed)
        held = torch.zeros(len(self), dtype=torch.bool)
        for label in torch.unique(self.labels):
            idx = torch.nonzero(self.labels == label).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            held[idx[:round(fraction * len(idx))]] = True
        if held.all() or not held.any():
            raise AuxError(f"{fraction} of {len(self)} aux images leaves one part empty", param="holdout")
        return (AuxSet(self.images[~held], self.labels[~held], f"{self.source} (activations)"),
                AuxSet(self.images[held], self.labels[held], f"{self.source} (held out)"))

    def normalized(self, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        return normalize(self.images, mean, std)

    def translations(self, shift: int) -> Iterator[torch.Tensor]:
        """The images moved by every offset (dy, dx) in [-shift, shift]^2, the uncovered border black (0):
        (2 shift + 1)^2 uint8 batches, the unmoved images among them."""
        height, width = self.images.shape[-2:]
        if not 0 <= shift < min(height, width):
            raise ConfigError(f"must be from 0 to {min(height, width) - 1} pixels for {width}x{height} images, "
                              f"got {shift}", param="shifts")
        padded = torch.nn.functional.pad(self.images, (shift, shift, shift, shift))
        for dy in range(2 * shift + 1):
            for dx in range(2 * shift + 1):
                yield padded[..., dy:dy + height, dx:dx + width]


def patched_copies(images: torch.Tensor, copies: int, seed: int = 0,
                   sides: tuple[int, int] = PATCH_SIDES) -> torch.Tensor:
    """``copies`` copies of uint8 ``[N, C, H, W]`` images, each with one white (255) square at a random
    place, its side drawn from ``sides``: ``[copies * N, C, H, W]``, copy after copy in the images' order.
    Drawn on a CPU generator seeded with ``seed``: the same copies on every device and run."""
    gen = torch.Generator().manual_seed(seed)
    n, _, height, width = images.shape
    rows, cols = torch.arange(height).view(1, height, 1), torch.arange(width).view(1, 1, width)
    out = []
    for _ in range(copies):
        side = torch.randint(sides[0], sides[1] + 1, (n,), generator=gen).view(-1, 1, 1)
        top = (torch.rand(n, generator=gen).view(-1, 1, 1) * (height - side + 1)).long()
        left = (torch.rand(n, generator=gen).view(-1, 1, 1) * (width - side + 1)).long()
        square = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        out.append(torch.where(square.unsqueeze(1).to(images.device), 255, images))
    return torch.cat(out) if out else images[:0]


def load_aux(path: Path, input_shape: tuple[int, int, int], num_classes: int,
             class_names: list[str] | None = None) -> AuxSet:
    """Read an aux set for a model: a folder of class subfolders of images, or a .safetensors/.npz file.

    Args:
        path: the folder (``<class>/*.png``, the class a number or one of ``class_names``) or file
            (``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]``, and ``labels``).
        input_shape: the model's ``(C, H, W)``; images are converted to its channels and resized
            (bilinear) to its size, and ``AuxSet.resized`` counts those that were.
        num_classes: the model's; a label outside ``0..num_classes-1`` is refused.
        class_names: folder names allowed besides the class numbers.

    Returns:
        The images (uint8) and labels. Raises AuxError when the set is missing, empty or does not fit.

    Example: ``load_aux(Path("aux"), (1, 28, 28), 10)``.
    """
    path = Path(path)
    if path.is_dir():
        aux = _load_folder(path, input_shape, class_names or [])
    elif path.is_file() and path.suffix in (".safetensors", ".npz"):
        aux = _load_tensor_file(path, input_shape)
    elif path.exists():
        raise AuxError(f"aux set {path} is neither a folder of class subfolders nor a .safetensors/.npz file")
    else:
        raise AuxError(f"aux set {path} does not exist; create one with `flain aux export`")
    if len(aux) == 0:
        raise AuxError(f"aux set {path} holds no images")
    bad = aux.labels[(aux.labels < 0) | (aux.labels >= num_classes)]
    if len(bad):
        raise AuxError(f"aux set {path} has label {int(bad[0])}, but the model has classes 0..{num_classes - 1}")
    return aux


def folder_alias(class_name: str) -> str:
    """A class name as a folder name can hold it: 'T-shirt/top' -> 'T-shirt_top'."""
    return re.sub(r"[^\w.-]+", "_", class_name).strip("_")


def _class_index(name: str, class_names: list[str], folder: Path) -> int:
    if name.isascii() and name.isdigit():  # "²" is a digit to str.isdigit, not to int()
        return int(name)
    if name in class_names:
        return class_names.index(name)
    aliases = [folder_alias(c) for c in class_names]
    if name in aliases:
        return aliases.index(name)
    known = f"; known names: {', '.join(aliases)}" if class_names else ""
    raise AuxError(f"aux class folder {folder / name} is neither a class index nor a class name of the model{known}")


MAX_AUX_PIXELS = 4096 * 4096  # aux images are thumbnails (28x28, 32x32); a bigger one is a mistake or a bomb


def _check_size(size: tuple[int, int], source: Path | str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise AuxError(f"aux image {source} is {width}x{height} pixels: empty; remove it")
    if width * height > MAX_AUX_PIXELS:
        raise AuxError(f"aux image {source} declares {width}x{height} pixels, more than aux images can be "
                       f"({MAX_AUX_PIXELS:,} pixels); remove it")


def _convert(image: Image.Image, shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    channels, height, width = shape
    image = image.convert("L" if channels == 1 else "RGB")
    resized = image.size != (width, height)
    if resized:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)), resized


def _load_folder(root: Path, shape: tuple[int, int, int], class_names: list[str]) -> AuxSet:
    images, labels, resized = [], [], 0
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise AuxError(f"aux folder {root} has no class subfolders (expected {root}/<class>/<image>.png)")
    for class_dir in class_dirs:
        label = _class_index(class_dir.name, class_names, root)
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not file.is_file():  # a FIFO would block the read forever
                raise AuxError(f"aux image {file} is not a regular file (a folder, pipe or device); remove it")
            try:
                with warnings.catch_warnings():  # Pillow warns (on stderr) at a size _check_size refuses
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    opened = Image.open(file)
                with opened as image:
                    _check_size(image.size, file)
                    array, was_resized = _convert(image, shape)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
                raise AuxError(f"cannot read aux image {file}: {exc}") from None
            images.append(array)
            labels.append(label)
            resized += was_resized
    if not images:
        raise AuxError(f"aux folder {root} has no PNG/JPEG images in its class subfolders")
    return AuxSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), str(root), resized)


def _load_tensor_file(path: Path, shape: tuple[int, int, int]) -> AuxSet:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("images", "labels") if k in f}
        else:
            from safetensors.numpy import load_file
            arrays = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise AuxError(f"cannot read aux file {path}: {exc}") from None
    if "images" not in arrays or "labels" not in arrays:
        raise AuxError(f"aux file {path} needs arrays 'images' and 'labels', has: {', '.join(arrays) or 'none'}")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise AuxError(f"aux file {path}: 'images' must be uint8 [N, H, W] or [N, H, W, C], "
                       f"got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise AuxError(f"aux file {path}: 'labels' must be N integers, got {labels.dtype} {list(labels.shape)}")
    if images.ndim == 4 and images.shape[3] not in (1, 3, 4):
        raise AuxError(f"aux file {path}: images have {images.shape[3]} channels; expected 1, 3 or 4 (last axis)")
    channels, height, width = shape
    _check_size((images.shape[2], images.shape[1]), path)
    if images.ndim == 3:
        images = images[..., None]
    labels = torch.from_numpy(labels.astype(np.int64))
    if images.shape[1:] == (height, width, channels):
        return AuxSet(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), labels, str(path))
    converted = [_convert(Image.fromarray(image[..., 0] if image.shape[2] == 1 else image), shape)
                 for image in images]
    return AuxSet(torch.from_numpy(np.stack([array for array, _ in converted])), labels, str(path),
                  sum(resized for _, resized in converted))


def exported_indices(path: Path) -> list[int]:
    """The dataset indices of an earlier export (a folder with aux.json, or an .npz with indices)."""
    path = Path(path)
    try:
        if path.is_dir():
            if not (path / "aux.json").is_file():
                raise KeyError("aux.json")
            return json.loads(read_text(path / "aux.json", f"{opt('exclude')} manifest"))["indices"]
        with np.load(regular_file(path, opt("exclude")), allow_pickle=False) as f:
            return f["indices"].tolist()
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        raise ConfigError(f"{path} is not a `flain aux export` output (folder with aux.json, "
                          "or .npz)", param="exclude") from None


def export_path(out: Path, fmt: str) -> Path:
    """Where `export_aux` writes: ``out`` itself for a folder; for npz ``out`` with ``.npz`` added when
    missing, since the readers know an npz set by its suffix."""
    out = Path(out)
    return out if fmt != "npz" or out.suffix == ".npz" else out.with_name(out.name + ".npz")


def export_aux(dataset: str, per_class: int, out: Path, *, split: str = "test", seed: int = 0,
               data_dir: Path | None = None, overwrite: bool = False, fmt: str = "folder",
               exclude: list[int] | None = None) -> dict:
    """Write a class-balanced, seeded aux set drawn from a dataset split.

    ``fmt="folder"``: PNG files in ``out/<class>/`` and ``out/aux.json``, built in a temporary
    sibling and renamed into place, so ``out`` is either complete or absent. ``fmt="npz"``: one
    ``.npz`` with ``images``, ``labels`` and ``indices`` (at `export_path`). ``exclude``: dataset indices never to
    draw (e.g. an aux set, when writing a test subset). Returns the manifest.
    """
    if fmt not in ("folder", "npz"):
        raise ConfigError(f"must be folder or npz, got {fmt!r}", param="fmt")
    if per_class < 1:
        raise ConfigError(f"must be at least 1, got {per_class}", param="per_class")
    out = export_path(out, fmt)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass {opt('overwrite')} to replace it or choose another {opt('out')}")
    if split not in ("train", "test"):
        raise ConfigError(f"must be train or test, got {split!r}", param="split")
    data = load_dataset(dataset, data_dir)
    source: Split = getattr(data, split)
    pool = torch.ones(len(source), dtype=torch.bool)
    if exclude:
        pool[torch.tensor(exclude, dtype=torch.long)] = False
    pool_idx = torch.nonzero(pool).flatten()
    counts = torch.bincount(source.labels[pool_idx], minlength=data.spec.num_classes)
    if int(counts.min()) < per_class:
        raise ConfigError(f"the {split} split has only {int(counts.min())} images of class "
                          f"{int(counts.argmin())}; ask for at most that many with {opt('per_class')}")
    chosen = pool_idx[balanced_subset(source.labels[pool_idx], per_class * data.spec.num_classes,
                                      np.random.default_rng(seed))]
    manifest = {"dataset": dataset, "split": split, "per_class": per_class, "seed": seed,
                "count": len(chosen), "indices": chosen.tolist(), "class_names": list(data.spec.classes),
                "excluded": len(exclude or [])}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        images = source.images[chosen].numpy()
        images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=images, labels=source.labels[chosen].numpy(), indices=chosen.numpy())

        atomic_write(out, write)
        return manifest
    tmp = Path(tempfile.mkdtemp(prefix=".flain-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename; a folder gets the umask's mode
    try:
        for i in chosen.tolist():
            label = int(source.labels[i])
            (tmp / str(label)).mkdir(exist_ok=True)
            image = source.images[i].numpy()
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(
                tmp / str(label) / f"{split}-{i:05d}.png")
        (tmp / "aux.json").write_text(json.dumps(manifest, indent=1) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():  # --force: keep the old folder until the new one is in place
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest
