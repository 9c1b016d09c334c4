"""Robust image loading: any PNG/JPEG, any size or mode, with one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import TernvlmError


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; transparent pixels are composited on white."""
    p = Path(path)
    if not p.exists():
        raise TernvlmError(f"image not found: {p}")
    if p.is_dir():
        raise TernvlmError(f"image path is a directory: {p}")
    if p.stat().st_size == 0:
        raise TernvlmError(f"image file is empty (0 bytes): {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise TernvlmError(f"cannot read image {p}: {exc}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def to_pixels(
    images: list[Image.Image], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Resize (bicubic) and normalise a list of images to a [B, 3, size, size] float tensor."""
    arrs = []
    for im in images:
        im = to_rgb(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s
