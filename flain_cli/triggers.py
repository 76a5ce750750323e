"""Pixel triggers, written into raw uint8 pixels before normalization.

A trigger is one or more *parts* (boolean masks over the image) and the raw value written on
every channel under the mask. CBA and the pixel-count variants have one part; DBA splits its
global pattern into parts and malicious client ``k`` stamps part ``k mod P``. Evaluation always
stamps the full pattern (the union of the parts).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .catalog import TRIGGERS
from .errors import ConfigError


@dataclass(frozen=True)
class Trigger:
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

    def stamp(self, images: torch.Tensor, part: int | None = None) -> torch.Tensor:
        """Return a copy of uint8 ``[N, C, H, W]`` images with the pattern (or one part) set."""
        out = images.clone()
        out[:, :, self.mask(part).to(images.device)] = self.value
        return out

    def stamp_rows(self, images: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``stamp`` on the images where the bool ``[N]`` ``rows`` holds, the others as they are.

        ``mask`` is ``self.mask(part)`` already on the images' device (a caller stamps many batches
        with one). Elementwise (torch.where), without boolean indexing: on a GPU the host never
        waits for the device, and the values are exactly ``stamp``'s.
        """
        return torch.where(rows.view(-1, 1, 1, 1) & mask, self.value, images)




def make_trigger(name: str, height: int, width: int) -> Trigger:
    return TRIGGERS.get(name)(height, width)


def _mask(height: int, width: int, pixels: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


def _need(name: str, height: int, width: int) -> None:
    if (height, width) not in ((28, 28), (32, 32)):
        raise ConfigError(f"trigger {name!r} is defined for 28x28 and 32x32 images, not {height}x{width}")


@TRIGGERS.register("cba")
def cba(height: int, width: int) -> Trigger:
    """28x28: 5x5 block of 255 at rows/cols 23..27; 32x32: 4x4 block of 10 at rows/cols 26..29."""
    _need("cba", height, width)
    if (height, width) == (28, 28):
        span, value = range(23, 28), 255
    else:  # the reference implementation writes value 10 on CIFAR-10
        span, value = range(26, 30), 10
    return Trigger("cba", (_mask(height, width, [(r, c) for r in span for c in span]),), value)


@TRIGGERS.register("dba")
def dba(height: int, width: int) -> Trigger:
    """A plus sign split into parts.

    28x28: centred at (25, 25), arms of length 2; part 0 = row 25 (cols 23..27), part 1 = the
    rest of col 25 (rows 23, 24, 26, 27). 32x32: column 5 rows 5..11 and row 8 cols 2..8, in 4 parts: upper arm with the
    centre, lower arm, left arm, right arm.
    """
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
    return Trigger("dba", parts, 255)


# Pixel-count variants (paper, Figures 3-4): n pixels of 255 inside the 3x3 box whose top-left
# corner is 3 pixels from the bottom-right corner. The paper's figure is not reproduced in its
# text, so these shapes are our own: a bar, a plus, a plus with two corners, the full block.
_PIXEL_SHAPES = {
    3: [(1, 0), (1, 1), (1, 2)],
    5: [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)],
    7: [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)],
    9: [(r, c) for r in range(3) for c in range(3)],
}


def _pixel_variant(n: int) -> Callable[[int, int], Trigger]:
    def build(height: int, width: int) -> Trigger:
        _need(f"pix{n}", height, width)
        top, left = height - 4, width - 4
        pixels = [(top + r, left + c) for r, c in _PIXEL_SHAPES[n]]
        return Trigger(f"pix{n}", (_mask(height, width, pixels),), 255)

    return build


for _n in _PIXEL_SHAPES:
    TRIGGERS.register(f"pix{_n}")(_pixel_variant(_n))


@dataclass(frozen=True)
class PatternTrigger:
    """A trigger an auditor suspects, from an image: ``pattern`` (uint8 [C, H, W]) written where ``mask`` is set."""

    name: str
    pattern: torch.Tensor
    mask_: torch.Tensor  # bool [H, W]

    @property
    def full(self) -> torch.Tensor:
        return self.mask_

    def stamp(self, images: torch.Tensor, part: int | None = None) -> torch.Tensor:  # noqa: ARG002 - one part
        out = images.clone()
        out[:, :, self.mask_.to(images.device)] = self.pattern[:, self.mask_].to(images.device)
        return out


AnyTrigger = Trigger | PatternTrigger  # what evaluation stamps: a built-in trigger or a suspected one


def load_trigger_image(path: Path, shape: tuple[int, int, int], mask_path: Path | None = None) -> PatternTrigger:
    """A trigger from a PNG: where its alpha is non-zero (or, with ``mask_path``, where that image is
    non-zero), its pixels are written. Both must have the model's input size; colours are converted
    to the model's channels."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from .files import regular_file
    channels, height, width = shape

    def read(p: Path, what: str) -> Image.Image:
        try:
            with warnings.catch_warnings():  # Pillow's warning on a huge size: the check below refuses it
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(regular_file(p, what))
            with image:
                if image.size != (width, height):
                    raise ConfigError(f"{what} {p} is {image.size[0]}x{image.size[1]}; the model takes "
                                      f"{width}x{height} images: draw the trigger at that size")
                image.load()
                return image.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"{what} {p} is not a readable image ({exc})") from None

    image = read(path, "--trigger-image")
    if mask_path is not None:
        mask = np.asarray(read(mask_path, "--trigger-mask").convert("L")) > 0
    elif image.mode in ("RGBA", "LA") or "transparency" in image.info:
        mask = np.asarray(image.convert("RGBA"))[..., 3] > 0
    else:
        raise ConfigError(f"{path} has no alpha channel: make the pixels outside the trigger "
                          "transparent, or pass --trigger-mask", param="trigger_image")
    if not mask.any():
        raise ConfigError(f"the trigger of {path} covers no pixel (its mask is empty)")
    pixels = np.array(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)  # a writable copy
    pattern = torch.from_numpy(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy())
    return PatternTrigger(str(path), pattern, torch.from_numpy(mask))
