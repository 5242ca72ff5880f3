"""Images of digits in and out: PNG files read as digits, the masks that keep half a digit, digits as PIL images and
as one picture of a grid.

    image = load_image("digit.png")          # a greyscale PIL image, for DDPMMnistInpaintPipeline or interpolate
    keep = keep_half("top")                  # (1, 1, 28, 28): 1 keeps a pixel, 0 has it filled in
    digit_grid(samples[:64], upscale=2).save("grid.png")

Digits as tensors are (N, 1, 28, 28) in [0, 1], the pipelines' `output_type="pt"`.
"""

from __future__ import annotations

import math
import os

import torch
from diffusers.utils import make_image_grid
from PIL import Image

# The halves of a 28x28 digit an inpainting mask can keep, as the (rows, columns) they span.
HALVES = {
    "top": (slice(0, 14), slice(None)),
    "bottom": (slice(14, 28), slice(None)),
    "left": (slice(None), slice(0, 14)),
    "right": (slice(None), slice(14, 28)),
}
# Training's sample grids enlarge every pixel to a block of this size (nearest neighbour), so that digits are readable.
SAMPLE_GRID_UPSCALE = 4


def load_image(path: str | os.PathLike, name: str = "image") -> Image.Image:
    """The image file at `path` (a PNG of a digit, white on black as MNIST) as a greyscale PIL image.

    A missing file is a FileNotFoundError, one that is not an image a ValueError; both call the file `name`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} {os.fspath(path)!r} is not a file; pass the path of a PNG.")
    try:
        with Image.open(path) as image:
            return image.convert("L")
    except (OSError, ValueError) as error:
        raise ValueError(f"{name} {os.fspath(path)!r} cannot be read as an image ({error}); pass a PNG.") from error


def keep_half(region: str) -> torch.Tensor:
    """The (1, 1, 28, 28) inpainting mask that keeps one half of a digit, one of `HALVES` (1 = keep, 0 = fill in)."""
    if region not in HALVES:
        raise ValueError(f"region {region!r} is not one of {', '.join(HALVES)}; pass one of them.")
    keep = torch.zeros(1, 1, 28, 28)
    keep[(..., *HALVES[region])] = 1
    return keep


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """Digits (N, 1, H, W) in [0, 1] as 8-bit greyscale PIL images."""
    pixels = (images[:, 0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(digit) for digit in pixels]


def digit_grid(images: torch.Tensor, *, cols: int | None = None, upscale: int = 1) -> Image.Image:
    """Digits (N, 1, H, W) in [0, 1] tiled row by row into one greyscale image (diffusers' `make_image_grid`).

    `cols` defaults to a near-square grid, ceil(sqrt(N)); spare tiles of the last row are black. `upscale` enlarges
    every pixel to an upscale x upscale block (nearest neighbour): 2 or more makes MNIST's 28-pixel digits readable.
    """
    if len(images) == 0 or upscale < 1:
        raise ValueError(f"a grid needs at least one digit and an upscale of at least 1, got {len(images)}, {upscale}.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    tiles = to_pil_images(images)
    tiles += [Image.new("L", tiles[0].size) for _ in range(rows * cols - len(tiles))]
    grid = make_image_grid(tiles, rows=rows, cols=cols).convert("L")  # it pastes into RGB; R = G = B here
    return grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
