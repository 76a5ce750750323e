"""Read what a defense works on: a checkpoint as a model, its initial checkpoint W0, and an aux set for it,
each checked (finite weights, the same tensors in MODEL and W0, aux images of the model's input).

:mod:`flain_cli.audit` (scan, defend), :mod:`flain_cli.sweep` and the labs in experiments/ load through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .auxdata import AuxSet, load_aux
from .checkpoint import Checkpoint, ModelMeta, ModelSource, conform, conformed_model, load_checkpoint
from .errors import AuxError, CheckpointError, opt


@dataclass(frozen=True)
class LoadedModel:
    ckpt: Checkpoint
    meta: ModelMeta
    model: torch.nn.Module


def load_model(path: Path, source: ModelSource = ModelSource(), device: torch.device | str = "cpu") -> LoadedModel:
    """Read a checkpoint in any supported format, align it to its architecture, and build the model.

    ``source`` says what the file does not (`ModelSource`). ``ckpt.tensors`` of the result are under
    the architecture's names, floating ones as float32.
    """
    ckpt = load_checkpoint(path)
    meta = source.meta_for(ckpt)
    ckpt, model = conformed_model(ckpt, meta, device, strict=source.strict)
    return LoadedModel(ckpt, meta, model)


def load_aux_for(loaded: LoadedModel, aux_path: Path) -> AuxSet:
    meta = loaded.meta
    if meta.normalization is None:
        raise AuxError(f"{loaded.ckpt.path} does not say how its inputs are normalized; pass {opt('dataset')}")
    return load_aux(aux_path, meta.input_shape, meta.num_classes, list(meta.class_names) if meta.class_names else None)


def resize_notes(aux: AuxSet, meta: ModelMeta) -> list[str]:
    """Say so when aux images did not have the model's input size (they were resized, bilinear)."""
    if not aux.resized:
        return []
    _, height, width = meta.input_shape
    return [f"{aux.resized} of {len(aux)} aux images were resized to {width}x{height}, the model's input size"]


def check_finite(ckpt: Checkpoint, role: str) -> None:
    """Refuse a checkpoint with NaN or Inf in any floating tensor: every result from it would be garbage."""
    bad = [name for name, t in ckpt.tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{role} {ckpt.path} holds NaN or Inf in {', '.join(bad[:3])}{more}; "
                              f"use a checkpoint whose weights are all finite")


def load_init(path: Path, loaded: LoadedModel, *, strict: bool = True) -> Checkpoint:
    """The initial checkpoint W0, read and aligned like MODEL (same architecture, or a clear error)."""
    init = load_checkpoint(path)
    model = loaded.ckpt
    if model.arch and init.arch and model.arch != init.arch:
        raise CheckpointError(f"{model.path} is a {model.arch} but {opt('init_path')} {init.path} is a {init.arch}")
    init = conform(init, loaded.meta, strict=strict)
    check_finite(init, opt("init_path"))
    check_pair(model, init)
    return init


def check_pair(model: Checkpoint, init: Checkpoint) -> None:
    """MODEL and INIT (both aligned to one architecture) must hold the same tensor names and shapes."""
    names_m, names_i = set(model.tensors), set(init.tensors)
    if names_m != names_i:
        diff = sorted(names_m ^ names_i)
        raise CheckpointError(f"{model.path} and {opt('init_path')} {init.path} hold different tensors "
                              f"(e.g. {', '.join(diff[:3])}); pass the initial checkpoint of the same run")
    for name in sorted(names_m):
        if model.tensors[name].shape != init.tensors[name].shape:
            raise CheckpointError(f"{name} is {tuple(model.tensors[name].shape)} in {model.path} but "
                                  f"{tuple(init.tensors[name].shape)} in {opt('init_path')} {init.path}")
    if all(torch.equal(model.tensors[name], init.tensors[name]) for name in names_m):
        raise CheckpointError(f"{model.path} and {opt('init_path')} {init.path} hold the same weights: there are "
                              f"no updates to flip; pass the model before training as {opt('init_path')}")
    recorded = model.parent_init
    if recorded and model.role == "final" and init.sha256 is not None and recorded != init.sha256:
        raise CheckpointError(f"{model.path} was trained from an initial checkpoint with sha256 {recorded[:16]}..., "
                              f"but {opt('init_path')} {init.path} has sha256 {init.sha256[:16]}...; pass the "
                              f"init.safetensors written by the same `flain train` run")


