"""Checkpoints: safetensors files whose ``__metadata__`` says how to rebuild and read them.

Checkpoints from other tools (torch.save state dicts, .npz array lists, safetensors without our
metadata, other dtypes) are read too: :mod:`flain_cli.formats` tells the format and aligns the
tensors to an architecture (:func:`conform`).

Every metadata value is a JSON document (safetensors metadata is ``str -> str``). See
docs/checkpoint-format.md for the fields. Files are written atomically and never carry a
timestamp, so a seeded run writes bit-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .datasets import DATASETS, DatasetSpec
from .errors import CheckpointError, ConfigError, opt
from .files import atomic_write, regular_file
from .formats import align, canonical_safetensors, detect, reader
from .modeldef import build_from_def, first_linear, model_def_record
from .models import ARCHITECTURES, build_model

FORMAT = "flain-cli/1"
ROLES = ("init", "final", "defended")


@dataclass(frozen=True)
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None
    format: str = "safetensors"  # as read: one of formats.FORMATS
    dtype: str = "float32"  # the floating dtype as read; after conform() the tensors are float32
    notes: tuple[str, ...] = ()  # what reading it took (a prefix stripped, a dtype cast...)

    # The metadata fields read outside this module, by name (docs/checkpoint-format.md); None when not recorded.
    @property
    def arch(self) -> str | None:
        return self.meta.get("arch")

    @property
    def dataset(self) -> str | None:
        return self.meta.get("dataset")

    @property
    def role(self) -> str | None:
        """init, final or defended (ROLES)."""
        return self.meta.get("role")

    @property
    def num_classes(self) -> int | None:
        value = self.meta.get("num_classes")
        return None if value is None else int(value)

    @property
    def parent_init(self) -> str | None:
        """The sha256 of the initial checkpoint this one was trained or defended from."""
        return (self.meta.get("parents") or {}).get("init")

    @property
    def attack(self) -> tuple[str | None, str | None]:
        """The recorded attack: its task (SRC:TGT) and trigger name."""
        known = self.meta.get("attack") or {}
        return known.get("task"), known.get("trigger")


@dataclass(frozen=True)
class Normalization:
    """How inputs are standardized: ``(pixel / scale - mean) / std`` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: int = 255


@dataclass(frozen=True)
class ModelMeta:
    """What rebuilds and reads a model: architecture, classes, input, normalization (docs/checkpoint-format.md).

    Built by `model_meta` for a new training and by `resolve_model_meta` from a checkpoint and
    the user's options; ``to_json`` gives the checkpoint-metadata fields it stands for.
    """

    arch: str  # a built-in architecture, or "model-def" for the user's own class (``model_def``)
    num_classes: int
    input_shape: tuple[int, int, int]  # (channels, height, width)
    defended_layer: str
    dataset: str | None = None
    normalization: Normalization | None = None  # None: no dataset and nothing recorded or given
    class_names: tuple[str, ...] | None = None
    model_def: dict[str, str] | None = None  # {"spec": FILE.py:NAME, "sha256": of the file}

    def test_dataset(self, path: Path | None) -> str:
        """The dataset whose test split measures the model of ``path``, or a clear error when none is known."""
        if self.dataset is None:
            raise ConfigError(f"{path} does not say which dataset it was trained on; pass {opt('dataset')} "
                              f"({', '.join(DATASETS.names())})")
        return self.dataset

    @property
    def norm(self) -> Normalization:
        """The normalization, or a clear error when nothing tells it."""
        if self.normalization is None:
            raise ConfigError(f"the model's input normalization is unknown: pass {opt('dataset')}, or "
                              f"{opt('mean')} and {opt('std')}")
        return self.normalization

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"format": FORMAT, "tool": f"flain-cli {__version__}", "arch": self.arch,
                                "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                                "defended_layer": self.defended_layer, "dataset": self.dataset}
        if self.normalization is not None:
            meta["normalization"] = {"mean": list(self.normalization.mean), "std": list(self.normalization.std),
                                     "scale": self.normalization.scale}
        if self.class_names is not None:
            meta["class_names"] = list(self.class_names)
        if self.model_def is not None:
            meta["model_def"] = dict(self.model_def)
        return meta


@dataclass(frozen=True)
class ModelSource:
    """What the user says about how to read a checkpoint as a model; every field is optional.

    ``arch`` (a built-in) or ``model_def`` (FILE.py:NAME, the user's class: its code runs) when the
    file has no metadata; ``dataset`` for its inputs and classes; ``strict`` refuses tensors the
    architecture lacks; ``normalization`` (mean, std per channel) and ``class_names`` override
    the recorded or standard ones. See `resolve_model_meta` for the precedence.
    """

    arch: str | None = None
    dataset: str | None = None
    model_def: str | None = None
    strict: bool = True
    normalization: tuple[list[float], list[float]] | None = None
    class_names: list[str] | None = None

    def meta_for(self, ckpt: Checkpoint) -> ModelMeta:
        return resolve_model_meta(ckpt, arch=self.arch, dataset=self.dataset, model_def=self.model_def,
                                  normalization=self.normalization, class_names=self.class_names)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_meta(arch: str, num_classes: int, dataset: str | None) -> ModelMeta:
    """A built-in architecture on a dataset (its standard normalization and class names)."""
    spec = ARCHITECTURES.get(arch)
    ds = DATASETS.get(dataset) if dataset is not None else None
    return ModelMeta(arch, num_classes, spec.input_shape, spec.defended_layer, dataset,
                     Normalization(tuple(ds.mean), tuple(ds.std)) if ds else None,
                     tuple(ds.classes) if ds else None)


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write ``state`` with ``meta`` atomically; return the new file's sha256."""
    if meta.get("role") not in ROLES:
        raise ValueError(f"checkpoint role must be one of {ROLES}")
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    encoded = {key: json.dumps(value, sort_keys=True) for key, value in meta.items()}
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(canonical_safetensors(tensors, encoded)))
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
    return sha256_file(path)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint in any format of :data:`flain_cli.formats.READERS`, told by its content; the
    metadata is decoded when flain-cli wrote it (a safetensors file), else empty."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    regular_file(path, "checkpoint")
    reader = detect(path)
    contents = reader.read(path)
    raw = contents.metadata
    meta: dict[str, Any] = {}
    if "format" in raw:
        try:
            meta = {key: json.loads(value) for key, value in raw.items()}
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from None
        if meta["format"] != FORMAT:
            raise CheckpointError(f"{path} has format {meta['format']!r}; this flain-cli reads {FORMAT!r}")
        check_meta(meta, path)
    return Checkpoint(contents.tensors, meta, path, sha256_file(path), reader.name, notes=contents.notes)


# metadata fields flain-cli reads, and the JSON kinds they may hold (None: the field may be null)
META_KINDS: dict[str, tuple[type | None, ...]] = {
    "arch": (str,), "dataset": (str, None), "num_classes": (int,), "role": (str,), "defended_layer": (str,),
    "input_shape": (list,), "normalization": (dict,), "class_names": (list,), "parents": (dict,), "source": (dict,),
    "attack": (dict, None), "metrics": (dict,), "model_def": (dict,), "train_config": (dict,), "defense": (dict,),
    "seed": (int,),
}
MAX_CLASSES = 100_000


def check_meta(meta: dict[str, Any], path: Path) -> None:
    """Refuse flain-cli metadata whose fields have the wrong kind or an absurd value (an edited file)."""
    for key, kinds in META_KINDS.items():
        if key not in meta:
            continue
        value = meta[key]
        if not any(value is None if k is None else isinstance(value, k) and not isinstance(value, bool)
                   for k in kinds):
            names = " or ".join("null" if k is None else {str: "a string", int: "an integer", list: "a list",
                                                          dict: "an object"}[k] for k in kinds)
            raise CheckpointError(f"{path}: metadata field {key!r} must be {names}, got {value!r:.60}; the file was "
                                  "edited or not written by flain-cli: fix the field or remove the metadata")
    if "num_classes" in meta and not 2 <= meta["num_classes"] <= MAX_CLASSES:
        raise CheckpointError(f"{path}: metadata num_classes {meta['num_classes']} is not from 2 to {MAX_CLASSES:,}; "
                              "fix the field or remove the metadata")


def resolve_model_meta(ckpt: Checkpoint, arch: str | None = None, dataset: str | None = None,
                       num_classes: int | None = None, model_def: str | None = None,
                       normalization: tuple[list[float], list[float]] | None = None,
                       class_names: list[str] | None = None) -> ModelMeta:
    """Model metadata from the checkpoint, with the user's options taking precedence (see `_resolve`).

    Inputs are normalized with ``normalization`` (mean, std per channel) when given, else with the
    checkpoint's recorded ``normalization``, else with the dataset's standard one. ``class_names``
    (one per class, in index order) replace the dataset's: aux folders may be named by them.
    """
    meta = _resolve(ckpt, arch, dataset, num_classes, model_def)
    if class_names is not None:
        if len(class_names) != meta.num_classes or len(set(class_names)) != len(class_names):
            raise ConfigError(f"gives {len(class_names)} names ({len(set(class_names))} distinct) for "
                              f"a model of {meta.num_classes} classes; give one distinct name per line, in "
                              "class-index order", param="class_names")
        meta = dataclasses.replace(meta, class_names=tuple(class_names))
    recorded = ckpt.meta.get("normalization")
    if normalization is not None:
        meta = dataclasses.replace(meta, normalization=_normalization(list(normalization[0]), list(normalization[1]),
                                                                      meta, f"{opt('mean')}/{opt('std')}"))
    elif recorded:
        meta = dataclasses.replace(meta, normalization=_normalization(recorded.get("mean"), recorded.get("std"), meta,
                                                                      f"{ckpt.path}: metadata normalization"))
    return meta


def _normalization(mean: Any, std: Any, meta: ModelMeta, what: str) -> Normalization:
    channels = meta.input_shape[0]
    ok = all(isinstance(v, list) and len(v) in (1, channels) and all(isinstance(x, (int, float)) for x in v)
             for v in (mean, std))
    if not ok or not all(math.isfinite(x) for x in mean) or not all(math.isfinite(x) and x > 0 for x in std):
        raise ConfigError(f"{what} must give a finite mean and a positive std for 1 or {channels} channels, "
                          f"got mean {mean!r} and std {std!r}")
    return Normalization(tuple(float(x) for x in mean) * (channels // len(mean)),
                         tuple(float(x) for x in std) * (channels // len(std)))


def dataset_spec(meta: ModelMeta) -> DatasetSpec:
    """The dataset of ``meta``, normalizing as ``meta`` says (which may differ from the dataset's standard)."""
    if meta.dataset is None:
        raise ConfigError(f"the model's dataset is unknown: pass {opt('dataset')}")
    spec = DATASETS.get(meta.dataset)
    norm = meta.normalization
    if norm and (norm.mean, norm.std) != (tuple(spec.mean), tuple(spec.std)):
        spec = dataclasses.replace(spec, mean=norm.mean, std=norm.std)
    return spec


def _resolve(ckpt: Checkpoint, arch: str | None, dataset: str | None, num_classes: int | None,
             model_def: str | None) -> ModelMeta:
    """Model metadata from the checkpoint, with the user's options taking precedence.

    A checkpoint written by another tool has no metadata: then ``arch`` (a built-in) or
    ``model_def`` (FILE.py:NAME, the user's own class; its code runs) is required, and the
    dataset (or ``num_classes``) tells the number of classes.
    """
    dataset = dataset or ckpt.dataset
    recorded = ckpt.meta.get("model_def")
    if model_def is None and recorded and arch is None:
        raise ConfigError(f"{ckpt.path} was written for the model class {recorded['spec']}; pass "
                          f"{opt('model_def')} {recorded['spec']} (flain runs that file's code to rebuild the model)")
    if model_def is not None:
        if arch is not None:
            raise ConfigError(f"and {opt('model_def')} both name the architecture; pass one of them", param="arch")
        return _model_def_meta(ckpt, model_def, dataset, num_classes)
    arch = arch or ckpt.arch
    if arch is None:
        raise CheckpointError(f"{ckpt.path} carries no flain-cli metadata; pass {opt('arch')} "
                              f"({', '.join(ARCHITECTURES.names())}) and {opt('dataset')}")
    if num_classes is None:
        num_classes = ckpt.meta.get("num_classes")
    if num_classes is None and dataset is not None:
        num_classes = DATASETS.get(dataset).num_classes
    if num_classes is None:
        raise ConfigError(f"cannot tell how many classes {ckpt.path} has; pass {opt('dataset')}")
    meta = model_meta(arch, int(num_classes), dataset)
    if dataset is not None and tuple(DATASETS.get(dataset).shape) != meta.input_shape:
        raise ConfigError(f"{ckpt.path}: dataset {dataset} has {tuple(DATASETS.get(dataset).shape)} images but "
                          f"architecture {arch} takes {meta.input_shape}; pass the {opt('dataset')} the model "
                          "was trained on")
    if ckpt.meta.get("defended_layer"):
        meta = dataclasses.replace(meta, defended_layer=ckpt.meta["defended_layer"])
    return meta


def _model_def_meta(ckpt: Checkpoint, spec: str, dataset: str | None, num_classes: int | None) -> ModelMeta:
    """Metadata for the user's own model class: shapes and normalization from the dataset, the
    defended layer from the checkpoint or a probe (the first nn.Linear the forward pass reaches)."""
    if dataset is None:
        raise ConfigError(f"needs {opt('dataset')} for {ckpt.path}: its input size, normalization and classes",
                          param="model_def")
    ds = DATASETS.get(dataset)
    n = int(num_classes or ckpt.meta.get("num_classes") or ds.num_classes)
    meta = ModelMeta("model-def", n, ds.shape, "", dataset, Normalization(tuple(ds.mean), tuple(ds.std)),
                     tuple(ds.classes), model_def_record(spec))
    layer = ckpt.meta.get("defended_layer") or first_linear(build_network(meta), tuple(ds.shape))
    return dataclasses.replace(meta, defended_layer=layer)


def build_network(meta: ModelMeta) -> torch.nn.Module:
    """The untrained network ``meta`` describes: a built-in architecture, or the user's --model-def."""
    if meta.model_def:
        return build_from_def(meta.model_def["spec"], meta.num_classes)
    return build_model(meta.arch, meta.num_classes)


def conform(ckpt: Checkpoint, meta: ModelMeta, *, strict: bool = True,
            expected: dict[str, torch.Tensor] | None = None) -> Checkpoint:
    """``ckpt`` with its tensors under the architecture's names (``meta``), floating ones as float32.

    ``expected``: the network's state_dict when the caller has built it already. Raises
    CheckpointError with counts of missing, extra and misshapen tensors when it does not fit.
    """
    expected = expected if expected is not None else build_network(meta).state_dict()
    name = meta.model_def["spec"] if meta.model_def else meta.arch
    what = f"{ckpt.path} (architecture {name}, {meta.num_classes} classes)"
    aligned = align(ckpt.tensors, expected, what=what, ordered=reader(ckpt.format).positional, strict=strict)
    return dataclasses.replace(ckpt, tensors=aligned.tensors, dtype=aligned.dtype, notes=ckpt.notes + aligned.notes)


def conformed_model(ckpt: Checkpoint, meta: ModelMeta, device: torch.device | str = "cpu", *,
                    strict: bool = True) -> tuple[Checkpoint, torch.nn.Module]:
    """``ckpt`` aligned to the network ``meta`` describes (`conform`), and that network holding its tensors.

    The network is built once, for both.
    """
    model = build_network(meta)
    ckpt = conform(ckpt, meta, strict=strict, expected=model.state_dict())
    model.load_state_dict(ckpt.tensors)
    return ckpt, model.to(device).eval()


def build_from(ckpt: Checkpoint, meta: ModelMeta, device: torch.device | str = "cpu", *,
               strict: bool = True) -> torch.nn.Module:
    """Build the architecture named in ``meta`` and load the checkpoint's tensors into it (see `conform`)."""
    return conformed_model(ckpt, meta, device, strict=strict)[1]
