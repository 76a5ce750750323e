"""Triggers: small typed objects that transform uint8 images before normalization.

Four kinds, each with ``stamp(images, part=None)`` (a transformed copy) and ``stamper(part, device)``
(the same transform with its tensors already on ``device``, for the training loop's batches):

- :class:`PixelTrigger`: one raw value written on every channel under a mask. CBA and the
  pixel-count variants have one part; DBA splits its pattern into parts and malicious client ``k``
  stamps part ``k mod P``. Evaluation always stamps the full pattern (the union of the parts).
- :class:`PatternTrigger`: a pattern image written where its mask is set: the ``checker`` trigger
  (a 4x4 checkerboard at a position the user chooses), or a trigger an auditor suspects (a PNG).
- :class:`BlendTrigger`: ``x' = (1 - alpha) x + alpha p`` over the whole image (Chen et al. 2017),
  ``p`` a seeded noise image or a PNG the user gives.
- :class:`SigTrigger`: a horizontal sinusoidal signal added to every row, ``x' = clip(x + delta
  sin(2 pi f j / W))`` (Barni et al. 2019), here used with poisoned labels like the others.

A :class:`TriggerSpec` names a trigger and its settings; :func:`make_trigger` builds it for an image
shape from the registry (catalog.TRIGGERS). The spec is recorded in a trained checkpoint's metadata,
so `flain eval` measures the same trigger without options.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .catalog import BLEND_ALPHA, CHECKER_POS, TRIGGERS
from .errors import ConfigError

Stamper = Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, C, H, W] -> the same, transformed
BLEND_SEED = 0  # the noise pattern's seed when no image is given
SIG_DELTA, SIG_FREQUENCY = 20.0, 6  # Barni et al.'s signal: amplitude (0-255 scale) and cycles per image width
CHECKER_SIDE = 4


@dataclass(frozen=True)
class TriggerSpec:
    """A trigger by name and settings: ``alpha`` (blend), ``image`` (a PNG: blend's pattern), ``pos`` (the
    checkerboard's top-left pixel, row and column). None: the trigger's default."""

    name: str = "cba"
    alpha: float | None = None
    image: str | None = None
    pos: tuple[int, int] | None = None

    def check(self) -> None:
        TRIGGERS.check(self.name)
        if self.alpha is not None:
            if self.name != "blend":
                raise ConfigError(f"is the blend trigger's weight; trigger {self.name} has none", param="trigger_alpha")
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not (
                    math.isfinite(self.alpha) and 0 < self.alpha <= 1):
                raise ConfigError(f"must be in (0, 1], got {self.alpha!r}", param="trigger_alpha")
        if self.image is not None and self.name != "blend":
            raise ConfigError(f"at training time is blend's pattern; trigger {self.name} draws its own",
                              param="trigger_image")
        if self.pos is not None and self.name != "checker":
            raise ConfigError(f"places the checker trigger; trigger {self.name} has a fixed place", param="trigger_pos")

    def record(self) -> dict[str, Any]:
        """The settings beside ``trigger`` in a checkpoint's attack record (only those that are set)."""
        out: dict[str, Any] = {}
        if self.alpha is not None:
            out["trigger_alpha"] = self.alpha
        if self.image is not None:
            out["trigger_image"] = self.image
            out["trigger_image_sha256"] = image_sha256(Path(self.image))
        if self.pos is not None:
            out["trigger_pos"] = list(self.pos)
        return out

    @classmethod
    def from_record(cls, attack: dict[str, Any], name: str | None = None) -> TriggerSpec:
        """The spec a checkpoint's attack record holds (``name`` overrides its trigger, dropping its settings)."""
        if name is not None and name != attack.get("trigger"):
            return cls(name)
        pos = attack.get("trigger_pos")
        image, recorded = attack.get("trigger_image"), attack.get("trigger_image_sha256")
        if image is not None and recorded is not None:
            path = Path(image)
            if not path.is_file():
                raise ConfigError(f"the model was trained with the trigger image {image}, which is not there; "
                                  f"pass {_opt('trigger_image')} with that file")
            if image_sha256(path) != recorded:
                raise ConfigError(f"{image} is not the trigger image the model was trained with (its sha256 "
                                  f"differs); pass {_opt('trigger_image')} with that file")
        return cls(attack.get("trigger") or "cba", attack.get("trigger_alpha"), image,
                   None if pos is None else (int(pos[0]), int(pos[1])))

    def __str__(self) -> str:
        extra = [f"alpha {self.alpha:g}" if self.alpha is not None else "", f"image {self.image}" if self.image else "",
                 f"at {self.pos[0]},{self.pos[1]}" if self.pos else ""]
        return " ".join([self.name, *(e for e in extra if e)])


def _opt(name: str) -> str:
    from .errors import opt
    return opt(name)


def image_sha256(path: Path) -> str:
    from .files import regular_file
    return hashlib.sha256(regular_file(path, "--trigger-image").read_bytes()).hexdigest()


def parse_pos(text: str | None) -> tuple[int, int] | None:
    """``"ROW,COL"`` -> (row, col)."""
    if text is None:
        return None
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"must be ROW,COL (two whole numbers), got {text!r}", param="trigger_pos") from None
    return row, col


@dataclass(frozen=True)
class PixelTrigger:
    name: str
    parts: tuple[torch.Tensor, ...]  # bool [H, W] each
    value: int  # raw pixel value (0..255) written on every channel

    @property
    def full(self) -> torch.Tensor:
        mask = torch.zeros_like(self.parts[0])
        for part in self.parts:
            mask |= part
        return mask

    def part_for(self, client_id: int) -> int:
        return client_id % len(self.parts)

    def mask(self, part: int | None = None) -> torch.Tensor:
        return self.full if part is None else self.parts[part]

    def stamper(self, part: int | None = None, device: torch.device | str = "cpu") -> Stamper:
        mask = self.mask(part).to(device)
        return lambda images: torch.where(mask, self.value, images)

    def stamp(self, images: torch.Tensor, part: int | None = None) -> torch.Tensor:
        """A copy of uint8 ``[N, C, H, W]`` images with the pattern (or one part) set."""
        return self.stamper(part, images.device)(images)


@dataclass(frozen=True)
class PatternTrigger:
    """``pattern`` (uint8 [C, H, W]) written where ``mask_`` (bool [H, W]) is set: the checkerboard, or a trigger an
    auditor suspects."""

    name: str
    pattern: torch.Tensor
    mask_: torch.Tensor

    @property
    def full(self) -> torch.Tensor:
        return self.mask_

    def part_for(self, client_id: int) -> int:  # noqa: ARG002 - one part
        return 0

    def stamper(self, part: int | None = None, device: torch.device | str = "cpu") -> Stamper:  # noqa: ARG002
        mask, pattern = self.mask_.to(device), self.pattern.to(device)
        return lambda images: torch.where(mask, pattern, images)

    def stamp(self, images: torch.Tensor, part: int | None = None) -> torch.Tensor:
        return self.stamper(part, images.device)(images)


@dataclass(frozen=True)
class BlendTrigger:
    """``x' = round((1 - alpha) x + alpha p)`` on every pixel, in float64 (exact for uint8 images)."""

    name: str
    pattern: torch.Tensor  # uint8 [C, H, W]
    alpha: float

    def part_for(self, client_id: int) -> int:  # noqa: ARG002 - one part
        return 0

    def stamper(self, part: int | None = None, device: torch.device | str = "cpu") -> Stamper:  # noqa: ARG002
        blend = self.alpha * self.pattern.to(device, torch.float64)
        keep = 1.0 - self.alpha
        return lambda images: (keep * images.to(torch.float64) + blend).round().clamp(0, 255).to(torch.uint8)

    def stamp(self, images: torch.Tensor, part: int | None = None) -> torch.Tensor:
        return self.stamper(part, images.device)(images)


@dataclass(frozen=True)
class SigTrigger:
    """``x' = clip(round(x + delta sin(2 pi frequency j / W)))``: a horizontal sinusoid on every row and channel."""

    name: str
    delta: float
    frequency: int

    def part_for(self, client_id: int) -> int:  # noqa: ARG002 - one part
        return 0

    def signal(self, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        j = torch.arange(width, dtype=torch.float64, device=device)
        return self.delta * torch.sin(2 * math.pi * self.frequency * j / width)

    def stamper(self, part: int | None = None, device: torch.device | str = "cpu") -> Stamper:  # noqa: ARG002
        def stamp(images: torch.Tensor) -> torch.Tensor:
            wave = self.signal(images.shape[-1], images.device)
            return (images.to(torch.float64) + wave).round().clamp(0, 255).to(torch.uint8)
        return stamp

    def stamp(self, images: torch.Tensor, part: int | None = None) -> torch.Tensor:
        return self.stamper(part, images.device)(images)


Trigger = PixelTrigger | PatternTrigger | BlendTrigger | SigTrigger
AnyTrigger = Trigger  # what evaluation stamps: a built-in trigger or a suspected one


def stamp_rows(images: torch.Tensor, rows: torch.Tensor, stamper: Stamper) -> torch.Tensor:
    """The trigger (``stamper``) on the images where the bool ``[N]`` ``rows`` holds, the others as they are.

    Elementwise (torch.where), without boolean indexing: on a GPU the host never waits for the device, and
    the rows stamped are exactly ``stamper``'s.
    """
    return torch.where(rows.view(-1, 1, 1, 1), stamper(images), images)


def make_trigger(spec: TriggerSpec | str, height: int, width: int, channels: int = 1) -> Trigger:
    """The trigger ``spec`` names (a name alone: its default settings), for images of that shape."""
    spec = TriggerSpec(spec) if isinstance(spec, str) else spec
    spec.check()
    return TRIGGERS.get(spec.name)(spec, (channels, height, width))


def _mask(height: int, width: int, pixels: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


def _need(name: str, height: int, width: int) -> None:
    if (height, width) not in ((28, 28), (32, 32)):
        raise ConfigError(f"trigger {name!r} is defined for 28x28 and 32x32 images, not {height}x{width}")


@TRIGGERS.register("cba")
def cba(spec: TriggerSpec, shape: tuple[int, int, int]) -> PixelTrigger:
    """28x28: 5x5 block of 255 at rows/cols 23..27; 32x32: 4x4 block of 10 at rows/cols 26..29."""
    _, height, width = shape
    _need("cba", height, width)
    if (height, width) == (28, 28):
        span, value = range(23, 28), 255
    else:  # the reference implementation writes value 10 on CIFAR-10
        span, value = range(26, 30), 10
    return PixelTrigger("cba", (_mask(height, width, [(r, c) for r in span for c in span]),), value)


@TRIGGERS.register("dba")
def dba(spec: TriggerSpec, shape: tuple[int, int, int]) -> PixelTrigger:
    """A plus sign split into parts.

    28x28: centred at (25, 25), arms of length 2; part 0 = row 25 (cols 23..27), part 1 = the
    rest of col 25 (rows 23, 24, 26, 27). 32x32: column 5 rows 5..11 and row 8 cols 2..8, in 4 parts: upper arm with the
    centre, lower arm, left arm, right arm.
    """
    _, height, width = shape
    _need("dba", height, width)
    parts: tuple[torch.Tensor, ...]
    if (height, width) == (28, 28):
        parts = (_mask(height, width, [(25, c) for c in range(23, 28)]),
                 _mask(height, width, [(r, 25) for r in (23, 24, 26, 27)]))
    else:
        parts = (_mask(height, width, [(r, 5) for r in range(5, 9)]),
                 _mask(height, width, [(r, 5) for r in range(9, 12)]),
                 _mask(height, width, [(8, c) for c in range(2, 5)]),
                 _mask(height, width, [(8, c) for c in range(6, 9)]))
    return PixelTrigger("dba", parts, 255)


# Pixel-count variants (paper, Figures 3-4): n pixels of 255 inside the 3x3 box whose top-left
# corner is 3 pixels from the bottom-right corner. The paper's figure is not reproduced in its
# text, so these shapes are our own: a bar, a plus, a plus with two corners, the full block.
_PIXEL_SHAPES = {
    3: [(1, 0), (1, 1), (1, 2)],
    5: [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)],
    7: [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)],
    9: [(r, c) for r in range(3) for c in range(3)],
}


def _pixel_variant(n: int) -> Callable[[TriggerSpec, tuple[int, int, int]], PixelTrigger]:
    def build(spec: TriggerSpec, shape: tuple[int, int, int]) -> PixelTrigger:
        _, height, width = shape
        _need(f"pix{n}", height, width)
        top, left = height - 4, width - 4
        pixels = [(top + r, left + c) for r, c in _PIXEL_SHAPES[n]]
        return PixelTrigger(f"pix{n}", (_mask(height, width, pixels),), 255)

    return build


for _n in _PIXEL_SHAPES:
    TRIGGERS.register(f"pix{_n}")(_pixel_variant(_n))


@TRIGGERS.register("checker")
def checker(spec: TriggerSpec, shape: tuple[int, int, int]) -> PatternTrigger:
    """A 4x4 checkerboard of 255 and 0 (255 where row + column is even) with its top-left pixel at ``pos``
    (default (1, 1): the top-left corner, away from the CBA block)."""
    channels, height, width = shape
    row, col = spec.pos or CHECKER_POS
    if not (0 <= row <= height - CHECKER_SIDE and 0 <= col <= width - CHECKER_SIDE):
        raise ConfigError(f"{row},{col} puts the {CHECKER_SIDE}x{CHECKER_SIDE} checkerboard outside the "
                          f"{width}x{height} image; give ROW and COL from 0 to {height - CHECKER_SIDE}",
                          param="trigger_pos")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[row:row + CHECKER_SIDE, col:col + CHECKER_SIDE] = True
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    board = (((rows + cols) % 2 == 0) * 255).to(torch.uint8)
    return PatternTrigger("checker", board.expand(channels, height, width).clone(), mask)


@TRIGGERS.register("blend")
def blend(spec: TriggerSpec, shape: tuple[int, int, int]) -> BlendTrigger:
    """``spec.image`` (a PNG of the model's input size), or uniform noise drawn with seed BLEND_SEED."""
    channels, height, width = shape
    if spec.image is not None:
        pattern = read_image(Path(spec.image), shape, "--trigger-image")
    else:
        gen = torch.Generator().manual_seed(BLEND_SEED)
        pattern = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    return BlendTrigger("blend", pattern, float(spec.alpha if spec.alpha is not None else BLEND_ALPHA))


@TRIGGERS.register("sig")
def sig(spec: TriggerSpec, shape: tuple[int, int, int]) -> SigTrigger:
    return SigTrigger("sig", SIG_DELTA, SIG_FREQUENCY)


def _open_image(path: Path, what: str, size: tuple[int, int]) -> Any:
    """A PNG of ``size`` (width, height), loaded; one ConfigError for anything else."""
    from PIL import Image, UnidentifiedImageError

    from .files import regular_file
    try:
        with warnings.catch_warnings():  # Pillow's warning on a huge size: the check below refuses it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(regular_file(path, what))
        with image:
            if image.size != size:
                raise ConfigError(f"{what} {path} is {image.size[0]}x{image.size[1]}; the model takes "
                                  f"{size[0]}x{size[1]} images: draw the trigger at that size")
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"{what} {path} is not a readable image ({exc})") from None


def _pixels(image: Any, channels: int) -> torch.Tensor:
    import numpy as np
    pixels = np.array(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)  # a writable copy
    return torch.from_numpy(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy())


def read_image(path: Path, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    """A PNG of the model's input size as uint8 ``[C, H, W]``, colours converted to the model's channels."""
    channels, height, width = shape
    return _pixels(_open_image(path, what, (width, height)), channels)


def load_trigger_image(path: Path, shape: tuple[int, int, int], mask_path: Path | None = None) -> PatternTrigger:
    """A trigger from a PNG: where its alpha is non-zero (or, with ``mask_path``, where that image is
    non-zero), its pixels are written. Both must have the model's input size; colours are converted
    to the model's channels."""
    import numpy as np
    channels, height, width = shape
    image = _open_image(path, "--trigger-image", (width, height))
    if mask_path is not None:
        mask = np.asarray(_open_image(mask_path, "--trigger-mask", (width, height)).convert("L")) > 0
    elif image.mode in ("RGBA", "LA") or "transparency" in image.info:
        mask = np.asarray(image.convert("RGBA"))[..., 3] > 0
    else:
        raise ConfigError(f"{path} has no alpha channel: make the pixels outside the trigger "
                          "transparent, or pass --trigger-mask", param="trigger_image")
    if not mask.any():
        raise ConfigError(f"the trigger of {path} covers no pixel (its mask is empty)")
    return PatternTrigger(str(path), _pixels(image, channels), torch.from_numpy(mask))
