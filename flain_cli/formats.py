"""Checkpoint file formats, told by content (never by name), and tensor names aligned to an
architecture, dtypes brought to float32 for the work.

:data:`READERS` holds one :class:`Reader` per format, in the order they are tried; adding a format
means one entry there (its ``sniff`` and ``read``) and its test. :func:`detect` finds the reader
of a file from its first bytes, :func:`read` reads it:

- ``safetensors``: flain-cli's own format, with its ``__metadata__`` (decoded by
  :mod:`flain_cli.checkpoint` when flain-cli wrote it).
- ``npz``: a Flower-style list of arrays (``arr_0``, ``arr_1``...), in the order of the model's
  ``state_dict()``; names come from the architecture, with a shape check for each (``positional``).
- ``torch``: a ``torch.save`` file (zip or legacy), read only with ``torch.load(weights_only=True)``
  from an open file (torch would otherwise trust a ``.safetensors`` name): tensors and plain
  containers, never arbitrary objects. A state dict at the top, or under
  ``state_dict``/``model_state_dict``/``model``/``net``.

:func:`align` maps a checkpoint's tensors onto an architecture's ``state_dict`` names: it strips
common wrapper prefixes (``module.`` from DataParallel, ``_orig_mod.`` from torch.compile,
``model.``, ``net.``), maps npz arrays by order, and, when not ``strict``, drops extra tensors
(``global_step``...). Mismatches are reported with counts and the first names of each kind.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import CheckpointError

PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_BYTES = 16  # what a reader's sniff sees of a file


@dataclass(frozen=True)
class Contents:
    """What a reader found in a file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]  # the file's own string metadata (safetensors' __metadata__); {} for other formats
    notes: tuple[str, ...] = ()  # how it was read, for the user


@dataclass(frozen=True)
class Reader:
    """One checkpoint format: ``sniff(head, path)`` says from the first bytes (and, for a zip, its member
    names) whether a file is of this format; ``read(path)`` reads it or raises CheckpointError.
    ``positional``: the tensor names mean nothing, they are mapped onto an architecture by position."""

    name: str
    sniff: Callable[[bytes, Path], bool]
    read: Callable[[Path], Contents]
    positional: bool = False


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path} starts like a zip archive but is not one (truncated?)") from None


def _is_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"


def _sniff_safetensors(head: bytes, path: Path) -> bool:
    """An 8-byte little-endian header size that fits in the file, then a JSON object."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= path.stat().st_size - 8 and head[8:9] == b"{"


def read_safetensors(path: Path) -> Contents:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    return Contents(tensors, dict(metadata))


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the metadata keys in sorted order (the writer of :func:`read_safetensors`'s format).

    The safetensors writer emits ``__metadata__`` in hash-map order, which changes from run to
    run; sorting it makes equal content give equal files (and equal sha256).
    """
    data = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + size:]


def _sniff_npz(head: bytes, path: Path) -> bool:
    if not _is_zip(head):
        return False
    names = _zip_names(path)
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_npz(path: Path) -> Contents:
    """The arrays of an .npz, in order (arr_0, arr_1, ... by number), as tensors."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            order = sorted(names, key=lambda n: (0, int(n[4:])) if re.fullmatch(r"arr_\d+", n) else (1, names.index(n)))
            tensors = {name: torch.from_numpy(np.array(f[name])) for name in order}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable .npz of numeric arrays ({exc})") from None
    return Contents(tensors, {}, ("read as an .npz list of arrays",))


def _sniff_torch(head: bytes, path: Path) -> bool:
    """A torch.save zip (it holds a data.pkl), or a legacy file: a pickle stream (protocol byte 0x80)."""
    if _is_zip(head):
        return any(n.endswith("data.pkl") for n in _zip_names(path))
    return head[:1] == b"\x80"


def read_torch(path: Path) -> Contents:
    """The state dict in a torch.save file, read with weights_only=True from an open file."""
    try:
        # an open file, never the path: torch.load hands a path named *.safetensors to the safetensors reader;
        # its warnings (an unusual pickle protocol...) would print a line above ours
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError,
            IndexError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is a torch.save file that needs more than weights to load ({first}); "
                              "flain-cli never unpickles code: save the state dict alone "
                              "(torch.save(model.state_dict(), path)) and pass that") from None
    if _is_state(obj):
        return Contents(dict(obj), {}, ("read as a torch.save state dict (from the top level, weights only)",))
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if _is_state(obj.get(key)):
                return Contents(dict(obj[key]), {},
                                (f"read as a torch.save state dict (from its {key!r} entry, weights only)",))
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{path} is a torch.save dict without a state dict of tensors at the top or under "
                              f"{'/'.join(STATE_KEYS)} (its keys: {keys})")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")


def _is_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


# tried in this order: safetensors before torch, because a header size may start with the pickle byte 0x80
READERS: tuple[Reader, ...] = (
    Reader("safetensors", _sniff_safetensors, read_safetensors),
    Reader("npz", _sniff_npz, read_npz, positional=True),
    Reader("torch", _sniff_torch, read_torch),
)
FORMATS = tuple(reader.name for reader in READERS)


def reader(name: str) -> Reader:
    """The reader of the format ``name`` (one of FORMATS)."""
    return next(r for r in READERS if r.name == name)


def detect(path: Path) -> Reader:
    """The reader for ``path``, from its content, or a CheckpointError that says what the file looks like."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    for candidate in READERS:
        if candidate.sniff(head, path):
            return candidate
    if _is_zip(head):
        names = _zip_names(path)
        raise CheckpointError(f"{path} is a zip archive but neither a torch.save file nor an .npz of arrays "
                              f"(it holds {', '.join(names[:3])}...)")
    raise CheckpointError(f"{path} is not a checkpoint flain-cli can read: not safetensors, not a torch.save state "
                          f"dict (.pt/.pth/.bin), not an .npz of arrays (it starts with bytes {head[:8].hex()})")


def sniff(path: Path) -> str:
    """The checkpoint format of ``path``, from its first bytes (one of FORMATS)."""
    return detect(path).name


@dataclass(frozen=True)
class Aligned:
    """Tensors under the architecture's names, floating ones as float32, and what it took."""

    tensors: dict[str, torch.Tensor]
    dtype: str  # the checkpoint's floating dtype (float32, float16, bfloat16, float64, or mixed)
    notes: tuple[str, ...]


def _listing(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def _strip(tensors: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes as long as that makes more names match."""
    stripped: list[str] = []
    while True:
        best, best_hits = None, len(expected & set(tensors))
        for prefix in PREFIXES:
            renamed = {k.removeprefix(prefix): v for k, v in tensors.items()}
            hits = len(expected & set(renamed))
            if len(renamed) == len(tensors) and hits > best_hits:
                best, best_hits = prefix, hits
        if best is None:
            return tensors, stripped
        tensors = {k.removeprefix(best): v for k, v in tensors.items()}
        stripped.append(best)


def align(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, what: str,
          ordered: bool = False, strict: bool = True) -> Aligned:
    """Map ``tensors`` onto the names and shapes of ``expected`` (a model's state_dict).

    ``ordered``: the names mean nothing (an .npz list): map by position. ``strict``: extra tensors
    are an error (else dropped, and said). Floating tensors become float32 for the work.
    """
    notes: list[str] = []
    if ordered:
        if len(tensors) != len(expected):
            raise CheckpointError(f"{what} holds {len(tensors)} arrays but the architecture has {len(expected)} "
                                  f"tensors (its state_dict, buffers included); the arrays must be "
                                  f"[v.numpy() for v in model.state_dict().values()], in that order")
        wrong = [f"{name} {tuple(t.shape)} vs array {i} {tuple(a.shape)}"
                 for i, ((name, t), a) in enumerate(zip(expected.items(), tensors.values())) if t.shape != a.shape]
        if wrong:
            raise CheckpointError(f"{what}: the arrays do not fit the architecture in state_dict order: "
                                  f"{len(wrong)} of {len(expected)} shapes differ, first {wrong[0]}")
        tensors = dict(zip(expected, tensors.values()))
        notes.append(f"mapped {len(expected)} arrays onto the architecture's tensors by position")
    else:
        tensors, stripped = _strip(tensors, set(expected))
        if stripped:
            notes.append(f"stripped the prefix {''.join(stripped)!r} from the tensor names")
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    wrong = [n for n in expected if n in tensors and tensors[n].shape != expected[n].shape]
    if missing or wrong or (extra and strict):
        parts = ([f"missing {_listing(missing)}"] if missing else []) + (
            [f"wrong shape {_listing([f'{n} {tuple(tensors[n].shape)} vs {tuple(expected[n].shape)}' for n in wrong])}"]
            if wrong else []) + ([f"unexpected {_listing(extra)}"] if extra else [])
        hint = ("; extra tensors alone are allowed with --no-strict" if extra and not (missing or wrong) else
                "; check --arch (flain inspect FILE lists the tensors and the built-in architectures they fit)")
        raise CheckpointError(f"{what} does not fit the architecture: {'; '.join(parts)}{hint}")
    if extra:
        notes.append(f"ignored {_listing(extra)} tensors the architecture does not have (--no-strict)")
    out, dtypes = {}, set()
    for name, ref in expected.items():
        t = tensors[name]
        if ref.is_floating_point():
            if t.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{what} stores {name} as {str(t.dtype).removeprefix('torch.')}, a quantized "
                                      f"or integer type; flain-cli reads float16/bfloat16/float32/float64 weights")
            dtypes.add(str(t.dtype).removeprefix("torch."))
            t = t.to(torch.float32)
        out[name] = t
    dtype = dtypes.pop() if len(dtypes) == 1 else ("mixed" if dtypes else "float32")
    if dtype != "float32":
        notes.append(f"its weights are {dtype}; computed in float32")
    return Aligned(out, dtype, tuple(notes))
