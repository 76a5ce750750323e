"""What a checkpoint file is: its format, tensors, metadata, the built-in architectures it fits and
the layers FLAIN could defend in it (`flain inspect`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, load_checkpoint
from .errors import CheckpointError
from .formats import align, reader
from .models import ARCHITECTURES, build_model

MAX_CLASS_GUESSES = 8


@dataclass(frozen=True)
class ArchMatch:
    arch: str
    num_classes: int
    notes: tuple[str, ...]  # what fitting it takes (a prefix stripped, extra tensors ignored...)
    linear_layers: list[dict[str, Any]]  # name, in_features, out_features, defended (the default layer)


@dataclass(frozen=True)
class Inspection:
    path: Path
    format: str
    sha256: str
    size: int
    tensors: list[dict[str, Any]]  # name, shape, dtype, in file order
    meta: dict[str, Any]  # flain-cli metadata ({} for other tools' files)
    notes: tuple[str, ...]
    matches: list[ArchMatch] = field(default_factory=list)
    linear_like: list[str] = field(default_factory=list)  # 2-D '*.weight' tensors: candidate layers without a match

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "sha256": self.sha256, "size": self.size,
                "tensors": self.tensors, "meta": self.meta, "notes": list(self.notes),
                "matches": [m.__dict__ | {"notes": list(m.notes)} for m in self.matches],
                "linear_like": self.linear_like}


def _class_guesses(ckpt: Checkpoint) -> list[int]:
    """Numbers of classes worth trying: the metadata's, else the lengths of the 1-D tensors."""
    if ckpt.num_classes:
        return [ckpt.num_classes]
    lengths = sorted({int(t.shape[0]) for t in ckpt.tensors.values() if t.dim() == 1 and 2 <= t.shape[0] <= 1000})
    return lengths[:MAX_CLASS_GUESSES]


def inspect_checkpoint(path: Path) -> Inspection:
    """Read ``path`` in any supported format and describe it; nothing is written.

    Example: ``inspect_checkpoint(Path("model.pt")).matches[0].arch``.
    """
    ckpt = load_checkpoint(path)
    matches = []
    for arch in ARCHITECTURES.names():
        for n in _class_guesses(ckpt):
            model = build_model(arch, n)
            try:
                aligned = align(ckpt.tensors, model.state_dict(), what=str(path),
                                ordered=reader(ckpt.format).positional, strict=False)
            except CheckpointError:
                continue
            default = ARCHITECTURES.get(arch).defended_layer
            layers = [{"name": name, "in_features": model.linear(name).in_features,
                       "out_features": model.linear(name).out_features, "defended": name == default}
                      for name in model.linear_layers()]
            matches.append(ArchMatch(arch, n, aligned.notes, layers))
            break
    tensors = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
               for k, v in ckpt.tensors.items()]
    linear_like = [k for k, v in ckpt.tensors.items() if v.dim() == 2 and k.endswith("weight")]
    return Inspection(Path(path), ckpt.format, ckpt.sha256 or "", Path(path).stat().st_size, tensors, ckpt.meta,
                      ckpt.notes, matches, linear_like)
